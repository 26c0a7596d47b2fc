"""The shipped systemd unit is valid and keeps the promises the relay relies on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from rescue.config import Config

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "beach-rescue.service"


def unit_section(name: str) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return dict(parser[name])


def test_unit_uses_notify_and_drains_within_the_stop_timeout() -> None:
    service = unit_section("Service")
    assert service["Type"] in ("notify", "notify-reload")
    assert service["KillMode"] == "mixed"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert int(service["TimeoutStopSec"]) > Config().drain_timeout_s
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    for hardening in ("DynamicUser", "NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert service[hardening] == "yes"
    assert service["ProtectSystem"] == "strict"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart exists, so point it at this checkout's entry point.
    exe = shutil.which("beach-rescue") or str(Path(__file__).resolve().parents[2]
                                              / ".venv" / "bin" / "beach-rescue")
    text = UNIT.read_text().replace("/opt/beach-rescue/bin/beach-rescue", exe)
    unit = tmp_path / "beach-rescue.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "beach-rescue.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
