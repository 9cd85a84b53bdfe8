"""One run per output folder: ``output_dir/.fastcse.lock`` holds the pid and host of the run
writing there."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from fastcse.training.ranks import on_rank0

logger = logging.getLogger("fastcse.train")

LOCK_FILE = ".fastcse.lock"


# --------------------------------------------------------------------------------------------
# One run per output folder


class OutputDirInUse(RuntimeError):
    """Another run holds the output_dir's lock."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's
        return True
    return True


class RunLock:
    """``output_dir/.fastcse.lock``: the pid and host of the run writing to the folder, created
    with O_EXCL (of two racing starts, exactly one creates it). A lock whose pid is dead on this
    host is stale (a killed run) and is taken over; a live one, or one from another host (whose
    pid cannot be checked from here), refuses the run at once."""

    STALE_UNREADABLE_S = 10.0  # a lock with no content yet is being written, unless it is older

    def __init__(self, folder: Path):
        self.folder, self.path = Path(folder), Path(folder) / LOCK_FILE
        self._content: str | None = None

    def _holder(self) -> tuple[str | None, dict | None]:
        """(the lock file's text, its live holder): (None, None) without a lock, (text, None) for a stale one."""
        try:
            text = self.path.read_text(encoding="utf-8")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, None
        try:
            info = json.loads(text)
            pid, host = int(info["pid"]), str(info["host"])
        except (ValueError, KeyError, TypeError):  # created, not yet (or never) filled
            return text, (None if age > self.STALE_UNREADABLE_S else {"pid": "?", "host": "?"})
        if host == socket.gethostname() and not _pid_alive(pid):
            return text, None
        return text, info

    def _refusal(self, holder: dict) -> OutputDirInUse:
        return OutputDirInUse(
            f"output_dir {str(self.folder)!r} is in use by another fastcse run: pid {holder.get('pid')} on "
            f"{holder.get('host')} (since {holder.get('started', '?')}; lock file {self.path}). Wait for it to end "
            "or use another output_dir; if that process is gone (a run on another host that was killed), delete "
            "the lock file.")

    def refuse_if_held(self) -> None:
        """Fails now if a live run holds the folder (before the model is loaded); writes nothing."""
        _, holder = self._holder()
        if holder is not None:
            raise self._refusal(holder)

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text, holder = self._holder()
                if holder is not None:
                    raise self._refusal(holder) from None
                if text is not None and self._holder()[0] == text:  # still the same stale lock: take it over
                    logger.warning("taking over the stale lock %s of a run that is gone: %s", self.path, text)
                    self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            self._content = content
            return
        raise OutputDirInUse(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        """Removes the lock if it is still this run's (never another run's)."""
        if self._content is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if self.path.read_text(encoding="utf-8") == self._content:
                self.path.unlink()
        self._content = None


@contextlib.contextmanager
def locked_output_dir(output_dir: Path, world: int, rank: int):
    """Holds ``output_dir``'s lock for the block; rank 0 takes it (one run, however many
    processes) and the others learn of a refusal through :func:`on_rank0`."""
    lock = RunLock(output_dir) if rank == 0 else None
    on_rank0(world, rank, lambda: lock.acquire())
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


