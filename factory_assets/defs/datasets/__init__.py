from factory_assets.defs.datasets.assets import (labeled_images, training_manifests,
                                                 training_manifests_match_their_version)

assets = [labeled_images, training_manifests]
asset_checks = [training_manifests_match_their_version]
