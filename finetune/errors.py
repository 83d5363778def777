"""The project's errors: input the user can fix (exit 2), and an export that does not reproduce training."""

from __future__ import annotations

import errno


class FinetuneError(Exception):
    """A problem with the user's input: reported as one line with exit code 2."""


class VerificationError(RuntimeError):
    """The exported pipeline does not reproduce the trainer's score: the export is not trustworthy."""


# what a write meets when the place is full or closed to it: the user can fix those, as bad input
_DISK = {errno.ENOSPC: "no space left", errno.EDQUOT: "the disk quota is used up", errno.EROFS: "a read-only file system",
         errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def disk_error(e: OSError) -> FinetuneError | None:
    """A failed write as one line naming the path and the fix (None for another OSError)."""
    if e.errno not in _DISK:
        return None
    where = f" writing {e.filename}" if e.filename else ""
    return FinetuneError(f"{_DISK[e.errno]}{where}; free space there or point the run elsewhere (runs_dir=..., "
                         "FINETUNE_CACHE, HF_DATASETS_CACHE)")
