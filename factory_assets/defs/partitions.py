"""Partitions shared by the camera, dataset and inference assets: UTC days."""
import dagster as dg

# end_offset=1: today's partition exists while frames for it are still arriving.
daily_partitions = dg.DailyPartitionsDefinition(start_date="2024-01-01", timezone="UTC", end_offset=1)
