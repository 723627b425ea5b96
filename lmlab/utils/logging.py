"""Logging setup for the `lmlab` command. Library modules only do `log = logging.getLogger(__name__)`.

Progress and notes go to standard error as plain messages (`-v` adds debug messages, `-q` keeps only
warnings and errors); what a command produces (a table, generated text) goes to standard output.
Long loops keep their tqdm bars; `tqdm.contrib.logging.logging_redirect_tqdm` keeps log lines from
breaking a bar.
"""

from __future__ import annotations

import logging
import sys

_HANDLER_NAME = "lmlab-cli"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (so redirected or captured stderr works)."""

    def __init__(self) -> None:
        super().__init__()
        self.set_name(_HANDLER_NAME)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def setup_logging(verbosity: int = 0) -> None:
    """Show lmlab's messages on stderr: INFO by default, DEBUG for verbosity > 0, WARNING for < 0.
    Other libraries' loggers stay at WARNING. Calling it again replaces the earlier setup."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    level = logging.INFO if verbosity == 0 else logging.DEBUG if verbosity > 0 else logging.WARNING
    logging.getLogger("lmlab").setLevel(level)
