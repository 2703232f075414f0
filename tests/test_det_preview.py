"""DetectionPreview: columns, boxes and captions drawn pixel for pixel, legend, FGD foreground masks, ranks."""

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_only
from matplotlib import colormaps
from torch import nn

from lightningkd.callbacks import DetectionPreview
from lightningkd.callbacks.det_preview import class_colour
from lightningkd.distillers import FGD, KD, PerLevel


def detections(boxes, scores, labels) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


class Detector(nn.Module):
    """Returns fixed detections, one dict per image."""

    def __init__(self, outputs: list[dict]) -> None:
        super().__init__()
        self.outputs = outputs
        self.weight = nn.Parameter(torch.zeros(1))


class Module(nn.Module):
    """The part of DetectionDistillationModule the preview reads: detect, teacher, class_names, distillers."""

    def __init__(self, student, teacher=None, class_names=None, distillers=()) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.class_names = class_names
        self.distillers = nn.ModuleList(distillers)
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def detect(self, images, model=None):
        model = self.student if model is None else model
        self.calls.append(
            ("teacher" if model is self.teacher else "student", [tuple(i.shape) for i in images])
        )
        return [{k: v.clone() for k, v in out.items()} for out in model.outputs[: len(images)]]


def pixel(picture: torch.Tensor, tile: tuple[int, int, int, int], y: int, x: int) -> tuple[int, ...]:
    """The 0-255 colour of picture pixel ``(y, x)`` of ``tile`` (top, left, height, width)."""
    top, left, _, _ = tile
    return tuple((picture[:, top + y, left + x] * 255).round().int().tolist())


GREY = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # a zero image is grey 128


def test_boxes_are_drawn_at_their_pixels_with_captions_and_legend() -> None:
    truth = [{"boxes": torch.tensor([[8.0, 4.0, 20.0, 16.0]]), "labels": torch.tensor([1])}] * 2
    student = Detector(
        [
            detections(
                [[30, 10, 40, 20], [0, 0, 5, 5], [2, 2, 9, 9], [1, 1, 3, 3]],
                [0.95, 0.2, 0.5, 0.3],
                [2, 3, 1, 3],
            ),
            detections([], [], []),
        ]
    )
    teacher = Detector([detections([[30, 10, 40, 20]], [0.8], [2]), detections([[1, 1, 4, 4]], [0.29], [3])])
    module = Module(student, teacher, class_names=["cat", "dog", "bird"])
    preview = DetectionPreview(num_images=2)
    images = [torch.zeros(3, 32, 48), torch.zeros(3, 24, 48)]  # the second is padded to 32 rows
    grid = preview.render(module, GREY, images, truth)
    assert grid.ndim == 3 and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
    assert preview.last_columns == ["image + ground truth", "teacher", "student"]
    assert [c for c, _ in module.calls] == ["teacher", "student"]
    assert module.calls[0][1] == [(3, 32, 48), (3, 24, 48)]  # the images as given, not enlarged
    # what was drawn: names from class_names, ground truth without score, threshold 0.3, best first
    assert preview.last_boxes[0][0] == [("cat", None, (8.0, 4.0, 20.0, 16.0))]
    assert preview.last_boxes[0][1] == [("dog", pytest.approx(0.8), (30.0, 10.0, 40.0, 20.0))]
    assert preview.last_boxes[0][2] == [
        ("dog", pytest.approx(0.95), (30.0, 10.0, 40.0, 20.0)),
        ("cat", pytest.approx(0.5), (2.0, 2.0, 9.0, 9.0)),
        ("bird", pytest.approx(0.3), (1.0, 1.0, 3.0, 3.0)),
    ]
    assert preview.last_boxes[1][1:] == [[], []]  # 0.29 < 0.3; no detections
    # the legend: the classes drawn anywhere, in label order, in their fixed colours
    assert preview.last_legend == [
        ("cat", class_colour(1)),
        ("dog", class_colour(2)),
        ("bird", class_colour(3)),
    ]
    assert class_colour(1) == (31, 119, 180) and class_colour(2) == (255, 127, 14)  # matplotlib's tab10

    # 48 px wide images enlarged 3x (128 px at least so the titles fit); tiles 96 x 144
    assert preview.last_scale == [(3.0, 3.0), (3.0, 3.0)]
    assert [len(row) for row in preview.last_tiles] == [3, 3]
    assert all(t[2:] == (96, 144) for row in preview.last_tiles for t in row)
    truth_tile = preview.last_tiles[0][0]
    # the box (8, 4, 20, 16) covers picture pixels x 24..59, y 12..47; its outline is 2 pixels inside it
    cat = class_colour(1)
    for y, x in [(30, 24), (30, 25), (30, 58), (30, 59), (46, 40), (47, 40)]:
        assert pixel(grid, truth_tile, y, x) == cat, (y, x)
    for y, x in [(30, 23), (30, 26), (30, 57), (30, 60), (45, 40), (48, 40), (20, 40)]:
        assert pixel(grid, truth_tile, y, x) == (128, 128, 128), (y, x)  # image and box interior
    # the caption sits above the box on a patch of the class colour (and not below it)
    above = [pixel(grid, truth_tile, y, x) for y in range(2, 12) for x in range(24, 40)]
    assert cat in above
    # the student's best box, (30, 10, 40, 20), drawn in the dog colour in the student column
    student_tile = preview.last_tiles[0][2]
    assert pixel(grid, student_tile, 45, 90) == class_colour(2)  # left edge, x = 30 * 3
    assert pixel(grid, student_tile, 45, 92) == (128, 128, 128)
    # the second image: 24 rows, so its tiles are padded with light grey below row 72
    assert pixel(grid, preview.last_tiles[1][0], 71, 70) == (128, 128, 128)
    assert pixel(grid, preview.last_tiles[1][0], 72, 70) == (217, 217, 217)


