import dagster as dg

from factory_assets.defs.twin.jobs import twin_refresh_job

REINFER_EVERY_MINUTES = 5

reinfer_stock_schedule = dg.ScheduleDefinition(
    name="reinfer_stock_schedule",
    job=twin_refresh_job,
    cron_schedule=f"*/{REINFER_EVERY_MINUTES} * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Every {REINFER_EVERY_MINUTES} minutes: re-infer the newest frame and sync the twin.",
)
