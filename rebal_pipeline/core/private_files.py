"""Files and folders that hold client names and emails: the workflow store (SQLite), the
warehouse (DuckDB) and the Dagster home. When rebal creates them they are private to its user:
folders 0700, files 0600 (whatever the umask). Existing ones are left as the operator set them.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_dir(folder: Path | str) -> Path:
    """Create `folder` (and missing parents) 0700; an existing folder is not changed."""
    folder = Path(folder)
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        os.chmod(path, PRIVATE_DIR_MODE)
    return folder


def private_file(path: Path | str) -> Path:
    """Create an empty `path` 0600 when it does not exist yet (its folder 0700 when created)."""
    path = Path(path)
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE)
    except FileExistsError:
        return path
    os.close(fd)
    os.chmod(path, PRIVATE_FILE_MODE)
    return path


def make_private(*paths: Path | str) -> None:
    """chmod 0600 those of `paths` that exist and are files (e.g. a database's WAL next to it)."""
    for path in paths:
        p = Path(path)
        if p.is_file():
            os.chmod(p, PRIVATE_FILE_MODE)
