import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_cpu_ddp_keeps_teacher_frozen_and_ranks_in_sync(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "ddp_fit.py"), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2 and report["global_step"] == 3
        assert report["teacher_unchanged"] and report["teacher_eval"] and report["teacher_grads"] == 0
    # DDP all-reduces gradients: both ranks end with the same student and adapter weights
    assert reports[0]["student_sum"] == reports[1]["student_sum"]
    assert reports[0]["adapter_sum"] == reports[1]["adapter_sum"]
