"""One driver per results folder, checked before the first cell, with leftovers of a crash cleaned.

``open_results_dir`` is what a run does before it plans anything that costs time:

1. the folder must be writable with room for records (``ResultsDirError`` naming the folder and
   the fix, before any model loads — not two tracebacks after the first evaluation);
2. an advisory ``fcntl.flock`` on ``<folder>/.lock`` makes it the folder's only driver: a second
   ``qvlm-bench run`` stops at once, naming the holder's pid, instead of computing every cell
   twice. The kernel drops the lock when the holder dies (even by kill -9), so a stale lock
   file never blocks; flock is advisory and local (on NFS it may not exclude another host);
3. holding the lock, every temporary file or folder in it is a leftover of a killed run: they are
   removed, except a quantization state that was written in full but not yet renamed, which is
   adopted (its checksum verified) instead of being quantized again; unreadable lines of
   records.jsonl are moved aside (``records.set_aside_unreadable``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .records import set_aside_unreadable

log = logging.getLogger("qvlm_bench")

MIN_FREE_BYTES = 64 * 2**20  # records and per-question samples of a suite are a few MB
LOCK_NAME = ".lock"


class ResultsDirError(RuntimeError):
    """The results folder cannot be used (not writable, full, or another run holds it)."""


def check_writable(folder: Path, min_free: int = MIN_FREE_BYTES) -> None:
    """Raise ``ResultsDirError`` unless ``folder`` can be created, written and has ``min_free`` bytes."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe.{os.getpid()}.tmp"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ResultsDirError(f"results folder {folder} is not writable ({exc.strerror or exc}); make it "
                              "writable or give the run another folder with --output") from None
    free = shutil.disk_usage(folder).free
    if free < min_free:
        raise ResultsDirError(f"results folder {folder} has {free / 2**20:.0f} MB free, less than the "
                              f"{min_free / 2**20:.0f} MB records and samples need; free space there or "
                              "give the run another folder with --output")


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def results_lock(folder: Path) -> Iterator[Path]:
    """Hold the folder's advisory lock for the ``with`` block; ``ResultsDirError`` if held."""
    lock_path = folder / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ResultsDirError(
                f"results folder {folder} is in use by another qvlm-bench run (pid {_holder(lock_path)}); "
                "wait for it to finish (it records every cell; a later run skips them) or give this run "
                "another folder with --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _writer_alive(name: str) -> bool:
    """Whether the process named in a temporary's name (``.<name>.<pid>.<hex>.tmp``) still runs: a
    ``qvlm-bench table`` needs no lock, and its staging folder must survive a driver starting."""
    parts = name.split(".")
    if len(parts) < 4 or not parts[-3].isdigit():
        return False
    try:
        os.kill(int(parts[-3]), 0)
    except PermissionError:  # it exists, under another user
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


def clean_stale_temps(folder: Path) -> dict[str, int]:
    """Remove the temporaries killed runs left in ``folder`` (call only while holding its lock);
    adopt quantization states that were complete but not yet renamed. Returns counts."""
    from .quant.state import QuantState, is_state_temp, state_key_of_temp

    counts = {"removed": 0, "adopted": 0}
    candidates = [p for p in (folder, folder / "samples", folder / "perf-detail", folder / "meta") if p.is_dir()]
    for parent in candidates:
        for p in parent.glob(".*.tmp"):
            if _writer_alive(p.name):
                continue
            if p.is_file():
                p.unlink(missing_ok=True)
                counts["removed"] += 1
            elif p.is_dir():  # a leaderboard being staged
                shutil.rmtree(p, ignore_errors=True)
                counts["removed"] += 1
    states = folder / "cache" / "states"
    if states.is_dir():
        for p in sorted(states.iterdir()):
            if not (p.is_dir() and is_state_temp(p.name)) or _writer_alive(p.name):
                continue
            target = states / state_key_of_temp(p.name)
            if not (target / "state.json").exists() and QuantState.verify(p) is None:
                if target.exists():
                    shutil.rmtree(target)
                p.rename(target)
                counts["adopted"] += 1
                log.info("adopted the complete cached state %s left by a killed run", target)
            else:
                shutil.rmtree(p, ignore_errors=True)
                counts["removed"] += 1
    if counts["removed"]:
        log.info("removed %d temporary file(s)/folder(s) left by a killed run in %s", counts["removed"], folder)
    return counts


@contextmanager
def open_results_dir(folder: str | Path) -> Iterator[Path]:
    """Check, lock and tidy ``folder`` for one run (module doc); the lock is held inside the block."""
    folder = Path(folder)
    check_writable(folder)
    with results_lock(folder):
        clean_stale_temps(folder)
        set_aside_unreadable(folder / "records.jsonl")
        yield folder
