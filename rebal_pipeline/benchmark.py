"""`rebal benchmark`: time each stage of the daily scan and its peak memory, per book size.

Each size runs in fresh child processes so peak RSS is the stage's own, not the parent's:
  1. generate  — the sandbox writes the canonical feed (not part of the daily budget)
  2. pipeline  — the same code the Dagster assets run, stage by stage, timed:
       ingest    archive + land the 11 files (text, type checks) into DuckDB
       holdings  staging casts, rule checks, held accounts, holdings
       drift     targets, scanned accounts, drift frames (account and household scope)
       alerts    drift_alerts and the other marts (rejects, skipped, data-quality alerts)
  3. dagster   — the whole daily_drift_scan materialised through Dagster in-process, for the
                 orchestration overhead on top (ephemeral instance). Its progress (each step
                 started and done, a heartbeat during long steps; rebal_pipeline/progress.py) goes
                 to the terminal's stderr while it runs; Dagster's own log shows warnings only.
The table is printed and written to BENCHMARKS.md. Nothing here asserts a time: budgets are
read off the table by people.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

BENCH_AS_OF = date(2026, 11, 20)
STAGES = ("ingest", "holdings", "drift", "alerts", "trades", "tax")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _child(mode: str, accounts: int, work: Path) -> dict:
    # A sandbox book: without REBAL_AUDIT_KEY its audit chain is signed with the public sandbox
    # key, as in the drill (workflow/audit.py).
    env = dict(os.environ)  # the child's environment: a sandbox unless the caller said otherwise
    env.setdefault("REBAL_SANDBOX", "1")
    # The Dagster child's stderr is the terminal's: its progress lines show while it runs (the
    # result still comes back as the last line of its stdout).
    out = subprocess.run(
        [sys.executable, "-m", "rebal_pipeline.benchmark", mode, str(accounts), str(work)],
        check=True, stdout=subprocess.PIPE, stderr=None if mode == "dagster" else subprocess.PIPE,
        text=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _generate(accounts: int, work: Path) -> dict:
    from rebal_pipeline.sandbox.generator import SandboxConfig, generate_feed, households_for_accounts

    started = time.perf_counter()
    report = generate_feed(
        SandboxConfig(as_of=BENCH_AS_OF, households=households_for_accounts(accounts), seed=7,
                      shock={"equity": -0.12}),
        work / "feeds",
    )
    return {
        "generate_s": time.perf_counter() - started,
        "generate_rss_mb": _peak_rss_mb(),
        "accounts": report.accounts,
        "positions": report.positions,
        "lots": report.lots,
        "households": report.households,
    }


def _stage_of_models() -> dict[str, str]:
    """Assign each SQL model to the first stage whose mart needs it."""
    from rebal_pipeline import settings
    from rebal_pipeline.core.sql_models import load_project

    models = load_project(settings.sql_dir())

    def ancestors(name: str) -> set[str]:
        found, todo = set(), [name]
        while todo:
            for ref in models[todo.pop()].refs:
                if ref in models and ref not in found:
                    found.add(ref)
                    todo.append(ref)
        return found | {name}

    stage: dict[str, str] = {}
    for mart, label in (("holdings", "holdings"), ("drift", "drift"), ("drift_alerts", "alerts")):
        for name in ancestors(mart):
            stage.setdefault(name, label)
    return {name: stage.get(name, "alerts") for name in models}


def _pipeline(work: Path) -> dict:
    from rebal_pipeline.resources import Warehouse

    timings = dict.fromkeys(STAGES, 0.0)
    warehouse = Warehouse(database=str(work / "warehouse.duckdb"))
    with warehouse.connect() as con:
        _timed_pipeline(con, work, timings)
        alerts = con.execute("select count(*) from drift_alerts where status = 'alert'").fetchone()[0]
        rejects = con.execute("select count(*) from rejects").fetchone()[0]
    counts = {k: int(timings.pop(k)) for k in ("lots_relieved", "harvests")}
    return {**{f"{s}_s": v for s, v in timings.items()}, **counts, "pipeline_rss_mb": _peak_rss_mb(),
            "alerts": alerts, "rejects": rejects}


def _timed_pipeline(con, work: Path, timings: dict) -> None:
    from rebal_pipeline import settings
    from rebal_pipeline.core.landing import land_feed
    from rebal_pipeline.core.policy import load_policy
    from rebal_pipeline.core.sql_models import load_project, materialize_model, replace_partition

    started = time.perf_counter()
    land_feed(con, work / "feeds" / BENCH_AS_OF.isoformat(), BENCH_AS_OF, work / "archive")
    policy = load_policy().bands_frame().with_columns(as_of=BENCH_AS_OF)
    replace_partition(con, "drift_policy", BENCH_AS_OF, policy.to_arrow())
    timings["ingest"] = time.perf_counter() - started

    stage_of = _stage_of_models()
    for model in load_project(settings.sql_dir()).values():
        if model.name == "int_tlh_flags":  # reads rebal's basis ledger (core/basis_ledger_store.py), written first
            from rebal_pipeline.core.basis_ledger_store import write_basis_ledger

            write_basis_ledger(con, BENCH_AS_OF)
        t0 = time.perf_counter()
        materialize_model(con, model, BENCH_AS_OF)
        timings[stage_of[model.name]] += time.perf_counter() - t0

    from rebal_pipeline.core.proposals import propose_trades

    t0 = time.perf_counter()
    parts: dict[str, float] = {}
    outcome = propose_trades(con, BENCH_AS_OF, load_policy(), timings=parts)
    timings["trades"] = time.perf_counter() - t0
    timings["tax"] = parts.get("tax", 0.0)
    timings["lots_relieved"] = outcome.tax_impact.height
    timings["harvests"] = int(outcome.recommendations.filter(outcome.recommendations["kind"] == "harvest").height)


def _dagster(work: Path) -> dict:
    from dagster import DagsterInstance, Definitions, define_asset_job

    from rebal_pipeline.defs.feed.assets import assets as feed_assets
    from rebal_pipeline.defs.trades.assets import assets as trade_assets
    from rebal_pipeline.defs.warehouse.assets import build_sql_assets, drift_policy
    from rebal_pipeline.defs.workflow.anchor import assets as audit_record_assets
    from rebal_pipeline.defs.workflow.assets import assets as workflow_assets
    from rebal_pipeline.progress import RunProgress, execute_with_progress
    from rebal_pipeline.resources import resources_for
    from rebal_pipeline.settings import load_settings

    started = time.perf_counter()
    # What dagster.materialize does (one asset job over every asset), with the run id chosen up
    # front so the progress listener is on the instance before the run's first event.
    defs = Definitions(
        jobs=[define_asset_job("benchmark_day")],
        assets=[*feed_assets, drift_policy, *build_sql_assets(), *trade_assets, *workflow_assets,
                *audit_record_assets],
        # The resources of a sandbox whose files are all under the work folder (the one place
        # resources are chosen: resources_for).
        resources=resources_for(load_settings({
            "REBAL_HOME": str(work), "REBAL_SANDBOX": "1", "REBAL_WAREHOUSE": str(work / "dagster_warehouse.duckdb"),
            "REBAL_FEED_ROOT": str(work / "feeds"), "REBAL_ARCHIVE_ROOT": str(work / "archive"),
            "REBAL_WASH_SALE_OVERRIDES": str(work / "no_overrides.csv"),
            "REBAL_WORKFLOW_DB_URL": f"sqlite:///{work / 'workflow.sqlite'}"})),
    )
    result = execute_with_progress(
        defs.resolve_job_def("benchmark_day"), DagsterInstance.ephemeral(), RunProgress("benchmark"),
        partition_key=BENCH_AS_OF.isoformat(),
        # Progress comes from the event stream; the console shows Dagster's warnings and failures only.
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
    )
    return {"dagster_s": time.perf_counter() - started, "dagster_ok": result.success,
            "dagster_rss_mb": _peak_rss_mb()}


def _machine() -> str:
    cpus = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import duckdb
    import polars

    return (f"{platform.system()} {platform.machine()}, {cpus} cores, {mem:.0f} GiB RAM, Python "
            f"{platform.python_version()}, duckdb {duckdb.__version__}, polars {polars.__version__}")


def run_benchmark(sizes: list[int], output: Path, work_dir: Path | None = None) -> int:
    rows = []
    for accounts in sizes:
        with tempfile.TemporaryDirectory(dir=work_dir, prefix=f"bench-{accounts}-") as tmp:
            work = Path(tmp)
            print(f"[benchmark] {accounts:,} accounts: generating …", file=sys.stderr, flush=True)
            row = {"target_accounts": accounts, **_child("generate", accounts, work)}
            print(f"[benchmark] {accounts:,} accounts: pipeline …", file=sys.stderr, flush=True)
            row.update(_child("pipeline", accounts, work))
            print(f"[benchmark] {accounts:,} accounts: through Dagster …", file=sys.stderr, flush=True)
            row.update(_child("dagster", accounts, work))
            rows.append(row)
    table = format_table(rows)
    print(table)
    output.write_text(
        "# Benchmarks\n\n"
        "Written by `./run rebal benchmark` (add `--million` for 1M accounts). Each book is a sandbox\n"
        "book with an equity shock of −12% (many accounts drift). Stage times are the code the Dagster\n"
        "assets run, timed stage by stage in a fresh process; *feed→alerts* is their sum (the daily\n"
        "budget: 100k accounts ≤ 15 s, 1M ≤ 120 s within 6 GB); *via Dagster* is the same day\n"
        "materialised through Dagster in-process (orchestration overhead included), ending with\n"
        "`pending_recommendations`: every recommendation and harvest published with its package\n"
        "(trades, holdings, bands, tax) into the workflow store (SQLite here) and the audit chain.\n"
        "Peak RSS is the\n"
        "child process's own maximum resident set.\n\n"
        f"Machine: {_machine()}. Run on {date.today().isoformat()}.\n\n"
        f"{table}\n"
    )
    print(f"\nwritten to {output}", file=sys.stderr)
    return 0 if all(r["dagster_ok"] for r in rows) else 1


def format_table(rows: list[dict]) -> str:
    header = ("| accounts | positions | lots | generate s | ingest s | holdings s | drift s | alerts s "
              "| **feed→alerts s** | trade_proposals s | of which tax s | lots relieved | harvests "
              "| peak RSS MB | via Dagster s (all assets) | Dagster peak RSS MB | alerts | rejects |")
    lines = [header, "|" + "|".join(["---:"] * 18) + "|"]
    for r in rows:
        total = sum(r[f"{s}_s"] for s in STAGES if s not in ("trades", "tax"))
        lines.append(
            f"| {r['accounts']:,} | {r['positions']:,} | {r['lots']:,} | {r['generate_s']:.1f} "
            f"| {r['ingest_s']:.2f} | {r['holdings_s']:.2f} | {r['drift_s']:.2f} | {r['alerts_s']:.2f} "
            f"| **{total:.1f}** | {r['trades_s']:.2f} | {r['tax_s']:.2f} | {r['lots_relieved']:,} | {r['harvests']:,} "
            f"| {r['pipeline_rss_mb']:,.0f} | {r['dagster_s']:.1f} "
            f"| {r['dagster_rss_mb']:,.0f} | {r['alerts']:,} | {r['rejects']:,} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    mode, accounts, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    result = {"generate": lambda: _generate(accounts, work), "pipeline": lambda: _pipeline(work),
              "dagster": lambda: _dagster(work)}[mode]()
    print(json.dumps(result))
