"""A small dbt-like runner for the SQL models in dbt_like_sql/.

Each `<layer>/<name>.sql` file is one model: a single SELECT producing one as-of partition.
Templates are rendered by jinja2 and may only produce *identifiers*:
  {{ ref('holdings') }}          another model (a dependency, drawn as lineage in Dagster)
  {{ source('positions') }}      a landed feed file (table landing_positions)
  {{ feed_files }}               the feed contract, for models that check every file alike
  {{ limits.max_quantity }}      a plausibility limit of the contract (a numeric code constant)
Values are never rendered into SQL: the as-of date is the bound parameter `$as_of`.

What each column means is in dbt_like_sql/columns.yml (`column_meanings`): one meaning per
column name, with a model's own override where the name means something else there. The Dagster
asset of a model shows its columns, types and meanings after each materialisation.

Materialising a model for a date deletes that date's rows and inserts the new ones inside one
transaction, so re-running a day replaces it exactly (no duplicates, no partial partition).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from functools import cache
from graphlib import TopologicalSorter
from pathlib import Path

import duckdb
import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from rebal_pipeline.core.feed_contract import FEED_FILES, PLAUSIBILITY
from rebal_pipeline.core.landing import REFERENCE_COLUMNS, landing_table

LAYERS = ("staging", "intermediate", "marts")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


def quote_identifier(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a safe SQL identifier: {name!r}")
    return f'"{name}"'


_CONTRACT_LITERAL = re.compile(r"^[a-z0-9_.,|]*$")


def contract_literal(text: str) -> str:
    """A string literal for a name from the feed contract (a file or column name).

    Only the contract's own names may be rendered this way; they are code constants, never
    data, and the pattern refuses anything that could escape the literal.
    """
    if not _CONTRACT_LITERAL.match(text):
        raise ValueError(f"not a contract name: {text!r}")
    return f"'{text}'"


@dataclass(frozen=True)
class SqlModel:
    name: str
    layer: str
    path: Path
    template: str
    refs: tuple[str, ...]
    sources: tuple[str, ...]
    description: str

    def render(self) -> str:
        return _environment().from_string(self.template).render()


def _environment(on_ref=None, on_source=None) -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)

    def ref(name: str) -> str:
        if on_ref:
            on_ref(name)
        return quote_identifier(name)

    def source(name: str) -> str:
        if name not in FEED_FILES:
            raise ValueError(f"unknown feed file in source(): {name!r}")
        if on_source:
            on_source(name)
        return quote_identifier(landing_table(name))

    env.globals.update(
        ref=ref,
        source=source,
        feed_files=list(FEED_FILES.values()),
        reference_columns=REFERENCE_COLUMNS,
        quote=quote_identifier,
        literal=contract_literal,
        # Plausibility limits: numeric code constants of the contract, never data.
        limits=PLAUSIBILITY,
    )
    return env


def _description(template: str) -> str:
    lines = []
    for line in template.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line[2:].strip())
    return " ".join(lines).strip()


def load_model(path: Path, layer: str) -> SqlModel:
    template = path.read_text(encoding="utf-8")
    refs: list[str] = []
    sources: list[str] = []
    _environment(refs.append, sources.append).from_string(template).render()
    return SqlModel(
        name=path.stem,
        layer=layer,
        path=path,
        template=template,
        refs=tuple(dict.fromkeys(refs)),
        sources=tuple(dict.fromkeys(sources)),
        description=_description(template),
    )


@cache
def load_project(sql_dir: Path) -> dict[str, SqlModel]:
    """All models of the project in dependency order (dependencies first)."""
    models: dict[str, SqlModel] = {}
    for layer in LAYERS:
        for path in sorted((sql_dir / layer).glob("*.sql")):
            model = load_model(path, layer)
            if model.name in models:
                raise ValueError(f"two models named {model.name}: {models[model.name].path}, {path}")
            models[model.name] = model
    for model in models.values():
        unknown = [r for r in model.refs if r not in models and r not in EXTERNAL_REFS]
        if unknown:
            raise ValueError(f"{model.path}: ref() to unknown model(s): {', '.join(unknown)}")
    graph = {m.name: {r for r in m.refs if r in models} for m in models.values()}
    order = list(TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    return {name: models[name] for name in order}


COLUMN_MEANINGS_FILE = "columns.yml"


@dataclass(frozen=True)
class ColumnMeanings:
    """What the models' columns mean (dbt_like_sql/columns.yml)."""

    common: dict[str, str]
    by_model: dict[str, dict[str, str]]

    def of(self, model: str, column: str) -> str | None:
        return self.by_model.get(model, {}).get(column) or self.common.get(column)


