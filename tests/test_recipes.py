"""Every recipe parses and runs a fast_dev_run on the synthetic set; trainer fragments compose with it."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightningkd.cli import lightning_cli, main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("classification/**/*.yaml"))
SEG_RECIPES = sorted((ROOT / "recipes").glob("segmentation/**/*.yaml"))
DET_RECIPES = sorted((ROOT / "recipes").glob("detection/**/*.yaml"))
FRAGMENTS = sorted((ROOT / "recipes" / "trainer").glob("*.yaml"))


def synthetic_overrides(recipe: Path) -> list[str]:
    """Swap the recipe's data for the synthetic set (same classes) and drop the teacher checkpoint.

    Detection recipes also drop the ImageNet ``backbone_checkpoint`` of both detectors (local files that
    CI does not have); ``inherit_from_teacher`` then copies from a randomly initialised teacher. MasKD's
    token recipes (``SegmentationMaskTokens``, ``DetectionMaskTokens``) hold the teacher as ``model``: its
    checkpoint is dropped the same way.
    """
    spec = yaml.safe_load(recipe.read_text())
    init = spec["model"]["init_args"]
    num_classes = init["num_classes"]
    detection = "Detection" in spec["model"]["class_path"]
    if detection:
        data = {
            "class_path": "datamodules.SyntheticDetectionDataModule",
            "init_args": {
                "num_classes": num_classes,
                "image_size": 64,
                "train_size": 4,
                "val_size": 2,
                "batch_size": 2,
                "num_workers": 0,
            },
        }
    elif "Segmentation" in spec["model"]["class_path"]:
        data = {
            "class_path": "datamodules.SyntheticSegmentationDataModule",
            "init_args": {
                "num_classes": num_classes,
                "image_size": 64,
                "train_size": 4,
                "val_size": 2,
                "batch_size": 2,
                "ignore_index": init.get("ignore_index", 255),
                "num_workers": 0,
            },
        }
    else:
        image_size = 64 if num_classes > 100 else 32  # ImageNet recipes: small images keep CPU time low
        # ScaleKD's projectors have fixed-size positional embeddings and queries: its recipes run at their size
        if any(str(d.get("class_path", "")).endswith(".ScaleKD") for d in init.get("distillers") or []):
            image_size = spec["data"]["init_args"].get("image_size", image_size)
        data = {
            "class_path": "datamodules.SyntheticClassificationDataModule",
            "init_args": {
                "num_classes": num_classes,
                "image_size": image_size,
                "train_size": max(64, num_classes),  # ND's class centres need every class once
                "val_size": 16,
                "batch_size": 4,
            },
        }
        if spec["data"]["init_args"].get("replays"):  # keyed batches for a teacher cache
            data["init_args"]["replays"] = spec["data"]["init_args"]["replays"]
    args = ["--data", json.dumps(data), "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu"]
    args += ["--trainer.devices=1"]  # loggers write under the test's working directory
    for role in ("teacher", "model"):  # "model": the frozen teacher of a token recipe
        if init.get(role):
            teacher = init[role]
            teacher_args = {**teacher["init_args"], "checkpoint": None}
            if detection:
                teacher_args["backbone_checkpoint"] = None
            args += [f"--model.init_args.{role}", json.dumps({**teacher, "init_args": teacher_args})]
    if detection and "backbone_checkpoint" in init.get("student", {}).get("init_args", {}):
        student = init["student"]
        student_args = {**student["init_args"], "backbone_checkpoint": None}
        args += ["--model.init_args.student", json.dumps({**student, "init_args": student_args})]
    return args


def tokens_read(node: object) -> set[str]:
    """The token files that the recipe's MasKD distillers read (also inside a PerLevel template)."""
    found: set[str] = set()
    if isinstance(node, dict):
        if str(node.get("class_path", "")).rsplit(".", 1)[-1] == "MasKD":
            found.add(node["init_args"]["tokens"])
        for value in node.values():
            found |= tokens_read(value)
    elif isinstance(node, list):
        for value in node:
            found |= tokens_read(value)
    return found


def token_recipe(tokens: str) -> Path:
    """The token recipe (MasKD's first stage) whose ``tokens_file`` is ``tokens``."""
    matches = [
        r
        for r in SEG_RECIPES + DET_RECIPES
        if yaml.safe_load(r.read_text())["model"]["init_args"].get("tokens_file") == tokens
    ]
    assert len(matches) == 1, f"{len(matches)} token recipes write {tokens}: {matches}"
    return matches[0]


def test_recipes_exist_for_every_classification_distiller() -> None:
    methods = {p.parent.name for p in RECIPES}
    assert {"kd", "dkd", "dist", "fitnet", "at", "nd", "rkd", "teacher"} <= methods


def test_recipes_exist_for_every_segmentation_distiller() -> None:
    methods = {p.parent.name for p in SEG_RECIPES}
    distillers = {"pixel_kd", "cwd", "bpkd", "cirkd", "dist", "skd", "maskd", "acam_kd"}
    assert distillers | {"teacher", "baseline"} <= methods
    for method in methods - {"teacher", "baseline"}:
        sets = {p.stem.rsplit("_", 1)[1] for p in SEG_RECIPES if p.parent.name == method}
        assert {"cityscapes", "camvid"} <= sets, method


