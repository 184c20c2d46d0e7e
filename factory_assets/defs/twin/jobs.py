import dagster as dg

from factory_assets.defs.pools import FACTORY_TAG, FLEET

# run_tags: the factory a run works on (defs/pools.py); the sensors narrow it to one factory when they can

stock_inference_job = dg.define_asset_job(
    "stock_inference_job", selection=["stock_inferences"], run_tags={FACTORY_TAG: FLEET},
    description="Infer the frames of a day that the deployed model has not seen yet.")

twin_refresh_job = dg.define_asset_job(
    "twin_refresh_job", selection=["twin_state"], run_tags={FACTORY_TAG: FLEET},
    description="Re-infer the newest frame and sync the twin (heals missed updates, refreshes a stale twin).")

retrain_job = dg.define_asset_job(
    "retrain_job", selection=["labeled_images", "training_manifests", "stock_model", "model_endpoint"],
    run_tags={FACTORY_TAG: FLEET},
    description="labeled_images (the selected days) -> training_manifests -> stock_model -> model_endpoint. "
                "Launch as a backfill over a date range; blocking checks keep a worse model off the endpoint.")
