"""One exception type for every user-facing failure: the CLI prints it as one line."""


class HarnessError(ValueError):
    """Bad input or an impossible request; the message names what is wrong."""
