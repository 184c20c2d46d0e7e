"""Domain results as Dagster UI metadata: typed tables from pandas DataFrames, numbers
as numbers, pictures as inline PNG (use sparingly: every event stores its metadata)."""
from __future__ import annotations

import base64

import dagster as dg


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})")


def _column_type(dtype) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    return "string"


def _plain(value):
    """numpy scalars -> Python numbers, NaN -> None (metadata must serialise)."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value


def table(df, description: str | None = None) -> dg.MetadataValue:
    """A pandas DataFrame as a ``MetadataValue.table`` with its schema (column types from the dtypes)."""
    schema = dg.TableSchema(columns=[dg.TableColumn(str(c), _column_type(df[c].dtype)) for c in df.columns])
    records = [dg.TableRecord({str(k): _plain(v) for k, v in row.items()}) for row in df.to_dict("records")]
    return dg.MetadataValue.table(records=records, schema=schema)


def json_value(data) -> dg.MetadataValue:
    """A part of a MongoDB document as JSON metadata: datetimes as ISO-8601 text, other values
    JSON does not know (ObjectId, Decimal128) as their text."""
    import json

    def text(value):
        return value.isoformat() if hasattr(value, "isoformat") else str(value)

    return dg.MetadataValue.json(json.loads(json.dumps(data, default=text)))


def partition_bounds(context: dg.AssetExecutionContext):
    """[start, end) of the partition (or partition range) being materialized."""
    window = context.partition_time_window
    return window.start, window.end
