import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["export", str(tmp_path / "nope.ckpt"), str(tmp_path / "x.pt")])


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