def test_max_boxes_names_fallback_and_min_max_scaling() -> None:
    out = detections([[0, 0, 8, 8], [8, 8, 16, 16], [4, 4, 12, 12]], [0.6, 0.9, 0.7], [1, 4, 4])
    truth = [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3), "labels": torch.tensor([2, 2, 2])}]
    module = Module(Detector([out]))  # no teacher, no class names
    preview = DetectionPreview(num_images=1, max_boxes=2)
    image = torch.full((3, 16, 16), -1.0)
    image[:, 8:, :] = 3.0  # min-max scaled: top half black, bottom half white
    grid = preview.render(module, None, [image], truth)
    assert preview.last_columns == ["image + ground truth", "student"]
    assert [b[:2] for b in preview.last_boxes[0][1]] == [
        ("class4", pytest.approx(0.9)),
        ("class4", pytest.approx(0.7)),
    ]
    assert len(preview.last_boxes[0][0]) == 2  # the ground truth is capped too
    assert [name for name, _ in preview.last_legend] == ["class2", "class4"]
    assert class_colour(11) != class_colour(1) and len(set(map(class_colour, range(1, 30)))) == 29
    tile = preview.last_tiles[0][0]
    assert preview.last_scale == [(8.0, 8.0)]  # 16 px -> 128 px
    assert pixel(grid, tile, 120, 120) == (255, 255, 255)
    assert pixel(grid, tile, 40, 120) == (0, 0, 0)


def test_large_images_are_shrunk_with_their_boxes() -> None:
    truth = [{"boxes": torch.tensor([[32.0, 32.0, 160.0, 96.0]]), "labels": torch.tensor([2])}]
    module = Module(Detector([detections([], [], [])]))
    preview = DetectionPreview(num_images=1, max_side=32)
    image = torch.zeros(3, 128, 256)
    image[:, :, 128:] = 2.0  # right half white after min-max scaling
    grid = preview.render(module, None, [image], truth)
    # 128 x 256 shrunk to 16 x 32, then enlarged 4x so that titles fit: 64 x 128, half the original size
    assert preview.last_scale == [(0.5, 0.5)]
    tile = preview.last_tiles[0][0]
    assert tile[2:] == (64, 128)
    # the box, halved, covers picture pixels x 16..79, y 16..47
    for y, x in [(30, 16), (30, 17), (30, 78), (30, 79), (16, 50), (47, 50)]:
        assert pixel(grid, tile, y, x) == class_colour(2), (y, x)
    assert pixel(grid, tile, 30, 15) == pixel(grid, tile, 30, 18) == (0, 0, 0)
    assert pixel(grid, tile, 60, 100) == (255, 255, 255)


