"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class MpqError(Exception):
    """Bad input or an impossible request; the message says what to do."""
