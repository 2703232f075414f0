import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightningkd.cli import main
from lightningkd.models import classifier
from tests.test_module import make_module, trainer
from tests.toys import toy_classifier, toy_loader

ROOT = Path(__file__).resolve().parents[1]


def test_layers_command_prints_names_types_and_shapes(capsys) -> None:
    main(
        [
            "layers",
            "--model",
            "resnet18",
            "--num_classes",
            "10",
            "--small_input",
            "--input_size",
            "3",
            "32",
            "32",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out}
    assert rows["maxpool"][0] == "Identity"  # small-input stem: no max-pool
    assert rows["layer4"] == ["Sequential", "(1,", "512,", "4,", "4)"]
    assert rows["fc"] == ["Linear", "(1,", "10)"]


def test_layers_command_reads_a_recipe(tmp_path, capsys) -> None:
    recipe = ROOT / "recipes/classification/fitnet/resnet18_from_resnet50_cifar100.yaml"
    no_ckpt = '{"class_path": "lightningkd.models.classifier", "init_args": {"name": "resnet50", "num_classes": 100, "small_input": true, "checkpoint": null}}'
    override = tmp_path / "no_teacher_ckpt.yaml"
    override.write_text(f"model:\n  init_args:\n    teacher: {no_ckpt}\n")
    main(["layers", "--config", str(recipe), "--config", str(override)])  # data_dir need not exist
    out = capsys.readouterr().out
    assert "== student: ResNet" in out and "== teacher: ResNet" in out
    assert "layer2.0.conv3" in out.split("== teacher")[1]  # ResNet-50 bottlenecks


def test_layers_command_reads_a_segmentation_recipe_without_its_weight_files(capsys) -> None:
    recipe = ROOT / "recipes/segmentation/cwd/pspnet_r18_from_pspnet_r101_camvid.yaml"
    main(["layers", "--config", str(recipe), "--input_size", "3", "64", "64"])  # teacher .ckpt absent
    student, teacher = capsys.readouterr().out.split("== teacher")
    assert "== student: MMSegSegmenter" in student
    assert "decode_head.bottleneck" in student and "(1, 128, 8, 8)" in student
    assert "(1, 512, 8, 8)" in teacher  # PSPNet-R101's head feature


def test_layers_command_builds_segmentation_models(capsys) -> None:
    main(
        [
            "layers",
            "--model",
            "lraspp_mobilenet_v3_large",
            "--num_classes",
            "5",
            "--input_size",
            "3",
            "64",
            "64",
        ]
    )
    assert "classifier.high_classifier" in capsys.readouterr().out
    main(["layers", "--mmseg", "fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024", "--num_classes", "5"])
    assert "decode_head.conv_seg" in capsys.readouterr().out


def test_export_command_writes_a_strict_student_file(tmp_path, capsys) -> None:
    module = make_module()
    trainer(tmp_path, max_steps=1).fit(module, toy_loader())
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    main(["export", str(ckpt), str(tmp_path / "out" / "student.pt")])
    assert "student tensors" in capsys.readouterr().out
    toy_classifier(width=6).load_state_dict(torch.load(tmp_path / "out" / "student.pt"), strict=True)
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "nope.ckpt"), str(tmp_path / "x.pt")])
    assert "error: FileNotFoundError" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_python_dash_m_runs_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightningkd", "fit", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0 and "--model" in proc.stdout and "--data" in proc.stdout


def test_unknown_classifier_name_lists_similar_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown classifier 'resnet19'.*resnet18"):
        classifier("resnet19")


def test_classifier_checkpoint_round_trip(tmp_path) -> None:
    net = classifier("resnet18", num_classes=3, small_input=True)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    again = classifier("resnet18", num_classes=3, small_input=True, checkpoint=str(tmp_path / "w.pt"))
    assert torch.equal(again.conv1.weight, net.conv1.weight) and again.conv1.stride == (1, 1)


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit|validate|test|predict", "lightningkd layers", "lightningkd export", "--traceback"):
        assert command in out


