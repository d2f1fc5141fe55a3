"""User-facing errors. The CLI prints these as one line (no traceback) and exits non-zero."""


class MobiletuneError(Exception):
    """A problem with the user's input (a file, key, value or option), not a bug."""


class CheckpointError(MobiletuneError):
    """A checkpoint that is missing, truncated, or does not match its config."""


class DataError(MobiletuneError):
    """Text or records that cannot be used: empty, not UTF-8, missing fields, too long."""
