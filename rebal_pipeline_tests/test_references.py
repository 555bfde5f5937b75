"""Every file a comment, docstring, asset description or doc points to exists in the repo."""

import re

import pytest

from rebal_pipeline import settings

ROOT = settings.REPO_ROOT
# A path-like mention: a/b/c.ext with one of the extensions rebal's files have, or a bare *.md name.
MENTION = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.(?:md|py|sql|ya?ml|j2|xml|mako))(?![\w/])")
# Names that look like files but are not paths in this repo (APIs, examples of other repos' files).
NOT_PATHS = {"MetadataValue.md", "outcome.md", "connections.yaml", "dagster.yaml", "workspace.yaml",
             "users.csv", "setup.py", "conftest.py", "__init__.py", "__main__.py",
             "verify_export.py",  # the file docs/audit.md tells an examiner to save its verifier as
             "spec/FIX44.xml"}    # the path inside QuickFIX's own repository (docs/custodian_orders.md)


def _sources():
    for pattern in ("rebal_pipeline/**/*.py", "rebal_pipeline/**/*.j2", "rebal_pipeline/**/*.yaml", "dbt_like_sql/**/*",
                    "docs/*.md", "README.md", "BENCHMARKS.md", "pyproject.toml", "dagster.yaml", "run"):
        yield from (p for p in ROOT.glob(pattern) if p.is_file())


def _exists(mention: str, where) -> bool:
    candidates = [ROOT / mention, ROOT / "docs" / mention, ROOT / "rebal_pipeline" / mention, where.parent / mention,
                  ROOT / "rebal_pipeline_tests" / mention, ROOT / "dbt_like_sql" / mention]
    if any(c.exists() for c in candidates):
        return True
    # A module named relative to its package folder (e.g. "core/pii.py", "workflow/gate.py").
    return any(any(ROOT.glob(f"{top}/**/{mention}")) for top in ("rebal_pipeline", "rebal_pipeline_tests", "dbt_like_sql"))


def test_every_file_mentioned_exists():
    missing = []
    for path in _sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for mention in MENTION.findall(line):
                if mention in NOT_PATHS or mention.startswith(("http", "www.", "REBAL_")) or "<" in mention:
                    continue
                if not _exists(mention, path):
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {mention}")
    assert missing == []


@pytest.mark.parametrize("name", ["ARCHITECTURE.md", "STYLE.md", "FEED_CONTRACT.md"])
def test_no_reference_to_the_design_notes_outside_the_repo(name):
    offenders = [str(p.relative_to(ROOT)) for p in _sources() if name in p.read_text(encoding="utf-8", errors="replace")]
    assert offenders == []
