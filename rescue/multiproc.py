"""The prometheus-client multiprocess directory, prepared before the client is imported.

prometheus-client chooses between in-process and memory-mapped values when it is first
imported, from ``PROMETHEUS_MULTIPROC_DIR``; so this module must not import it, and
:func:`prepare_multiprocess_dir` must run before anything imports :mod:`rescue.metrics`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(path: Path) -> Path:
    """Create (or empty) ``path`` and export it for this process and its children."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prepare_multiprocess_dir must run before prometheus_client "
                           "is imported")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(path)
    return path
