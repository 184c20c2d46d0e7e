from factory_assets.defs.camera.arrival import frames_are_arriving, raw_frames_sensor
from factory_assets.defs.camera.assets import raw_frames
from factory_assets.defs.fleet import factory_discovery_sensor

assets = [raw_frames]
asset_checks = [frames_are_arriving]
sensors = [factory_discovery_sensor, raw_frames_sensor]
