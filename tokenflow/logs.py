"""Process-wide logging for the pipeline's entry points: one format, secrets redacted."""

from __future__ import annotations

import logging

from tokenflow.redaction import RedactingFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr at ``level`` in the pipeline's format; every record passes redaction."""
    logging.basicConfig(level=level, format=FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
