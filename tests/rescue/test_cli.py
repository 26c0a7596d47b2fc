"""The ``beach-rescue`` command outside serve and token: ``config check`` hides credentials."""

from __future__ import annotations

import json

import pytest

from rescue.cli import main, printable_settings


def test_credentials_are_not_printed() -> None:
    shown = printable_settings({
        "admin_key": "adm1n", "metrics_key": "", "service_keys": "a,b",
        "redis_url": "redis://user:s3cret@127.0.0.1:6379/0", "port": 9443,
        "token_keys": "/etc/beach-rescue/keys"})
    assert shown == {
        "admin_key": "[redacted]", "metrics_key": "", "service_keys": "[redacted]",
        "redis_url": "redis://user:[redacted]@127.0.0.1:6379/0", "port": 9443,
        "token_keys": "/etc/beach-rescue/keys"}


def test_config_check_prints_settings_without_the_admin_key(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEACH_RESCUE_ADMIN_KEY", "do-not-print-me")
    assert main(["config", "check"]) == 0
    out = capsys.readouterr().out
    assert "do-not-print-me" not in out
    assert json.loads(out)["admin_key"] == "[redacted]"
