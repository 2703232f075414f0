"""ONNX export of a distilled student: classifier, segmenter and detector, checked with onnxruntime."""

import numpy as np
import pytest
import torch
import torchvision

from lightningkd import export as export_module
from lightningkd.cli import main
from lightningkd.export import export_onnx
from lightningkd.models import TorchvisionSegmenter, classifier
from tests.test_cli import TINY_RECIPE
from tests.toys import toy_classifier

onnxruntime = pytest.importorskip("onnxruntime", reason="pip install 'lightningkd[onnx]' for ONNX export")


def ort_run(path, images: torch.Tensor) -> list[np.ndarray]:
    """onnxruntime, called here directly (not through lightningkd's own check)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


def test_classifier_matches_pytorch_at_the_exported_and_another_batch_size(tmp_path) -> None:
    torch.manual_seed(0)
    model = classifier("resnet18", num_classes=10, small_input=True).eval()
    difference = export_onnx(model, tmp_path / "cls.onnx", torch.rand(2, 3, 32, 32))
    assert difference < 1e-4
    other = torch.rand(5, 3, 40, 40)  # batch and size are dynamic axes
    (logits,) = ort_run(tmp_path / "cls.onnx", other)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(other).numpy(), rtol=1e-3, atol=1e-4)


def test_segmenter_matches_pytorch_on_another_image_size(tmp_path) -> None:
    torch.manual_seed(0)
    model = TorchvisionSegmenter("lraspp_mobilenet_v3_large", num_classes=11).eval()
    export_onnx(model, tmp_path / "seg.onnx", torch.rand(1, 3, 64, 96))
    other = torch.rand(2, 3, 96, 128)
    (logits,) = ort_run(tmp_path / "seg.onnx", other)
    assert logits.shape == (2, 11, 12, 16)  # the head's 1/8 grid
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(other).numpy(), rtol=1e-3, atol=1e-4)


def test_detector_boxes_labels_scores_match_pytorch(tmp_path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4
    ).eval()
    image = torch.rand(1, 3, 240, 320)
    export_onnx(model, tmp_path / "det.onnx", image)
    session = onnxruntime.InferenceSession(str(tmp_path / "det.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "labels", "scores"]
    boxes, labels, scores = session.run(None, {"images": image[0].numpy()})
    with torch.no_grad():
        (expected,) = model([image[0]])
    assert len(boxes) == len(expected["boxes"]) > 0
    np.testing.assert_allclose(boxes, expected["boxes"].numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(labels, expected["labels"].numpy())
    np.testing.assert_allclose(scores, expected["scores"].numpy(), rtol=1e-3, atol=1e-4)


def test_a_detector_example_with_two_images_is_refused(tmp_path) -> None:
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4
    )
    with pytest.raises(ValueError, match=r"one image: example shape \(1, C, H, W\), got \(2, 3, 64, 64\)"):
        export_onnx(model, tmp_path / "det.onnx", torch.rand(2, 3, 64, 64))


def test_an_existing_output_needs_overwrite(tmp_path) -> None:
    (tmp_path / "cls.onnx").write_text("mine")
    model = toy_classifier(width=6)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_onnx(model, tmp_path / "cls.onnx", torch.rand(1, 3, 8, 8))
    assert (tmp_path / "cls.onnx").read_text() == "mine"
    export_onnx(model, tmp_path / "cls.onnx", torch.rand(1, 3, 8, 8), overwrite=True)
    assert (tmp_path / "cls.onnx").read_bytes()[:4] != b"mine"


def test_a_lightning_checkpoint_is_never_overwritten_even_with_overwrite(tmp_path) -> None:
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6"}, tmp_path / "run.ckpt")
    before = (tmp_path / "run.ckpt").read_bytes()
    with pytest.raises(FileExistsError, match="it is a Lightning checkpoint"):
        export_onnx(toy_classifier(width=6), tmp_path / "run.ckpt", torch.rand(1, 3, 8, 8), overwrite=True)
    assert (tmp_path / "run.ckpt").read_bytes() == before


def test_a_folder_output_is_refused_with_an_onnx_suggestion(tmp_path) -> None:
    with pytest.raises(IsADirectoryError, match="student.onnx"):
        export_onnx(toy_classifier(width=6), tmp_path, torch.rand(1, 3, 8, 8))


def test_a_mismatching_onnx_file_is_not_written(tmp_path, monkeypatch) -> None:
    real = export_module.run_onnx
    monkeypatch.setattr(export_module, "run_onnx", lambda path, images: [o + 0.5 for o in real(path, images)])
    with pytest.raises(AssertionError, match=r"ONNX output 'output' differs from PyTorch's by up to 0.5"):
        export_onnx(toy_classifier(width=6), tmp_path / "cls.onnx", torch.rand(2, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


def test_command_line_onnx_export_from_a_checkpoint_and_its_recipe(tmp_path, capsys) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    student = toy_classifier(num_classes=4, width=6, seed=7).eval()  # weights unlike the recipe's seed 1
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.6"}, tmp_path / "run.ckpt")
    out = tmp_path / "student.onnx"
    args = ["export", str(tmp_path / "run.ckpt"), str(out), "--format", "onnx"]
    main([*args, "--config", str(tmp_path / "tiny.yaml"), "--input_size", "3", "8", "8"])
    assert "onnxruntime matches PyTorch on a (1, 3, 8, 8) input" in capsys.readouterr().out
    images = torch.rand(3, 3, 8, 8)
    (logits,) = ort_run(out, images)
    with torch.no_grad():
        np.testing.assert_allclose(logits, student(images).numpy(), rtol=1e-4, atol=1e-5)


def test_command_line_onnx_export_without_a_recipe_says_what_to_add(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "run.ckpt"), str(tmp_path / "s.onnx"), "--format", "onnx"])
    assert "add --config RECIPE.yaml" in capsys.readouterr().err
