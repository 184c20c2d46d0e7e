from factory_assets.defs.datasets.assets import labeled_images, training_manifests

assets = [labeled_images, training_manifests]
