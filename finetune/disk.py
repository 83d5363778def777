"""Writes that fail for want of room (a full disk, a quota) or of permission (a read-only place): one line naming
the path, the bytes needed where they are known, the bytes free there, and the fix. The user can fix those, so they
are errors of input (FinetuneError, exit 2), not tracebacks.

    disk.check_room(cache, needed, "bundled asset 'minilm'", "set FINETUNE_CACHE=<a directory with room>")
    except OSError as e: raise disk.write_error(e, cache, needed, "bundled asset 'minilm'", fix) from e
    except OSError as e: raise disk.fault(e) or e      # the command line: a write fault of unknown size, else as it was
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from finetune.errors import FinetuneError

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")
_CLOSED = {errno.EROFS, errno.EACCES, errno.EPERM}  # a read-only file system, no permission


def is_full(error: BaseException | str | None) -> bool:
    """Whether an error, or one it was raised from, is a full disk or quota (libraries that write through Rust or C,
    e.g. safetensors, and other programs, e.g. pip, say so only in their message)."""
    if isinstance(error, str):
        return any(text in error for text in _FULL_TEXT)
    while error is not None:
        if getattr(error, "errno", None) in _FULL or any(text in str(error) for text in _FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def is_write_fault(error: BaseException) -> bool:
    """A full disk or quota, or a place closed to writing."""
    return is_full(error) or getattr(error, "errno", None) in _CLOSED


def fault(error: OSError) -> FinetuneError | None:
    """A write fault that reached the command line, its size unknown: one line naming the file (None for another
    OSError, which stays a traceback)."""
    if not is_write_fault(error):
        return None
    path = Path(error.filename) if error.filename else None
    return write_error(error, path, None, None, "free space there or point the run elsewhere (runs_dir=..., "
                       "FINETUNE_CACHE, HF_DATASETS_CACHE)")


def free_bytes(path: Path) -> int | None:
    """Bytes free for this user on the filesystem holding path (its nearest existing parent), None when unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_room(path: Path, needed: int | None, what: str, fix: str) -> None:
    """Refuse, before writing anything, to write `needed` bytes where fewer are free."""
    free = free_bytes(path)
    if needed and free is not None and free < needed:
        raise FinetuneError(f"not enough space to write {what} to {path}: it needs about {size(needed)}, "
                            f"{size(free)} free there; {fix}")


def write_error(error: BaseException, path: Path | None, needed: int | None, what: str | None, fix: str,
                full: bool | None = None) -> FinetuneError:
    """The one-line error of a failed write (whatever was half-written has been removed by the caller). `full`: the
    disk is known to be full although the error does not say so (None: the error tells)."""
    where = " ".join(x for x in (what, "to" if what and path else None, str(path) if path else None) if x)
    free = free_bytes(path) if path else None
    room = f"{size(free)} free there" if free is not None else "free space unknown"
    if is_full(error) if full is None else full:
        need = f"it needs about {size(needed)}, " if needed else ""
        return FinetuneError(f"no space left on device writing {where}: {need}{room}; {fix}")
    reason = getattr(error, "strerror", None) or " ".join(str(error).split()) or type(error).__name__
    return FinetuneError(f"cannot write {where} ({reason}); {fix}")


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
