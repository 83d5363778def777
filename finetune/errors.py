class FinetuneError(Exception):
    """A problem with the user's input: reported as one line with exit code 2."""
