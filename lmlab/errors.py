"""One exception type for problems the user can fix (bad paths, bad config, bad data).

The CLI prints these as a single `error: ...` line and exits non-zero, without a traceback.
"""


class LmlabError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
