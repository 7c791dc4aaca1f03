"""One exception type for bad user input: the CLI prints its message as one line and exits 2."""


class LBSearchError(ValueError):
    """A user-facing error whose message already says where (file, key) and what is allowed."""
