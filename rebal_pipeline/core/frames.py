"""Checking the frames handed to the pure cores at their boundary."""

import polars as pl


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType], name: str) -> pl.DataFrame:
    """The frame's required columns, cast to their types; a missing column is a clear error.
    Extra columns are ignored."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {', '.join(missing)}")
    return df.select([pl.col(c).cast(t) for c, t in schema.items()])