def test_layers_input_size_with_wrong_channels_names_the_expected_ones(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["layers", "--model", "resnet18", "--input_size", "1", "32", "32"])
    expected = "gives 1 channel(s), but the first convolution of resnet18 expects 3: use --input_size 3 32 32"
    assert expected in capsys.readouterr().err


TINY_RECIPE = """
seed_everything: 0
trainer:
  max_steps: 8
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpts, filename: tiny, enable_version_counter: false}
model:
  class_path: lightningkd.modules.ClassificationDistillationModule
  init_args:
    num_classes: 4
    student: {class_path: tests.toys.toy_classifier, init_args: {num_classes: 4, width: 6, seed: 1}}
    teacher: {class_path: tests.toys.toy_classifier, init_args: {num_classes: 4, width: 10, seed: 2}}
    distillers: [{class_path: lightningkd.distillers.KD, init_args: {temperature: 2.0}}]
data:
  class_path: datamodules.SyntheticClassificationDataModule
  init_args: {num_classes: 4, image_size: 8, train_size: 48, val_size: 8, batch_size: 8}
"""


class RunsCommand:
    """Unpickling it would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _lightningkd(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lightningkd", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_command_line_faults_end_to_end(tmp_path) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    signal_at_3 = '{"class_path": "tests.test_faults.SendSignal", "init_args": {"signum": 15, "at_step": 3}}'
    # SIGTERM mid-epoch: a resumable checkpoint and status 143, not 0
    run = _lightningkd(tmp_path, "fit", "--config", "tiny.yaml", f"--trainer.callbacks+={signal_at_3}")
    assert run.returncode == 143, run.stderr[-2000:]
    saved = tmp_path / "ckpts" / "interrupted-step4.ckpt"
    assert saved.is_file() and f"Resume with --ckpt_path {saved}" in run.stderr
    # resuming finishes the run and writes the recipe's fixed-name checkpoint
    run = _lightningkd(tmp_path, "fit", "--config", "tiny.yaml", "--ckpt_path", str(saved))
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.load(tmp_path / "ckpts" / "tiny.ckpt", weights_only=True)["global_step"] == 8
    # a second run of the recipe does not replace it without --overwrite true
    before = (tmp_path / "ckpts" / "tiny.ckpt").read_bytes()
    run = _lightningkd(tmp_path, "fit", "--config", "tiny.yaml")
    assert run.returncode == 1
    assert "error: FileExistsError: ckpts/tiny.ckpt exists" in run.stderr.replace(str(tmp_path) + "/", "")
    assert len(run.stderr.strip().splitlines()) < 12  # the root cause, not a long traceback
    assert (tmp_path / "ckpts" / "tiny.ckpt").read_bytes() == before
    # divergence: non-zero exit, the term and the step named, nothing overwritten
    run = _lightningkd(
        tmp_path, "fit", "--config", "tiny.yaml", "--overwrite", "true",
        "--model.init_args.optimizer", '{"class_path": "torch.optim.SGD", "init_args": {"lr": 1e20}}',
    )  # fmt: skip
    assert run.returncode == 1 and "Non-finite loss at step 1" in run.stderr
    assert "distiller 'kd' = nan" in run.stderr
    assert (tmp_path / "ckpts" / "tiny.ckpt").read_bytes() == before
    # a truncated checkpoint as --ckpt_path is named, not a raw zip error
    (tmp_path / "half.ckpt").write_bytes(before[: len(before) // 2])
    run = _lightningkd(tmp_path, "fit", "--config", "tiny.yaml", "--ckpt_path", "half.ckpt")
    assert (
        run.returncode == 1 and "error: CheckpointError: Checkpoint 'half.ckpt' is incomplete" in run.stderr
    )
    # a teacher checkpoint that would run a command when unpickled is refused, and the command never runs
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps(RunsCommand(f"touch {tmp_path / 'ran'}"), protocol=2))
    run = _lightningkd(
        tmp_path, "fit", "--config", "tiny.yaml", "--overwrite", "true",
        "--model.init_args.teacher.init_args.checkpoint", "evil.ckpt",
    )  # fmt: skip
    assert run.returncode == 1 and "UnsafeCheckpointError" in run.stderr and "system" in run.stderr
    assert not (tmp_path / "ran").exists()
    # --traceback shows the whole traceback instead
    run = _lightningkd(tmp_path, "fit", "--config", "tiny.yaml", "--traceback")
    assert run.returncode == 1 and "Traceback (most recent call last)" in run.stderr


def test_recipe_errors_print_the_root_cause_first(tmp_path, capsys) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    (tmp_path / "bad.yaml").write_text(
        TINY_RECIPE.replace("temperature: 2.0", "temperature: 2.0, student_layer: nope")
    )
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(tmp_path / "bad.yaml")])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ValueError: Unknown layer name(s) ['nope']") and len(err) == 3
    (tmp_path / "typo.yaml").write_text(TINY_RECIPE.replace("temperature: 2.0", "temprature: 2.0"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "typo.yaml")])
    err = capsys.readouterr().err
    assert err.startswith("error: the recipe or the command line does not parse") and "temprature" in err
    assert "usage:" not in err and "Given value" not in err


def test_a_finished_command_releases_the_process_group(tmp_path) -> None:
    from lightningkd.cli import _release_process_group

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    _release_process_group()
    assert not torch.distributed.is_initialized()
    _release_process_group()  # nothing to release: no error


def test_layers_command_lists_detector_levels_and_shapes(capsys) -> None:
    main(["layers", "--model", "retinanet_resnet18_fpn", "--input_size", "3", "64", "64"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines()}
    # the image keeps its 64 x 64 size (no resize to min_size=800): strides 8 ... 128
    assert rows["backbone"] == (
        "BackboneWithFPN  {0: (1, 256, 8, 8), 1: (1, 256, 4, 4), 2: (1, 256, 2, 2), "
        "p6: (1, 256, 1, 1), p7: (1, 256, 1, 1)}"
    )
    assert rows["backbone.body.layer4"] == "Sequential  (1, 512, 2, 2)"
    assert rows["head.classification_head.cls_logits"].startswith("Conv2d  (1, 36,")  # 9 anchors x (3 + 1)
    assert (
        "FPN levels (tap one as backbone:<level>): backbone:0, backbone:1, backbone:2, backbone:p6, backbone:p7"
        in out.splitlines()
    )


def test_layers_command_detector_without_shapes(capsys) -> None:
    main(["layers", "--model", "fasterrcnn_resnet18_fpn", "--num_classes", "5"])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out}
    assert rows["roi_heads.box_predictor.cls_score"] == ["Linear"]
    assert out[-1].endswith("backbone:0, backbone:1, backbone:2, backbone:3, backbone:pool")


def test_layers_keeps_the_detector_transform_settings() -> None:
    from lightningkd.cli import _describe
    from lightningkd.models import detector

    model = detector("fcos_resnet18_fpn", num_classes=2, fpn_channels=64)
    text = _describe(model, torch.zeros(1, 3, 64, 96), "fcos")
    assert "{0: (1, 64, 8, 12)," in text
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333


DETECTION_RECIPE = """
model:
  class_path: lightningkd.modules.DetectionDistillationModule
  init_args:
    num_classes: 3
    student:
      class_path: lightningkd.models.detector
      init_args:
        name: retinanet_mobilenet_v3_large_fpn
        num_classes: 3
        backbone_checkpoint: missing/mobilenet_v3_large.pth
        trainable_backbone_layers: 3
    teacher:
      class_path: lightningkd.models.detector
      init_args:
        name: retinanet_resnet50_fpn
        num_classes: 3
        checkpoint: missing/teacher.ckpt
