"""Writing output files safely: atomic replacement, and errors that name the path and the cause.

Every file solq writes for later use (checkpoints, metrics.json, COCO results, the report) goes through
:func:`write_atomic`: the bytes go to a temporary file beside the target, are flushed and fsynced, and only
then replace the target with ``os.replace``. A full disk, a read-only folder or a kill at any moment leaves
either the old file or the new one, never a partial one; a failure raises :class:`OutputWriteError`, whose
message names the path and the cause (e.g. ``ENOSPC: No space left on device``).

Temporary files are named ``.<name>.<random>.tmp``; :func:`remove_partial_writes` deletes the ones still
being written (an emergency exit calls it before ``os._exit``) and blocks any further replacement.
"""
from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["OutputWriteError", "write_atomic", "write_text_atomic", "check_writable", "remove_partial_writes",
           "describe_os_error"]

_PENDING: set[Path] = set()  # temporary files being written now (any thread)
_REPLACE_LOCK = threading.Lock()  # held while a temp file becomes the target, and forever by an emergency exit


class OutputWriteError(OSError):
    """An output file or folder cannot be written; the message names the path and the cause.
    ``errno`` is the underlying error number when there is one (``errno.ENOSPC`` for a full disk)."""

    def __init__(self, message: str, error_number: int | None = None):
        super().__init__(message)
        self.errno = error_number


def describe_os_error(exc: BaseException) -> str:
    """A short cause for an OSError: ``"ENOSPC: No space left on device"``; other errors as ``str(exc)``."""
    number = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and number in errno.errorcode:
        return f"{errno.errorcode[number]}: {exc.strerror or os.strerror(number)}"
    return str(exc) or type(exc).__name__


def _temp_file(path: Path) -> tuple[BinaryIO, Path]:
    """A new temporary file beside ``path``, open for binary writing; -> (file, its path)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return os.fdopen(fd, "wb"), Path(tmp)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse fsync on folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], *, what: str = "file") -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which is flushed,
    fsynced and renamed over ``path``. ``what`` names the file in errors ("checkpoint", "metrics file").

    Returns the path written. Raises :class:`OutputWriteError` naming the path and the cause when the folder
    cannot be created or the write, flush or rename fails; the previous file at ``path`` is then unchanged
    and the temporary file is removed. Other exceptions of ``write`` also remove it and propagate as they are.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f, tmp = _temp_file(path)
        _PENDING.add(tmp)
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        with _REPLACE_LOCK:
            os.replace(tmp, path)
            _PENDING.discard(tmp)
    except BaseException as exc:
        _discard(tmp)
        cause = _os_error_behind(exc)
        if cause is None:
            raise
        raise OutputWriteError(f"cannot write the {what} {path}: {describe_os_error(cause)}; "
                               f"any previous {path.name} is left as it was", cause.errno) from exc
    _sync_folder(path.parent)
    return path


def _os_error_behind(exc: BaseException) -> OSError | None:
    """``exc`` when it is an OSError, else the first OSError it was raised from or while handling: a writer
    may hide the disk's error behind its own (torch.save's zip writer raises RuntimeError "unexpected pos"
    while closing after a failed write)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _discard(tmp: Path | None) -> None:
    if tmp is not None:
        _PENDING.discard(tmp)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder may refuse this too; the name never passes for a real file
            pass


def write_text_atomic(path: str | Path, text: str, *, what: str = "file") -> Path:
    """:func:`write_atomic` for UTF-8 text. Returns the path; raises :class:`OutputWriteError`."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data), what=what)


def check_writable(folder: str | Path, *, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and write, sync and delete a small probe file in it, so that a read-only,
    full or forbidden folder is found before any work is done. Returns the folder; raises
    :class:`OutputWriteError` naming the folder and the cause."""
    folder = Path(folder)
    probe = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f, probe = _temp_file(folder / "write-probe")
        with f:
            f.write(b"solq write probe\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        _discard(probe)
        raise OutputWriteError(f"the {what} {folder} is not writable: {describe_os_error(exc)}", exc.errno) from exc
    return folder


def remove_partial_writes() -> list[Path]:
    """Delete the temporary files being written now and stop any later rename (the lock is never released):
    for a process about to ``os._exit``. Returns the files removed."""
    _REPLACE_LOCK.acquire(timeout=5.0)  # a rename in progress takes microseconds; never wait long
    removed = []
    for tmp in list(_PENDING):
        _discard(tmp)
        removed.append(tmp)
    return removed
