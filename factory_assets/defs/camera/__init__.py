from factory_assets.defs.camera.assets import raw_frames

assets = [raw_frames]