"""


@pytest.mark.slow
def test_layers_command_reads_a_detection_recipe_without_its_weight_files(tmp_path, capsys) -> None:
    (tmp_path / "det.yaml").write_text(DETECTION_RECIPE)
    main(["layers", "--config", str(tmp_path / "det.yaml"), "--input_size", "3", "64", "96"])
    student, teacher = capsys.readouterr().out.split("== teacher")
    assert "== student: RetinaNet" in student and ": RetinaNet" in teacher
    assert "backbone.body.16" in student and "(1, 960, 2, 3)" in student  # MobileNetV3's last block
    assert "backbone.body.layer4.2.conv3" in teacher and "(1, 2048, 2, 3)" in teacher
    for part in (student, teacher):
        assert "{0: (1, 256, 8, 12), 1: (1, 256, 4, 6), 2: (1, 256, 2, 3), p6: (1, 256, 1, 2)," in part
        assert "backbone:0, backbone:1, backbone:2, backbone:p6, backbone:p7" in part


def test_layers_command_reads_a_token_recipe_without_its_weight_files(tmp_path, capsys, monkeypatch) -> None:
    # MasKD's first stage names the frozen teacher `model:`; its checkpoint need not exist, nor may the
    # token file block building the module (only fit refuses an existing file)
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes/detection/maskd/retinanet_resnet50_fpn_tokens_bccd.yaml"
    (tmp_path / "runs/bccd").mkdir(parents=True)
    (tmp_path / yaml.safe_load(recipe.read_text())["model"]["init_args"]["tokens_file"]).touch()
    main(["layers", "--config", str(recipe)])
    out = capsys.readouterr().out
    assert "backbone.body.layer4.2.conv3" in out  # the ResNet-50 teacher's last bottleneck
    assert "backbone:0, backbone:1, backbone:2, backbone:p6, backbone:p7" in out


def _layer_rows(out: str) -> dict[str, str]:
    return {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines() if line.strip()}


def test_layers_command_lists_vit_tokens_and_the_prefix_count(capsys) -> None:
    main(["layers", "--model", "vit_tiny_patch16_224", "--num_classes", "10", "--small_input"]
         + ["--input_size", "3", "32", "32", "--model_kwargs", '{"depth": 2}'])  # fmt: skip
    out = capsys.readouterr().out
    rows = _layer_rows(out)
    assert rows["patch_embed"] == "PatchEmbed  (1, 64, 192)"  # 8x8 patches of 4 pixels
    assert rows["blocks.1"] == "Block  (1, 65, 192)" and "blocks.2" not in rows  # class token + 64
    assert "prefix tokens: 1 (class token): token outputs (N, L, C) start with them" in out
    assert "TokensToMap(prefix_tokens=1)" in out and "NHWC" not in out


def test_layers_command_counts_the_distillation_token(capsys) -> None:
    main(["layers", "--model", "deit_tiny_distilled_patch16_224", "--num_classes", "10", "--small_input"]
         + ["--input_size", "3", "32", "32"])  # fmt: skip
    out = capsys.readouterr().out
    assert _layer_rows(out)["blocks.11"] == "Block  (1, 66, 192)"
    assert "prefix tokens: 2 (class token, distillation token)" in out.splitlines()[-1]


def test_layers_command_lists_swin_stages_as_nhwc(capsys) -> None:
    main(["layers", "--model", "swin_tiny_patch4_window7_224", "--num_classes", "10", "--small_input"]
         + ["--input_size", "3", "32", "32"])  # fmt: skip
    out = capsys.readouterr().out
    rows = _layer_rows(out)
    stages = [rows[f"layers.{i}"] for i in range(4)]
    assert stages == [
        "SwinTransformerStage  (1, 16, 16, 96)",
        "SwinTransformerStage  (1, 8, 8, 192)",
        "SwinTransformerStage  (1, 4, 4, 384)",
        "SwinTransformerStage  (1, 2, 2, 768)",
    ]
    assert out.splitlines()[-1].startswith("stage outputs are NHWC (N, H, W, C): TokensToMap(layout='nhwc')")
    assert "prefix tokens" not in out


def test_layers_model_kwargs_must_be_a_json_object_for_a_classifier(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["layers", "--model", "vit_tiny_patch16_224", "--model_kwargs", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["layers", "--model", "retinanet_resnet18_fpn", "--model_kwargs", '{"depth": 2}'])
    assert "--model_kwargs applies to timm classifiers" in capsys.readouterr().err
