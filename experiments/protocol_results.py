"""The results file shared by the evidence protocols: one JSON line per run, looked up by (arm, seed, epochs)."""

from __future__ import annotations

import json
import os


def done(out_dir: str, arm: str, seed: int, epochs: int) -> bool:
    """Whether ``results.jsonl`` already holds this run (the runner scripts can then be restarted)."""
    path = os.path.join(out_dir, "results.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return any((r["arm"], r["seed"], r["epochs"]) == (arm, seed, epochs) for r in rows)


def record(out_dir: str, result: dict) -> None:
    """Print ``result`` and append it to ``results.jsonl``."""
    print(json.dumps(result), flush=True)
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
