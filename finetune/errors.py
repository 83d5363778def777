class FinetuneError(Exception):
    """A problem with the user's input: reported as one line with exit code 2."""


class VerificationError(RuntimeError):
    """The exported pipeline does not reproduce the trainer's score: the export is not trustworthy."""
