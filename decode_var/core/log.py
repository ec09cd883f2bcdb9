"""decode-var's one logger: ``logging.getLogger("decode_var")`` and its children.

Warnings and notes go to stderr as ``[decode-var] message``, written to the ``sys.stderr`` of the
moment (so redirections and test captures see them). To route them elsewhere, replace the handlers
of ``logging.getLogger("decode_var")``. Command-line results (metrics, "wrote ...") are printed by
the CLIs to stdout, not logged.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("decode_var")


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"[decode-var] {self.format(record)}", file=sys.stderr, flush=True)
        except Exception:  # a closed stream must not break training
            self.handleError(record)


if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
    logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def warn(msg: str) -> None:
    """A warning on stderr, ``[decode-var] msg``."""
    logger.warning(msg)


def note(msg: str) -> None:
    """An informational line on stderr, ``[decode-var] msg``."""
    logger.info(msg)