def test_datamodule_images_un_normalised_with_its_mean_and_std() -> None:
    from datamodules import SyntheticDetectionDataModule

    data = SyntheticDetectionDataModule(num_classes=3, image_size=64, train_size=8, val_size=4, batch_size=2)
    data.setup("fit")
    image, target = data.val_dataloader().dataset[0]
    module = Module(Detector([detections([], [], [])]))
    preview = DetectionPreview(num_images=1)
    preview.render(module, data, [image], [target])
    assert preview.last_boxes[0][0] == [
        (data.classes[label - 1], None, tuple(box))
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist())
    ]
    assert [name for name, _ in preview.last_legend] == sorted(
        {data.classes[i - 1] for i in target["labels"]}
    )
    # without boxes (max_boxes=0) the tile is exactly the un-normalised image, each pixel a 2x2 block
    preview = DetectionPreview(num_images=1, max_boxes=0)
    grid = preview.render(module, data, [image], [target])
    assert preview.last_boxes == [[[], []]] and preview.last_legend == []
    expected = (image * torch.tensor(data.std).view(3, 1, 1) + torch.tensor(data.mean).view(3, 1, 1)).clamp(
        0, 1
    )
    expected = (expected * 255).round().int().repeat_interleave(2, 1).repeat_interleave(2, 2)
    top, left, height, width = preview.last_tiles[0][0]
    assert (height, width) == (128, 128)
    assert torch.equal((grid[:, top : top + height, left : left + width] * 255).round().int(), expected)


def expected_mask(size: int, box: tuple[int, int, int, int], value: float) -> torch.Tensor:
    """A ``size`` x ``size`` mask with ``value`` on rows ``box[1]..box[3]`` and columns ``box[0]..box[2]``."""
    mask = torch.zeros(size, size)
    x1, y1, x2, y2 = box
    mask[y1 : y2 + 1, x1 : x2 + 1] = value
    return mask


def test_fgd_foreground_columns() -> None:
    distillers = [
        KD(name="kd"),
        FGD(channels=4, name="fgd"),
        PerLevel(distiller=FGD(channels=4), levels=["1", "2"], name="fgd_levels"),
    ]
    truth = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "labels": torch.tensor([1])}]
    module = Module(Detector([detections([], [], [])]), distillers=distillers)
    preview = DetectionPreview(num_images=1)
    grid = preview.render(module, GREY, [torch.zeros(3, 64, 64)], truth)
    assert preview.last_columns == [
        "image + ground truth",
        "student",
        "fgd foreground",
        "fgd_levels foreground",
    ]
    assert preview.last_boxes[0][2:] == [[], []]
    # the fake student has no FPN to measure: level 0 at stride 8 (no rpn: RetinaNet / FCOS), level k at
    # 8 * 2**k. Level 0 is an 8x8 map; the box scaled by 8/64 is x 1.25..3.75, y 2.5..5: cells floor..ceil
    # inclusive, columns 1..4, rows 2..5, each 1 / (4 * 4)
    assert preview.last_strides == [8, 16]
    level0, level1 = preview.last_masks[0]
    torch.testing.assert_close(level0, expected_mask(8, (1, 2, 4, 5), 1 / 16))
    # the wrapper's first copy reads level 1, stride 16: a 4x4 map, x 0.625..1.875, y 1.25..2.5
    torch.testing.assert_close(level1, expected_mask(4, (0, 1, 2, 3), 1 / 9))
    # heat map over the image (picture 2x): level 0's cell (3, 2) (image pixels y 24..31, x 16..23) holds
    # the mask's maximum, cells outside the box zero; half the heat-map colour, half the grey image
    hot, cold = (np.array(colormaps["inferno"](v)[:3]) * 255 for v in (1.0, 0.0))
    tile = preview.last_tiles[0][2]
    spots = [
        ((50, 40), hot),
        ((62, 46), hot),
        ((5, 5), cold),
        ((50, 14), cold),
        ((50, 80), cold),
        ((97, 40), cold),
    ]
    for (y, x), heat in spots:
        expected = np.round(0.5 * 128 + 0.5 * heat)
        assert np.abs(np.array(pixel(grid, tile, y, x)) - expected).max() <= 1, (y, x)
    # a Faster R-CNN student (with an rpn) has stride 4 at level 0
    module.student.rpn = nn.Identity()
    preview.render(module, GREY, [torch.zeros(3, 64, 64)], truth)
    assert preview.last_strides == [4, 8]
    assert preview.last_masks[0][0].shape == (16, 16) and preview.last_masks[0][1].shape == (8, 8)
    # an explicit stride for level 0 wins
    preview = DetectionPreview(num_images=1, fgd_stride=16)
    preview.render(module, GREY, [torch.zeros(3, 64, 64)], truth)
    assert preview.last_strides == [16, 32] and preview.last_masks[0][0].shape == (4, 4)


