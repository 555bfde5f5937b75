"""Files written once, never replaced, and the remains of killed writes cleaned up safely.

One home for the outbox's write protocol (order files in execution/submit.py, the copies for
people under outbox/approved and outbox/notifications in workflow/outbox.py):

- `write_file_once(path, data)`: a temporary dot-file `.<name>.<uuid>.tmp`, locked while written,
  fsynced, then hard-linked into place (a link fails instead of replacing a file another writer
  put there), then the directory fsynced. Readers skip dot-files, so they see no file or all of it.
- `remove_abandoned_temps(folder, name)`: a writer holds an exclusive lock on its temporary file
  (a folder: on its `.lock` sibling) while writing; the kernel drops the lock when the process
  dies, so a temporary whose lock can be taken has no live writer and is removed. A write in
  progress is left alone.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def temp_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"


def write_file_once(path: Path, data: bytes) -> bool:
    """Write `data` to `path` unless a file is there; True when this call wrote it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a second time only if a clean-up took our dot-file before we locked it
        if path.exists():
            return False
        tmp = temp_path(path)
        try:
            with open(tmp, "xb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except FileNotFoundError:
                    continue
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)  # the new directory entry survives a crash too
        return True
    return False


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def remove_abandoned_temps(folder: Path, name: str | None = None) -> list[str]:
    """Remove what killed writes left in `folder` (the names removed): the temporary dot-files and
    folders of `name` (`.<name>.<uuid>.tmp`), or of every name when `name` is None."""
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    stem = "*" if name is None else glob_escape(name)
    for tmp in sorted(folder.glob(f".{stem}.*.tmp")):
        guard = tmp.with_name(tmp.name + ".lock") if tmp.is_dir() else tmp
        try:
            handle = open(guard, "rb") if guard.exists() else None
        except FileNotFoundError:
            continue  # finished meanwhile
        try:
            if handle is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer holds it
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                guard.unlink(missing_ok=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
        finally:
            if handle is not None:
                handle.close()
    for lock in sorted(folder.glob(f".{stem}.*.tmp.lock")):  # a lock whose folder is gone
        if not lock.with_name(lock.name[:-len(".lock")]).exists():
            try:
                with open(lock, "rb") as handle:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    lock.unlink(missing_ok=True)
            except (BlockingIOError, FileNotFoundError):
                continue
    return removed
