"""Secrets never reach logs, stdout or MLflow params and tags."""

from __future__ import annotations

import logging

from tokenflow.redaction import MASK, RedactingFilter, redact, redact_config


def test_urls_lose_their_credentials_and_secret_env_values_are_masked(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-hunter2")
    monkeypatch.setenv("AWS_REGION", "us-east-1")  # not a secret: stays
    text = ("tracking http://alice:hunter2-hunter2@mlflow:5000/x, db postgresql+psycopg2://u:pw@db/m, "
            "key s3cr3t-value-123 in us-east-1, plain s3://bucket/prefix")
    clean = redact(text)
    assert "hunter2" not in clean and "s3cr3t" not in clean and ":pw@" not in clean
    assert f"http://{MASK}@mlflow:5000/x" in clean and "us-east-1" in clean and "s3://bucket/prefix" in clean


def test_secret_named_config_entries_are_masked():
    config = {"tracking": {"tracking_uri": "https://bob:pw@host", "experiment": "tokenflow"},
              "storage": {"secret": "abc", "api_key": "k", "token": None, "keys": ["a"]}}
    assert redact_config(config) == {"tracking": {"tracking_uri": f"https://{MASK}@host", "experiment": "tokenflow"},
                                     "storage": {"secret": MASK, "api_key": MASK, "token": None, "keys": ["a"]}}


def test_log_records_are_redacted_messages_and_tracebacks(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-hunter2")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "connecting to %s", ("http://a:b@h",), None)
    RedactingFilter().filter(record)
    assert record.getMessage() == f"connecting to http://{MASK}@h"
    try:
        raise RuntimeError("refused with hunter2-hunter2")
    except RuntimeError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    RedactingFilter().filter(record)
    assert "hunter2" not in record.exc_text and MASK in record.exc_text