def test_fgd_mask_follows_box_scale_and_padding() -> None:
    # a 40 x 64 image in a module padding to multiples of 32: the level-0 map covers 64 x 64 pixels (8 x 8)
    truth = [{"boxes": torch.tensor([[0.0, 0.0, 16.0, 20.0]]), "labels": torch.tensor([2])}]
    masks = {}
    for box_scale in ("image", "padded"):
        module = Module(Detector([detections([], [], [])]), distillers=[FGD(channels=4, box_scale=box_scale)])
        module.size_divisible = 32
        preview = DetectionPreview(num_images=1)
        preview.render(module, GREY, [torch.zeros(3, 40, 64)], truth)
        masks[box_scale] = preview.last_masks[0][0]
    # "image" (official): y scaled by 8 / 40, so 20 px -> 4 cells: rows 0..4, columns 0..2, 1 / (5 * 3)
    torch.testing.assert_close(masks["image"], expected_mask(8, (0, 0, 2, 4), 1 / 15))
    # "padded": y scaled by 8 / 64, 20 px -> 2.5 cells: rows 0..3, 1 / (4 * 3)
    torch.testing.assert_close(masks["padded"], expected_mask(8, (0, 0, 2, 3), 1 / 12))


def test_no_fgd_column_without_fgd() -> None:
    truth = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    module = Module(Detector([detections([], [], [])]), distillers=[KD()])
    preview = DetectionPreview(num_images=1)
    preview.render(module, GREY, [torch.zeros(3, 16, 16)], truth)
    assert preview.last_columns == ["image + ground truth", "student"]
    assert preview.last_legend == [] and preview.last_masks == [[]]


def trainer_stub(tmp_path, data, epoch: int = 0, loggers=()) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=False,
        current_epoch=epoch,
        global_step=5,
        val_dataloaders=data.val_dataloader(),
        datamodule=data,
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path / "root"),
        loggers=list(loggers),
    )


def test_epoch_end_writes_png_on_rank_zero_only(tmp_path, monkeypatch) -> None:
    from datamodules import SyntheticDetectionDataModule

    data = SyntheticDetectionDataModule(num_classes=3, image_size=64, train_size=8, val_size=4, batch_size=2)
    data.setup("fit")
    dataset = data.val_dataloader().dataset
    outputs = [detections([[4, 4, 20, 20]], [0.9], [3])] * 2
    module = Module(Detector(outputs), Detector(outputs))

    class ImageLogger:
        def __init__(self) -> None:
            self.images = []

        def log_image(self, key, images, step=None):
            self.images.append((key, tuple(images[0].shape), step))

    logger = ImageLogger()
    preview = DetectionPreview(num_images=2, every_n_epochs=2)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    preview.on_validation_epoch_end(trainer_stub(tmp_path, data, epoch=1, loggers=[logger]), module)
    assert preview.saved == [] and module.calls == [] and not (tmp_path / "detection_preview").exists()

    monkeypatch.setattr(rank_zero_only, "rank", 0)
    preview.on_validation_epoch_end(trainer_stub(tmp_path, data, epoch=0, loggers=[logger]), module)
    assert preview.saved == []  # epoch 1 of every 2
    preview.on_validation_epoch_end(trainer_stub(tmp_path, data, epoch=1, loggers=[logger]), module)
    path = tmp_path / "detection_preview" / "epoch_001.png"
    assert preview.saved == [str(path)] and path.is_file()
    saved = torchvision.io.read_image(str(path))
    assert logger.images == [("val/detection_preview", tuple(saved.shape), 5)]
    # the images drawn: validation images 0 and 3 (spread over the 4), read once and kept
    first = preview._samples
    for got, index in zip(first[0], (0, 3)):
        assert torch.equal(got, dataset[index][0])
    assert preview.last_columns == ["image + ground truth", "teacher", "student"]
    assert preview.last_boxes[1][2] == [("class3", pytest.approx(0.9), (4.0, 4.0, 20.0, 20.0))]
    preview.on_validation_epoch_end(trainer_stub(tmp_path, data, epoch=3), module)
    assert preview._samples is first and (tmp_path / "detection_preview" / "epoch_003.png").is_file()
    # the PNG is the rendered picture, byte for byte
    again = preview.render(module, data, *first)
    assert torch.equal(saved, (again * 255).round().to(torch.uint8))


