"""The prepared GPU check runs on the CPU in its reduced mode and writes a complete results file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reduced_gpu_check_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHON": sys.executable}
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--reduced", str(out)],
        capture_output=True, text=True, env=env, timeout=1800, cwd=work,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(work.iterdir())  # nothing written where it was started
    results = json.loads(out.read_text())
    assert results["mode"] == "reduced" and results["device"].startswith("CPU")
    sections = results["sections"]
    assert not [name for name, section in sections.items() if "skipped" in section]
    tiny = sections["classification tiny"]
    arms = {
        "hand",
        "student_alone",
        "lightningkd",
        "lightningkd_cached",
        "hand_compiled",
        "lightningkd_compiled",
    }
    assert set(tiny["images_per_s"]) == arms
    for name in (n for n in sections if n.startswith(("classification", "segmentation"))):
        speeds = sections[name]["images_per_s"]
        assert all(math.isfinite(v) and v > 0 for v in speeds.values()), name
        assert sections[name]["ratios"]["lightningkd / hand"] > 0
    assert "lightningkd_cached / student_alone" in tiny["ratios"]
    assert sections["strategies"]["passed"], sections["strategies"].get("error")
    for name in ("recipe dkd cifar100", "recipe cwd cityscapes"):
        recipe = sections[name]
        assert recipe["finite"] and recipe["decreasing"], (name, recipe)
    # a second run never writes over the results
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--reduced", "--output", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode == 2 and "exists" in again.stderr


def test_full_gpu_check_needs_a_gpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check would run")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "--reduced" in done.stderr
    assert not (tmp_path / "r.json").exists()
