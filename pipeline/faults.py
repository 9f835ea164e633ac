"""Fault injection for the tests (tests/test_extract.py, tests/test_faults.py,
tests/cache/test_remote_store.py): environment variables the extraction workers read, and the
hooks they turn into. Never set in real runs; with none set, every hook here is None or False.

    monkeypatch.setenv(faults.KILL_ENV, "shard-000001")    # that shard's worker dies once, mid-shard
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["KILL_ENV", "WRITE_ENV", "PUBLISH_ENV", "kill_armed", "kill_once", "publish_fault", "worker_env",
           "write_fault"]

# KILL: the worker SIGKILLs itself once, mid-shard, in the named shard.
# WRITE, "{shard}:{fault}": once the shard's first arrays are on disk, its write fails as a full
# disk ("enospc") or a permission error ("eacces") would, or hangs ("stall") so that a test can
# SIGKILL the whole job while a half-written shard is on disk.
# PUBLISH: the worker SIGKILLs itself once in the named shard, when the whole shard is written
# (for a cache at a URL: uploaded) but not yet published (renamed in, or marked complete).
KILL_ENV = "ALIGNKD_FAULT_KILL_WORKER_IN_SHARD"
WRITE_ENV = "ALIGNKD_FAULT_WRITE"
PUBLISH_ENV = "ALIGNKD_FAULT_KILL_BEFORE_PUBLISH"


def worker_env() -> dict | None:
    """The Ray `runtime_env` that hands the faults set in this process to the teacher actors
    (None when none is set): a Ray started before the test set them would not pass them on."""
    armed = {name: os.environ[name] for name in (KILL_ENV, WRITE_ENV, PUBLISH_ENV) if name in os.environ}
    return {"env_vars": armed} if armed else None


# A fault marker `.fault-{shard}` in the cache root says the fault has fired: a restarted
# worker must not fire it again.
def _done(cache_root: Path | str, shard_name: str) -> bool:
    if isinstance(cache_root, Path):
        return (cache_root / f".fault-{shard_name}").exists()
    from alignkd.cache.remote import filesystem

    fs, root = filesystem(cache_root)
    fs.invalidate_cache(root)
    return fs.exists(f"{root}/.fault-{shard_name}")


def kill_once(cache_root: Path | str, shard_name: str) -> None:
    if isinstance(cache_root, Path):
        (cache_root / f".fault-{shard_name}").touch()
    else:
        from alignkd.cache.remote import filesystem

        fs, root = filesystem(cache_root)
        fs.pipe_file(f"{root}/.fault-{shard_name}", b"")
    os.kill(os.getpid(), 9)


def publish_fault(cache_root: Path | str, shard_name: str) -> Callable[[], None] | None:
    """The PUBLISH_ENV fault for this shard, as a write_shard `before_publish` hook."""
    if os.environ.get(PUBLISH_ENV) != shard_name or _done(cache_root, shard_name):
        return None
    return lambda: kill_once(cache_root, shard_name)


def write_fault(shard_name: str) -> Callable[[str], None] | None:
    """The WRITE_ENV fault for this shard, as a write_shard `after_array` hook."""
    target, _, fault = os.environ.get(WRITE_ENV, "").rpartition(":")
    if target != shard_name:
        return None
    if fault not in ("enospc", "eacces", "stall"):
        raise ValueError(f"{WRITE_ENV}: unknown fault {fault!r}")
    written: list[str] = []

    def inject(array: str) -> None:
        written.append(array)
        if len(written) < 3:  # a few arrays on disk first: a half-written shard
            return
        if fault == "stall":
            time.sleep(600)
        code = errno.ENOSPC if fault == "enospc" else errno.EACCES
        raise OSError(code, f"{os.strerror(code)} (injected by {WRITE_ENV})")

    return inject


def kill_armed(cache_root: Path | str, shard_name: str) -> bool:
    """Whether the KILL_ENV fault is set for this shard and has not fired yet."""
    return os.environ.get(KILL_ENV) == shard_name and not _done(cache_root, shard_name)