def test_runs_in_a_trainer_and_logs_to_tensorboard(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from datamodules import SyntheticDetectionDataModule

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.student = Detector([detections([[2, 2, 30, 30]], [0.7], [1])] * 2)
            self.teacher = None
            self.class_names = ["red", "green", "blue"]
            self.distillers = nn.ModuleList()

        def detect(self, images, model=None):
            return [{k: v.clone() for k, v in d.items()} for d in self.student.outputs[: len(images)]]

        def training_step(self, batch, batch_idx):
            return self.student.weight.pow(2).sum() + 1.0

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = SyntheticDetectionDataModule(num_classes=3, image_size=64, train_size=4, val_size=2, batch_size=2)
    preview = DetectionPreview(num_images=2)
    L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        callbacks=[preview],
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    ).fit(Tiny(), data)
    assert [p.split("/")[-2:] for p in preview.saved] == [["detection_preview", "epoch_000.png"]]
    assert preview.saved[0].startswith(str(tmp_path / "tb"))
    assert preview.last_columns == ["image + ground truth", "student"]
    assert preview.last_boxes[0][1] == [("red", pytest.approx(0.7), (2.0, 2.0, 30.0, 30.0))]
    content = b"".join(e.read_bytes() for e in (tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert b"val/detection_preview" in content and b"\x89PNG" in content


def test_arguments_are_checked() -> None:
    for kwargs in ({"num_images": 0}, {"every_n_epochs": 0}, {"max_boxes": -1}, {"fgd_stride": 0}):
        with pytest.raises(ValueError):
            DetectionPreview(**kwargs)


@pytest.mark.parametrize(
    ("name", "strides"), [("retinanet_resnet18_fpn", [8, 16]), ("fasterrcnn_resnet18_fpn", [4])]
)
def test_real_module_strides_measured_from_the_student(name, strides) -> None:
    from datamodules import SyntheticDetectionDataModule
    from lightningkd.models import detector
    from lightningkd.modules import DetectionDistillationModule

    torch.manual_seed(0)
    student = detector(name, num_classes=3, min_size=64, max_size=64, fpn_channels=16)
    teacher = detector(name, num_classes=3, min_size=64, max_size=64, fpn_channels=16)
    levels = ["0", "1"] if len(strides) == 2 else ["0"]
    distillers = [PerLevel(distiller=FGD(channels=16), levels=levels)]
    module = DetectionDistillationModule(student, teacher, distillers, num_classes=3)
    data = SyntheticDetectionDataModule(num_classes=3, image_size=64, train_size=2, val_size=2)
    data.setup("fit")
    image, target = data.val_dataloader().dataset[1]
    preview = DetectionPreview(num_images=1, score_threshold=0.0, max_boxes=3)
    preview.render(module, data, [image[:, :48]], [target])  # 48 rows, padded to 64 by the module
    assert preview.last_columns == ["image + ground truth", "teacher", "student", "fgd foreground"]
    assert preview.last_strides == strides[:1]  # the first copy's level, "0"
    assert preview.last_masks[0][0].shape == (64 // strides[0], 64 // strides[0])
    # an untrained detector's best boxes (RetinaNet's own 0.05 threshold may leave none), named by the datamodule
    drawn = preview.last_boxes[0][2]
    assert len(drawn) <= 3 and {name for name, _, _ in drawn} <= set(data.classes)
    assert [score for _, score, _ in drawn] == sorted((score for _, score, _ in drawn), reverse=True)


def test_spatial_mask_columns_of_acam_kd_per_level() -> None:
    from datamodules import SyntheticDetectionDataModule
    from lightningkd.distillers import ACAMKD
    from lightningkd.models import detector
    from lightningkd.modules import DetectionDistillationModule

    torch.manual_seed(0)
    student = detector("retinanet_resnet18_fpn", num_classes=3, min_size=64, max_size=64, fpn_channels=16)
    teacher = detector("retinanet_resnet18_fpn", num_classes=3, min_size=64, max_size=64, fpn_channels=16)
    acam = PerLevel(distiller=ACAMKD(channels=16, num_masks=4), levels=["0", "1"])
    for level in acam.levels:  # masks far from the untrained tokens' 0.5 everywhere
        acam.level(level).spatial_tokens.data.normal_(0.0, 1.0)
    module = DetectionDistillationModule(student, teacher, [acam], num_classes=3)
    data = SyntheticDetectionDataModule(num_classes=3, image_size=64, train_size=2, val_size=2)
    data.setup("fit")
    samples = [data.val_dataloader().dataset[i] for i in (0, 1)]
    images = [samples[0][0], samples[1][0][:, :48]]  # the second is padded to 64 rows in the batch
    targets = [samples[0][1], samples[1][1]]
    plain = DetectionPreview(num_images=2, max_boxes=0, max_masks=0).render(module, data, images, targets)
    preview = DetectionPreview(num_images=2, max_boxes=0)
    grid = preview.render(module, data, images, targets)
    base = ["image + ground truth", "teacher", "student"]
    masks = [f"acamkd mask {k} (0)" for k in range(3)]  # the first level; max_masks 3 of 4
    assert preview.last_columns == base + masks
    assert module.training and not module.teacher.training  # the modes are restored
    # three more tiles in every row: the picture is wider by three tiles and their gaps
    _, _, tile_h, tile_w = preview.last_tiles[0][3]
    assert grid.shape[-2] == plain.shape[-2] and grid.shape[-1] - plain.shape[-1] == 3 * (tile_w + 4)
    # level "0" of RetinaNet: stride 8, an 8 x 8 map of the 64 x 64 padded batch; the masks are the copy's
    assert preview.last_strides == [8, 8, 8]
    module.eval()
    batch = module.unpack_batch((images, targets))
    expected = acam.level("0").spatial_masks(
        module.student_features(images, batch), module.teacher_features(images, batch)
    )
    module.train()
    inferno = colormaps["inferno"]
    for row, (image, height) in enumerate(zip(images, (64, 48))):
        assert image.shape[-2] == height
        picture = tile_region(grid, preview.last_tiles[row][0], 2 * height, 128).double()
        cells = torch.arange(2 * height) // 2 // 8, torch.arange(128) // 2 // 8
        for k in range(3):
            mask = preview.last_masks[row][k]
            torch.testing.assert_close(mask, expected[row, k])
            # each cell drawn over the 16 x 16 picture pixels of its 8 x 8 image pixels, half and half
            heat = torch.from_numpy(inferno(mask[cells[0][:, None], cells[1][None, :]].numpy())[..., :3])
            drawn = tile_region(grid, preview.last_tiles[row][3 + k], 2 * height, 128).double()
            assert (drawn - (0.5 * picture + 0.5 * heat.permute(2, 0, 1) * 255).round()).abs().max() <= 1
            assert (drawn - picture).abs().amax(0).mean() > 20  # the heat map is drawn
        # the padded rows of the batch are not drawn: the tile stays grey below the image
        below = tile_region(grid, preview.last_tiles[row][3], tile_h, 128)[:, 2 * height :]
        assert below.numel() == 0 or bool((below == 217).all())
    assert mask.amax() - mask.amin() > 0.02  # not one flat value
    # max_masks limits the columns; mask_level picks another level of the wrapper (stride 16, 4 x 4)
    preview = DetectionPreview(num_images=2, max_masks=2, mask_level="1")
    preview.render(module, data, images, targets)
    assert preview.last_columns == base + ["acamkd mask 0 (1)", "acamkd mask 1 (1)"]
    assert preview.last_strides == [16, 16] and preview.last_masks[0][0].shape == (4, 4)
    with pytest.raises(ValueError, match="mask level 'p6'"):
        DetectionPreview(num_images=2, mask_level="p6").render(module, data, images, targets)
    with pytest.raises(ValueError, match="max_masks"):
        DetectionPreview(max_masks=-1)


def tile_region(
    picture: torch.Tensor, tile: tuple[int, int, int, int], height: int, width: int
) -> torch.Tensor:
    """The ``(3, height, width)`` 0-255 integer pixels at the top left of ``tile`` (top, left, height, width)."""
    top, left, _, _ = tile
    return (picture[:, top : top + height, left : left + width] * 255).round().int()
