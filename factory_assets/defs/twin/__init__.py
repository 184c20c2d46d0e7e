import dagster as dg

from factory_assets.defs.twin.assets import stock_inferences, twin_state
from factory_assets.defs.twin.jobs import model_job, retrain_job, stock_inference_job, twin_refresh_job
from factory_assets.defs.twin.schedules import reinfer_stock_schedule
from factory_assets.defs.twin.sensors import (bootstrap_model_sensor, new_frames_sensor, retrained_model_sensor,
                                              twin_live_sensor)

assets = [stock_inferences, twin_state]
jobs = [stock_inference_job, twin_refresh_job, retrain_job, model_job]
schedules = [reinfer_stock_schedule]
sensors = [
    new_frames_sensor,
    twin_live_sensor,
    bootstrap_model_sensor,
    retrained_model_sensor,
    # twin_state follows new inferences (TWIN_STATE_AUTOMATION), on by default
    dg.AutomationConditionSensorDefinition("twin_automation_sensor", target=dg.AssetSelection.assets(twin_state),
                                           default_status=dg.DefaultSensorStatus.RUNNING,
                                           minimum_interval_seconds=30),
]
