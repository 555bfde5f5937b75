"""Whole folders replaced by renames only: a reader sees the old folder or the new one, never half."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def swap_in(staging: Path, target: Path) -> None:
    """Replace `target` (a folder, maybe absent) by the complete folder `staging`.

    The old folder is renamed aside first and put back if the second rename fails; it is deleted
    only once the new one is in place. Both must be on the same filesystem (siblings)."""
    previous = None
    if target.exists():
        previous = target.parent / f".{target.name}.previous-{secrets.token_hex(4)}"
        os.replace(target, previous)
    try:
        os.replace(staging, target)
    except BaseException:
        if previous is not None:
            os.replace(previous, target)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
