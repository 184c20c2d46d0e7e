from factory_assets.defs.camera.arrival import frames_are_arriving, raw_frames_sensor
from factory_assets.defs.camera.assets import raw_frames

assets = [raw_frames]
asset_checks = [frames_are_arriving]
sensors = [raw_frames_sensor]
