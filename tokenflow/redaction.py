"""Keep secrets out of logs, stdout and MLflow: credentials inside URLs, secret-named config
values, and the values of secret environment variables are replaced by ``***``."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]+)@")
_SECRET_NAME = re.compile(r"(password|passwd|secret|token|access_key|api_key|private_key|credentials?)$",
                          re.IGNORECASE)
_MIN_SECRET_LEN = 6  # shorter environment values would mask ordinary words


def _secret_values() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with URL user-info and the values of secret environment variables masked."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    for value in _secret_values():
        text = text.replace(value, MASK)
    return text


def redact_config(value: Any, key: str = "") -> Any:
    """A config tree with secret-named entries masked and every string redacted."""
    if isinstance(value, dict):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_config(v, key) for v in value]
    if value is not None and _SECRET_NAME.search(key):
        return MASK
    return redact(value) if isinstance(value, str) else value


class RedactingFilter(logging.Filter):
    """A log filter that redacts each record's rendered message (and its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True

