"""The one exception type that means "the user gave us something we cannot use"."""


class MlxLlamaError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
