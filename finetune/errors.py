"""The project's errors: input the user can fix (exit 2; a write that finds no room or permission: finetune/disk.py),
and an export that does not reproduce training."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem with the user's input: reported as one line with exit code 2."""


class VerificationError(RuntimeError):
    """The exported pipeline does not reproduce the trainer's score: the export is not trustworthy."""

