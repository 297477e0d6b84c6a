"""Test hooks the real stack carries (set by tests only; unset, they cost one lookup)."""

from __future__ import annotations

import json
import os

# A folder where what crosses the libraries' boundary is recorded, one JSON line each:
# every prompt handed to vLLM (token ids) and every row a DeepSpeed rank trains on, so
# that tests check the boundary itself (BOS tokens, the same ids in every stage).
BOUNDARY_ENV = "S2D_TEST_BOUNDARY"


def record_boundary(kind: str, record: dict) -> None:
    """Append one record to `<folder>/<kind>-<pid>.jsonl`, if the hook is set."""
    folder = os.environ.get(BOUNDARY_ENV)
    if not folder:
        return
    with open(os.path.join(folder, f"{kind}-{os.getpid()}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
