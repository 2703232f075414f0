"""Execute every notebook under ``notebooks/`` and check what it printed.

The notebooks run in a Jupyter kernel started from *this* interpreter (a kernel spec written to a temporary
folder, so an installed ``python3`` spec pointing elsewhere cannot be picked up), with the repository root
first on ``PYTHONPATH`` (the checkout is what gets tested) and a temporary working directory (nothing is
written into the repository).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "lightningkd-tests"
PROBE = "import sys\nprint('kernel prefix:', sys.prefix)"


def _outputs_text(cell: nbformat.NotebookNode) -> str:
    """The printed text of a code cell (stdout streams and text/plain results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _png_count(nb: nbformat.NotebookNode) -> int:
    """How many PNG pictures (figures, displayed images) the code cells of ``nb`` output."""
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


def _repo_files() -> set[str]:
    """Top-level entries of the repository and of notebooks/ (where a careless run would write)."""
    return {p.name for p in ROOT.iterdir()} | {f"notebooks/{p.name}" for p in (ROOT / "notebooks").iterdir()}


def _kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lightningkd tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def execute(path: Path, tmp_path: Path) -> tuple[nbformat.NotebookNode, str]:
    """Run the notebook at ``path`` in ``tmp_path``; return it executed and the kernel's ``sys.prefix``."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    workdir = tmp_path / "run"
    workdir.mkdir()
    env = dict(os.environ)
    # the checkout is what is tested (an editable install made before a package existed can miss it)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MPLBACKEND"] = "Agg"
    # OpenMP threads that spin while they wait make torch on a shared, busy CPU 10-30x slower; passive
    # waiting costs little on an idle machine
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name=KERNEL,
        km=_kernel_manager(tmp_path),
        resources={"metadata": {"path": str(workdir)}},
    )
    # raises CellExecutionError (with the cell and its traceback) on any error; always shuts the kernel down
    client.execute(env=env, cleanup_kc=True)
    probe = _outputs_text(nb.cells.pop(0))
    return nb, probe.split("kernel prefix:", 1)[1].strip()


def test_notebooks_exist() -> None:
    assert NOTEBOOKS, f"no notebooks found under {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: code cell {i} has stored outputs; strip them"
            assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    before = _repo_files()
    nb, prefix = execute(path, tmp_path)
    assert Path(prefix).resolve() == Path(sys.prefix).resolve(), "the kernel did not run this interpreter"
    assert _repo_files() <= before, f"the notebook wrote into the repository: {_repo_files() - before}"
    text = "\n".join(_outputs_text(c) for c in nb.cells if c.cell_type == "code")
    if path.name == "01_quickstart.ipynb":
        check_quickstart(text)
    if path.name == "02_cross_architecture.ipynb":
        check_cross_architecture(text, _png_count(nb))
    if path.name == "03_segmentation.ipynb":
        check_segmentation(text)
    if path.name == "04_detection.ipynb":
        check_detection(text, _png_count(nb))


def table_rows(text: str, names: tuple[str, ...], metric: str) -> dict[str, float]:
    """The value of each named row of a printed ``name  value`` comparison table, each checked in [0, 1]."""
    rows = {}
    for name in names:
        match = re.search(rf"^{re.escape(name)}\s+([0-9.]+)\s*$", text, flags=re.MULTILINE)
        assert match, f"no '{name}' row in the comparison table; the notebook printed:\n{text[-3000:]}"
        rows[name] = float(match.group(1))
        assert 0.0 <= rows[name] <= 1.0, f"{name}: {metric} {rows[name]} is not in [0, 1]"
    return rows


def check_quickstart(text: str) -> None:
    """The quickstart printed its comparison table and reloaded the exported student strictly."""
    rows = table_rows(text, ("teacher", "student alone", "student distilled"), "val/acc1")
    # the synthetic set is learnable: a trained teacher is far above chance (0.1 for 10 classes)
    assert rows["teacher"] > 0.5, rows
    assert "strict reload: OK" in text


def check_cross_architecture(text: str, pngs: int) -> None:
    """The cross-architecture notebook showed the mix-up error, the adapters' shapes and its comparison."""
    assert "TokensToMap(prefix_tokens=1, grid=(8, 8))" in text, text[:3000]  # the error names the adapter
    assert "tokens -> map: (2, 192, 8, 8)" in text and "stage4 resampled: (2, 192, 8, 8)" in text, text[:3000]
    assert "65 tokens minus prefix_tokens=2 leaves 63" in text, text[:3000]
    rows = table_rows(
        text, ("teacher", "student alone", "student + OFA", "student + FitNet (adapted)"), "val/acc1"
    )
    # chance is 0.1; the 2-block ViT teacher reached 0.72 in 3 epochs when the notebook was written
    assert rows["teacher"] > 0.5, rows
    assert pngs >= 1, "the curves were not plotted"


def check_segmentation(text: str) -> None:
    """The segmentation notebook printed its mIoU table and the titled columns of its preview."""
    rows = table_rows(text, ("teacher", "student alone", "student + CWD", "student + BPKD"), "val/mIoU")
    # predicting background everywhere scores about 0.16 on this set; the trained teacher reached 0.73 in two runs
    assert rows["teacher"] > 0.5, rows
    columns = ["image", "ground truth", "teacher", "student", "bpkd edge", "bpkd body"]
    assert f"preview columns: {columns}" in text, text[-3000:]


def check_detection(text: str, pngs: int) -> None:
    """The detection notebook listed the shared FPN levels, printed its mAP table and showed its preview."""
    # both detectors' levels, tapped as backbone:<level>: the same sizes at strides 8..128 (96x96 images;
    # p6 and p7 are convolutions of stride 2 with padding from the 3x3 level "2"), 64 and 32 channels
    for level, stride, side in (("0", 8, 12), ("1", 16, 6), ("2", 32, 3), ("p6", 64, 2), ("p7", 128, 1)):
        match = re.search(
            rf"^backbone:{level}\s+(\([0-9, ]+\))\s+(\([0-9, ]+\))\s+{stride}\s*$", text, re.MULTILINE
        )
        assert match, (
            f"no line for FPN level backbone:{level} (stride {stride}); the notebook printed:\n{text[:3000]}"
        )
        teacher, student = (tuple(int(v) for v in g.strip("()").split(",")) for g in match.groups())
        assert teacher[1:] == (64, side, side) and student[1:] == (32, side, side), (level, teacher, student)
    number = r"([0-9.]+|nan)"
    header = re.search(r"^model\s+mAP\s+mAP50((?:\s+ap/\S+)+)\s*$", text, flags=re.MULTILINE)
    assert header, f"no header for the comparison table; the notebook printed:\n{text[-3000:]}"
    classes = header.group(1).split()
    assert classes == ["ap/class1", "ap/class2", "ap/class3"], classes
    rows = {}
    for name in ("teacher", "student alone", "student + FGD"):
        pattern = rf"^{re.escape(name)}" + rf"\s+{number}" * (2 + len(classes)) + r"\s*$"
        match = re.search(pattern, text, flags=re.MULTILINE)
        assert match, f"no '{name}' row in the comparison table; the notebook printed:\n{text[-3000:]}"
        rows[name] = [float(v) for v in match.groups()]
        for value in rows[name][:2]:
            assert 0.0 <= value <= 1.0, f"{name}: mAP / mAP50 {rows[name][:2]} not in [0, 1]"
        assert rows[name][0] <= rows[name][1], f"{name}: mAP above mAP50: {rows[name][:2]}"
    # a detector that finds nothing scores 0; the teacher's mAP50 was 0.83 and 0.87 in two runs of the notebook
    assert rows["teacher"][1] > 0.5, rows
    columns = ["image + ground truth", "teacher", "student", "fgd foreground"]
    assert f"preview columns: {columns}" in text, text[-3000:]
    assert "saved: ['preview/epoch_" in text, text[-3000:]
    # the four training images with their boxes, and the preview picture
    assert pngs >= 2, f"expected the data figure and the preview picture, found {pngs} PNG outputs"