@cache
def column_meanings(sql_dir: Path) -> ColumnMeanings:
    path = sql_dir / COLUMN_MEANINGS_FILE
    if not path.exists():
        return ColumnMeanings({}, {})
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return ColumnMeanings(
        common={str(k): str(v) for k, v in (document.get("columns") or {}).items()},
        by_model={str(m): {str(k): str(v) for k, v in (cols or {}).items()}
                  for m, cols in (document.get("models") or {}).items()},
    )


def table_columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    """The table's columns and their DuckDB types, in table order."""
    return _table_columns(con, table)


# Tables written by Python assets that SQL models may ref() (e.g. the drift policy).
EXTERNAL_REFS: set[str] = {"drift_policy", "feed_type_errors", "feed_manifest", "basis_adjustments"}


def _table_columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    rows = con.execute(
        "select column_name, data_type from information_schema.columns "
        "where table_schema = current_schema() and table_name = ? order by ordinal_position",
        [table],
    ).fetchall()
    return dict(rows)


def materialize_model(con: duckdb.DuckDBPyConnection, model: SqlModel, as_of: date) -> int:
    """Replace the `as_of` partition of the model's table; returns the partition's row count."""
    sql = model.render()
    table = quote_identifier(model.name)
    params = {"as_of": as_of}
    # The model's columns and types, from planning the query (no data is read or written).
    described = con.execute(f"describe select * from ({sql})", params).fetchall()
    new_columns = {row[0]: row[1] for row in described}
    if "as_of" not in new_columns:
        raise ValueError(f"{model.path}: a model must select an as_of column")
    con.execute("begin transaction")
    try:
        _create_or_evolve(con, model.name, new_columns, f"select * from ({sql}) where false", params)
        con.execute(f"delete from {table} where as_of = $as_of", params)
        rows = con.execute(f"insert into {table} by name {sql}", params).fetchone()[0]
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    return rows


def _create_or_evolve(
    con: duckdb.DuckDBPyConnection, table: str, columns: dict[str, str], empty_select: str, params=None
) -> None:
    """Create the table from a zero-row select, or add the columns it lacks.

    Additive schema evolution: a new column is added and older partitions read NULL in it, so
    a warehouse built by an earlier release keeps working. Removed columns stay (and read NULL
    in new rows); a changed type is an error DuckDB reports on insert.
    """
    existing = _table_columns(con, table)
    if not existing:
        con.execute(f"create table {quote_identifier(table)} as {empty_select}", params or {})
        return
    for column, data_type in columns.items():
        if column not in existing:
            con.execute(f"alter table {quote_identifier(table)} add column {quote_identifier(column)} {data_type}")


def replace_partition(
    con: duckdb.DuckDBPyConnection, table: str, as_of: date, rows
) -> None:
    """Replace one as-of partition of a table written from Python (an Arrow/polars frame)."""
    name = quote_identifier(table)
    con.register("__partition_rows", rows)
    try:
        con.execute("begin transaction")
        columns = {row[0]: row[1] for row in con.execute("describe select * from __partition_rows").fetchall()}
        _create_or_evolve(con, table, columns, "select * from __partition_rows where false")
        con.execute(f"delete from {name} where as_of = ?", [as_of])
        con.execute(f"insert into {name} by name select * from __partition_rows")
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    finally:
        con.unregister("__partition_rows")
