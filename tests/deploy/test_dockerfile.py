"""The Dockerfile keeps its promises (no Docker engine runs here, so it is read, not built)."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    out = []
    for raw in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_runs_as_a_non_root_user_with_the_supervisor_as_pid_1() -> None:
    steps = instructions()
    final_stage = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM"):]
    users = [v for k, v in final_stage if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["beach-rescue", "serve"]') in final_stage  # exec form: PID 1
    assert ("STOPSIGNAL", "SIGTERM") in final_stage


def test_has_a_healthcheck_against_healthz() -> None:
    checks = [v for k, v in instructions() if k == "HEALTHCHECK"]
    assert len(checks) == 1 and "/healthz" in checks[0]


def test_uses_a_slim_python_3_11_base() -> None:
    bases = [v.split()[0] for k, v in instructions() if k == "FROM"]
    assert bases and all(b.startswith("python:3.11-slim") for b in bases)
