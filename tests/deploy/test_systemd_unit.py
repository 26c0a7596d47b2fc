"""The shipped systemd units are valid and keep the promises the relay and the probe rely on."""

from __future__ import annotations

import configparser
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rescue.cli import main
from rescue.config import Config

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
SHIPPED_EXE = "/opt/beach-rescue/bin/beach-rescue"
PROBE_TEXTFILE = "/var/lib/node_exporter/textfile_collector/beach_rescue_probe.prom"


def unit_file(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def unit_section(name: str, unit: str = "beach-rescue.service") -> dict[str, str]:
    return dict(unit_file(unit)[name])


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
@pytest.mark.parametrize("name", ["beach-rescue.service", "beach-rescue-probe.service",
                                  "beach-rescue-probe.timer"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, name: str) -> None:
    # verify checks that ExecStart exists, so point it at this checkout's entry point. The
    # units sit side by side, as installed, so the timer finds the service it starts.
    exe = shutil.which("beach-rescue") or str(SYSTEMD.parent / ".venv" / "bin" / "beach-rescue")
    for shipped in ("beach-rescue.service", "beach-rescue-probe.service",
                    "beach-rescue-probe.timer"):
        text = (SYSTEMD / shipped).read_text().replace(SHIPPED_EXE, exe)
        (tmp_path / shipped).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                            capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if name in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_the_probe_timer_runs_the_oneshot_service_every_minute() -> None:
    timer = unit_section("Timer", "beach-rescue-probe.timer")
    service = unit_section("Service", "beach-rescue-probe.service")
    assert timer["OnCalendar"] == "minutely"
    assert timer["Unit"] == "beach-rescue-probe.service"
    assert service["Type"] == "oneshot"
    assert 0 < int(service["TimeoutStartSec"]) < 60
    relay_service = unit_section("Service")
    for hardening in ("DynamicUser", "ProtectSystem", "NoNewPrivileges", "PrivateTmp",
                      "ProtectHome", "RestrictAddressFamilies", "SystemCallFilter",
                      "CapabilityBoundingSet", "ProtectKernelTunables", "LockPersonality"):
        assert service[hardening] == relay_service[hardening], hardening


def test_the_probe_units_command_line_runs_and_writes_the_textfile(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    service = unit_section("Service", "beach-rescue-probe.service")
    argv = shlex.split(service["ExecStart"])
    assert argv[:2] == [SHIPPED_EXE, "probe"]
    assert PROBE_TEXTFILE in argv
    assert service["ReadWritePaths"] == str(Path(PROBE_TEXTFILE).parent)
    (tmp_path / "service-key").write_text("probe-unit-test-service-key\n")
    with socket.socket() as s:  # an OS-chosen port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    values = {"${PROBE_URL}": f"ws://127.0.0.1:{dead}/ws",
              "${PROBE_CONTROL_PLANE}": f"http://127.0.0.1:{dead}",
              "%d/service-key": str(tmp_path / "service-key"),
              PROBE_TEXTFILE: str(tmp_path / "probe.prom")}
    code = main(["probe", *(values.get(a, a) for a in argv[2:] if a != "$PROBE_ARGS")])
    _, err = capsys.readouterr()
    assert code == 3
    assert err.startswith("probe failed at token: control plane: cannot connect")
    families = {family.name: family for family in
                text_string_to_metric_families((tmp_path / "probe.prom").read_text())}
    assert [s.labels["step"] for s in families["beach_rescue_probe_failure_step"].samples] == [
        "token"]
