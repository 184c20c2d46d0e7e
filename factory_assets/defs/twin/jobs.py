import dagster as dg

from factory_assets.defs.pools import FACTORY_TAG, FLEET

# run_tags: the factory a run works on (defs/pools.py); the sensors narrow it to one factory when they can

stock_inference_job = dg.define_asset_job(
    "stock_inference_job", selection=["stock_inferences"], run_tags={FACTORY_TAG: FLEET},
    description="Infer the frames of a factory's day that its deployed models have not seen yet.")

twin_refresh_job = dg.define_asset_job(
    "twin_refresh_job", selection=["twin_state"], run_tags={FACTORY_TAG: FLEET},
    description="Re-infer each factory's newest frame and sync the twins (heals missed updates, refreshes a "
                "stale twin).")

retrain_job = dg.define_asset_job(
    "retrain_job", selection=["labeled_images", "training_manifests"], run_tags={FACTORY_TAG: FLEET},
    description="A factory's datasets from a range of days: labeled_images -> training_manifests (one dataset per "
                "camera). Launch it over one factory and a date range (one run); when it succeeds, "
                "retrained_model_sensor launches model_job for that factory.")

model_job = dg.define_asset_job(
    "model_job", selection=["stock_model", "model_endpoint"], run_tags={FACTORY_TAG: FLEET},
    description="A factory's models: stock_model (one per camera, on its newest dataset) -> model_endpoint (its "
                "deployment). Blocking checks keep a worse model off the endpoint; no other factory is touched.")
