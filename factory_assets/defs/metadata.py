"""Helpers that turn domain results into Dagster UI metadata."""
from __future__ import annotations

import base64

import dagster as dg


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})")


def table_markdown(headers: list[str], rows: list[list]) -> dg.MetadataValue:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def partition_bounds(context: dg.AssetExecutionContext):
    """[start, end) of the partition (or partition range) being materialized."""
    window = context.partition_time_window
    return window.start, window.end
