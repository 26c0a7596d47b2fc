"""One command per bench: ``python -m benches <bench> [options]`` from the repository root.

The benches are scripts that import their helpers as top-level modules (``benches/`` on the
path), so this dispatcher puts the directory first on ``sys.path``, imports the bench's module
and runs its ``main()`` with the remaining arguments. ``python -m benches <bench> --help``
lists a bench's options.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHES = Path(__file__).resolve().parent
COMMANDS = {
    "idle": ("idle_bench", "hold N idle connections with heartbeats (default 10,000)"),
    "active": ("relay_bench", "S sessions x 64 KB/s through the relay; --find-capacity"),
    "handoff": ("handoff_bench", "hand-off cost and accept rate, 1 vs 2 workers"),
    "reconnect-storm": ("storm_bench", "SIGKILL the worker of 2,000 peers; time to all back"),
    "webrtc-compare": ("webrtc_bench", "WebSocket fallback vs aiortc WebRTC data channel"),
    "workers": ("workers_bench", "CPU per message, 2 workers vs 1"),
    "standard": ("bench_suite", "the standard set in < 10 minutes (make bench)"),
    "summary": ("bench_summary", "Markdown summary of result files"),
}


def usage() -> str:
    """The list of commands."""
    lines = ["usage: python -m benches <bench> [options]   (<bench> --help for its options)",
             ""]
    lines += [f"  {name:<16} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Dispatch ``argv[0]`` to its bench's ``main()``; return its exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"unknown bench {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCHES))
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv = [f"benches {argv[0]}", *argv[1:]]
    status = module.main()
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