def test_recipes_exist_for_every_detection_distiller() -> None:
    methods = {p.parent.name for p in DET_RECIPES}
    assert {"fgd", "pkd", "mgd", "cwd", "maskd", "acam_kd", "teacher", "baseline"} <= methods
    for method in ("fgd", "pkd", "mgd", "maskd", "acam_kd"):
        sets = {p.stem.rsplit("_", 1)[1] for p in DET_RECIPES if p.parent.name == method}
        assert {"coco", "bccd"} <= sets, method


def test_every_maskd_recipe_reads_the_file_of_a_token_recipe() -> None:
    """MasKD's two stages: each token file a distillation recipe reads is written by exactly one token
    recipe of the same task and data set, whose teacher is the distillation recipe's teacher."""
    readers = [r for r in SEG_RECIPES + DET_RECIPES if tokens_read(yaml.safe_load(r.read_text()))]
    assert {r.parent.name for r in readers} == {"maskd"}
    assert {r.parent.parent.name for r in readers} == {"segmentation", "detection"}
    for recipe in readers:
        spec = yaml.safe_load(recipe.read_text())
        for tokens in tokens_read(spec):
            stage1 = token_recipe(tokens)
            assert stage1.parent == recipe.parent
            assert stage1.stem.rsplit("_", 1)[1] == recipe.stem.rsplit("_", 1)[1]
            teacher = yaml.safe_load(stage1.read_text())["model"]["init_args"]["model"]
            expected = spec["model"]["init_args"]["teacher"]
            assert teacher["class_path"] == expected["class_path"]
            for key in ("name", "config", "num_classes", "checkpoint", "fpn_channels"):
                assert teacher["init_args"].get(key) == expected["init_args"].get(key), (recipe.name, key)


@pytest.mark.parametrize(
    "recipe", RECIPES + SEG_RECIPES + DET_RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes"))
)
def test_recipe_fast_dev_run_on_synthetic_data(recipe: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load(recipe.read_text())
    for tokens in sorted(tokens_read(spec)):  # MasKD: run the token recipe first, it writes the file
        stage1 = token_recipe(tokens)
        lightning_cli(["fit", "--config", str(stage1), *synthetic_overrides(stage1)])
        assert (tmp_path / tokens).is_file(), f"{stage1.name} did not write {tokens}"
    cache = spec["model"]["init_args"].get("teacher_cache")
    if cache:  # write the teacher cache the recipe reads, as its comment says, from the same overrides
        main(["cache", "--config", str(recipe), *synthetic_overrides(recipe), "--output", cache])
    cli = lightning_cli(["fit", "--config", str(recipe), *synthetic_overrides(recipe)])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    if cache:
        assert cli.model.teacher_cache is not None  # the fit read the cache (a wrong one is refused)
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "train/task_loss"} <= set(metrics)
    for d in cli.model.distillers:
        assert torch.isfinite(metrics[f"train/kd/{d.name}"]), d.name
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/task_loss"])
    tokens_file = spec["model"]["init_args"].get("tokens_file")
    if tokens_file:  # a token recipe: no distillers; the Dice term is logged and the file written
        assert not len(cli.model.distillers)
        assert torch.isfinite(metrics["train/dice"])
        assert (tmp_path / tokens_file).is_file(), f"no token file at {tokens_file}"
    if recipe in DET_RECIPES:  # the detector's own loss terms: RetinaNet / FCOS or Faster R-CNN names
        task = {"train/task/classification", "train/task/loss_classifier"} & set(metrics)
        assert task, sorted(metrics)
        assert all(torch.isfinite(metrics[name]) for name in task)


class ParseOnlyCLI(LightningCLI):
    def instantiate_classes(self) -> None:  # parse and validate the config, build nothing
        pass


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.name)
def test_trainer_fragment_composes_with_a_recipe(fragment: Path) -> None:
    from lightning.pytorch import LightningDataModule

    from lightningkd.modules import DistillationModule

    recipe = ROOT / "recipes/classification/kd/resnet18_from_resnet50_cifar100.yaml"
    cli = ParseOnlyCLI(
        DistillationModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=["--config", str(recipe), "--config", str(fragment)],
    )
    expected = yaml.safe_load(fragment.read_text())["trainer"]
    for key, value in expected.items():
        got = cli.config["trainer"][key]
        if isinstance(value, dict):
            assert got["class_path"] == value["class_path"]
        else:
            assert got == value, key


@pytest.mark.slow
def test_cpu_ddp_fragment_runs_a_recipe(tmp_path) -> None:
    from tests.test_cli import TINY_RECIPE, _lightningkd

    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    fragment = ROOT / "recipes" / "trainer" / "ddp_cpu.yaml"
    run = _lightningkd(
        tmp_path, "fit", "--config", "tiny.yaml", "--config", str(fragment), "--trainer.max_steps=2"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in run.stderr
    state = torch.load(tmp_path / "ckpts" / "tiny.ckpt", weights_only=True)
    assert state["global_step"] == 2
