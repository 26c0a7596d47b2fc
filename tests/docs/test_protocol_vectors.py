"""docs/protocol.md's end-to-end test vectors are the ones the code reproduces."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_vectors_equal_the_checked_vector_file() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    section = doc.split("### 10.7 Test vectors", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.DOTALL)
    assert block is not None, "section 10.7 has no JSON block"
    documented = json.loads(block.group(1))
    checked = json.loads((ROOT / "tests/rescue/client/vectors/e2e-v1.json").read_text())
    assert documented == checked
