"""SegmentationDistillationModule: loss, auxiliary head, metrics, sliding-window inference, preview callback."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightningkd.callbacks import SegmentationPreview
from lightningkd.models import TorchvisionSegmenter
from lightningkd.modules import SegmentationDistillationModule, segmentation_scores


class Pointwise(nn.Module):
    """A 1x1 convolution at half resolution, with an auxiliary 1x1 head run only in training."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, classes, 1)
        self.aux = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        x = F.avg_pool2d(x, 2)
        if self.training:
            self.aux(x)
        return self.head(x)


class Oracle(nn.Module):
    """Returns its input as logits: images that one-hot encode a class map are predicted exactly."""

    def forward(self, x):
        return x


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return L.Trainer(**{**defaults, "enable_model_summary": False, **kwargs})


def test_scores_by_hand() -> None:
    # labels (rows) x predictions (columns); class 2 never appears: its IoU is undefined and left out
    confusion = torch.tensor([[5, 1, 0], [2, 4, 0], [0, 0, 0]])
    scores = segmentation_scores(confusion)
    iou0, iou1 = 5 / (5 + 1 + 2), 4 / (4 + 2 + 1)
    assert scores["iou"][0].item() == pytest.approx(iou0)
    assert scores["iou"][1].item() == pytest.approx(iou1)
    assert math.isnan(scores["iou"][2].item())
    assert scores["mIoU"].item() == pytest.approx((iou0 + iou1) / 2)
    assert scores["aAcc"].item() == pytest.approx(9 / 12)


def test_task_loss_resizes_logits_and_skips_ignored_pixels() -> None:
    torch.manual_seed(0)
    module = SegmentationDistillationModule(Pointwise(), num_classes=3, ignore_index=255)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :2] = 255
    got = module.task_loss(logits, {"target": target})
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    keep = target != 255
    by_hand = -up.log_softmax(1).gather(1, target.clamp(max=2)[:, None])[:, 0][keep].mean()
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_auxiliary_head_adds_its_weighted_loss() -> None:
    torch.manual_seed(0)
    student = Pointwise()
    module = SegmentationDistillationModule(student, num_classes=3, aux_layer="aux", aux_weight=0.4)
    images, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    target[:, :3] = 255  # ignored pixels count in neither loss
    features = module.student_features(images)
    pooled = F.avg_pool2d(images, 2)
    keep = target != 255

    def ce(logits):  # by hand: mean over labelled pixels of -log softmax at the label
        log_p = F.interpolate(logits, size=(8, 8), mode="bilinear").log_softmax(1)
        return -log_p.gather(1, target.clamp(max=2)[:, None])[:, 0][keep].mean()

    expected = ce(student.head(pooled)) + 0.4 * ce(student.aux(pooled))
    got = module.task_loss_from_features(features, {"target": target})
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_missing_auxiliary_output_fails_clearly() -> None:
    module = SegmentationDistillationModule(Pointwise(), num_classes=3, aux_layer="aux")
    module.student.eval()  # the aux head does not run in eval mode
    features = module.student_features(torch.randn(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="aux_layer 'aux' did not run"):
        module.task_loss_from_features(features, {"target": torch.zeros(1, 8, 8, dtype=torch.long)})


def test_sliding_window_equals_whole_image_for_a_pointwise_model() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    images = torch.randn(2, 3, 21, 30)
    whole = SegmentationDistillationModule(model, num_classes=4).predict_logits(images)
    slide = SegmentationDistillationModule(
        model, num_classes=4, inference="slide", crop_size=(8, 12), stride=(5, 7)
    ).predict_logits(images)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)


def test_sliding_windows_average_overlaps() -> None:
    # a model whose logits are the window's own mean: overlapping windows must be averaged
    class WindowMean(nn.Module):
        def forward(self, x):
            return x[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 2, *x.shape[-2:])

    images = torch.zeros(1, 3, 1, 6)
    images[..., :3] = 1.0  # left half ones
    module = SegmentationDistillationModule(
        WindowMean(), num_classes=2, inference="slide", crop_size=(1, 4), stride=(1, 2)
    )
    # windows: columns 0-3 (mean 0.75) and 2-5 (mean 0.25); columns 2-3 are covered by both
    expected = torch.tensor([0.75, 0.75, 0.5, 0.5, 0.25, 0.25])
    torch.testing.assert_close(module.predict_logits(images)[0, 0, 0], expected)


def test_eval_scale_feeds_smaller_images_and_scores_full_labels() -> None:
    seen = []

    class Recorder(nn.Conv2d):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    module = SegmentationDistillationModule(Recorder(3, 2, 1), num_classes=2, eval_scale=0.5)
    out = module.predict_logits(torch.zeros(1, 3, 40, 60))
    assert seen == [(20, 30)] and out.shape == (1, 2, 40, 60)


def one_hot_images(target: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(target.clamp(max=classes - 1), classes).permute(0, 3, 1, 2).float()


def test_validation_logs_miou_of_student_and_teacher_once() -> None:
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 9], [2, 2, 2, 9]]])
    images = one_hot_images(target, 3)
    # the student predicts class 0 where the truth is 2 in the last row (3 of the 6 class-2 pixels)
    images_student = images.clone()
    images_student[0, :, 3, :3] = torch.tensor([1.0, 0.0, 0.0])[:, None]

    class Fixed(nn.Module):
        def forward(self, x):
            return images_student.expand(x.shape[0], -1, -1, -1)

    module = SegmentationDistillationModule(
        Fixed(), Oracle(), num_classes=3, ignore_index=9, class_names=["a", "b", "c"]
    )
    loader = DataLoader(TensorDataset(images, target), batch_size=1)
    t = trainer()
    metrics = t.validate(module, loader, verbose=False)[0]
    iou = {"a": 4 / 7, "b": 4 / 4, "c": 3 / 6}  # class a: 4 right + 3 wrong predicted as a
    for name, value in iou.items():
        assert metrics[f"val/iou/{name}"] == pytest.approx(value)
    assert metrics["val/mIoU"] == pytest.approx(sum(iou.values()) / 3)
    assert metrics["val/aAcc"] == pytest.approx(11 / 14)
    # one-hot logits: -log softmax is log(e + 2) - 1 at a right pixel and log(e + 2) at a wrong one
    right, wrong = math.log(math.e + 2) - 1, math.log(math.e + 2)
    assert metrics["val/loss"] == pytest.approx((11 * right + 3 * wrong) / 14, rel=1e-6)
    assert metrics["val/teacher_mIoU"] == pytest.approx(1.0)
    assert module.teacher_validated
    again = t.validate(module, loader, verbose=False)[0]
    assert "val/teacher_mIoU" not in again


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ignore_index 2 is a class index"):
        SegmentationDistillationModule(Pointwise(), num_classes=3, ignore_index=2)
    with pytest.raises(ValueError, match="crop_size"):
        SegmentationDistillationModule(Pointwise(), num_classes=3, inference="slide")
    with pytest.raises(ValueError, match="class_names has 2 names"):
        SegmentationDistillationModule(Pointwise(), num_classes=3, class_names=["a", "b"])
    module = SegmentationDistillationModule(Pointwise(), num_classes=5)
    with pytest.raises(ValueError, match=r"expected \(N, 5, h, w\)"):
        module.task_loss(torch.zeros(1, 3, 4, 4), {"target": torch.zeros(1, 8, 8, dtype=torch.long)})


def test_torchvision_segmenter_returns_head_resolution_logits_and_aux_only_in_training() -> None:
    net = TorchvisionSegmenter("fcn_resnet50", num_classes=4, aux_head=True)
    calls = []
    net.aux_classifier.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 32, 48)).shape == (1, 4, 4, 6)
        net.eval()
        net(torch.zeros(1, 3, 32, 48))
    assert calls == [1]
    with pytest.raises(ValueError, match="Unknown torchvision segmentation model"):
        TorchvisionSegmenter("deeplabv3_resnet5", num_classes=4)


def test_torchvision_segmenter_loads_backbone_weights(tmp_path) -> None:
    import torchvision

    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(classifier.state_dict(), tmp_path / "mbv3.pth")
    net = TorchvisionSegmenter("lraspp_mobilenet_v3_large", 3, backbone_checkpoint=str(tmp_path / "mbv3.pth"))
    torch.testing.assert_close(net.backbone["0"][0].weight, classifier.features[0][0].weight)
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="lack"):
        TorchvisionSegmenter("lraspp_mobilenet_v3_large", 3, backbone_checkpoint=str(tmp_path / "bad.pth"))


def tile(picture: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The ``(3, h, w)`` 0-255 integer pixels of the tile at ``box`` (top, left, height, width)."""
    top, left, height, width = box
    return (picture[:, top : top + height, left : left + width] * 255).round().int()


def test_preview_draws_image_labels_and_both_predictions(tmp_path) -> None:
    from datamodules import SyntheticSegmentationDataModule

    data = SyntheticSegmentationDataModule(
        num_classes=3, image_size=16, train_size=4, val_size=3, batch_size=2
    )
    module = SegmentationDistillationModule(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), num_classes=3)
    preview = SegmentationPreview(num_images=2, dirpath=str(tmp_path))
    trainer(max_epochs=1, callbacks=[preview], limit_train_batches=1).fit(module, data)
    assert [p.split("/")[-1] for p in preview.saved] == ["epoch_000.png"]
    data.setup("validate")
    images, targets = zip(*(data.val_dataloader().dataset[i] for i in (0, 2)))
    targets = torch.stack(targets)
    grid = preview.render(module, data, torch.stack(images), targets)
    assert grid.ndim == 3 and grid.shape[0] == 3 and grid.dtype == torch.float32
    assert 0.0 <= grid.min() and grid.max() <= 1.0
    assert preview.last_columns == ["image", "ground truth", "teacher", "student"]
    # the legend: every class name of the datamodule with its palette colour, then black for ignored pixels
    assert preview.last_legend == [*zip(data.classes, map(tuple, data.palette)), ("ignored", (0, 0, 0))]
    # 2 rows x 4 columns of equal tiles, 16 px enlarged by a whole factor
    assert [len(row) for row in preview.last_boxes] == [4, 4]
    top, left, height, width = preview.last_boxes[0][1]  # first row, ground truth
    scale = height // 16
    assert height == width == 16 * scale and scale >= 1
    assert grid.shape[-2] >= preview.last_boxes[1][0][0] + height
    # the ground-truth tile is the palette-coloured label map, each pixel a scale x scale block (nearest)
    palette = torch.tensor(data.palette, dtype=torch.int)
    expected = torch.zeros(3, 16, 16, dtype=torch.int)  # ignored pixels black
    known = targets[0] != data.ignore_index
    expected[:, known] = palette[targets[0][known]].T
    truth = tile(grid, preview.last_boxes[0][1])
    assert torch.equal(truth, expected.repeat_interleave(scale, 1).repeat_interleave(scale, 2))
    # one pixel by hand: the centre of a shape's pixel (not background, whose colour is black) has exactly
    # its class's palette colour
    y, x = (known & (targets[0] > 0)).nonzero()[0].tolist()
    colour = grid[:, top + y * scale + scale // 2, left + x * scale + scale // 2]
    assert tuple((colour * 255).round().int().tolist()) == tuple(data.palette[targets[0, y, x]]) != (0, 0, 0)


def test_preview_without_teacher_has_no_teacher_column() -> None:
    from datamodules import SyntheticSegmentationDataModule

    data = SyntheticSegmentationDataModule(num_classes=4, image_size=16, train_size=2, val_size=2)
    data.setup("validate")
    images, targets = zip(*(data.val_dataloader().dataset[i] for i in (0, 1)))
    module = SegmentationDistillationModule(nn.Conv2d(3, 4, 1), num_classes=4)
    preview = SegmentationPreview(num_images=2)
    preview.render(module, data, torch.stack(images), torch.stack(targets))
    assert preview.last_columns == ["image", "ground truth", "student"]
    assert [name for name, _ in preview.last_legend] == [*data.classes, "ignored"]
    assert data.classes == ["background", "class_1", "class_2", "class_3"]


def test_teacher_runs_at_another_input_size() -> None:
    from lightningkd import Renormalize
    from lightningkd.distillers import ChannelWiseDivergence, PixelKD

    seen = {}

    class Recorder(nn.Conv2d):
        def forward(self, x):
            seen[self.tag] = tuple(x.shape[-2:])
            return super().forward(x)

    student, teacher = Recorder(3, 4, 1), Recorder(3, 4, 1)
    student.tag, teacher.tag = "student", "teacher"
    module = SegmentationDistillationModule(
        student,
        teacher,
        [ChannelWiseDivergence(temperature=4.0), PixelKD(ignore_index=255)],
        num_classes=4,
        teacher_input=Renormalize([0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3, scale=2.0),
    )
    images, target = torch.randn(2, 3, 8, 12), torch.randint(0, 4, (2, 8, 12))
    batch = {"image": images, "target": target}
    loss = module.training_step(batch, 0)
    assert seen == {"student": (8, 12), "teacher": (16, 24)}
    assert torch.isfinite(loss)
    # the teacher's 16x24 logits are resized to the student's 8x12 before the losses
    direct = torch.nn.functional.interpolate(
        teacher(F.interpolate(images, size=(16, 24), mode="bilinear")), size=(8, 12), mode="bilinear"
    )
    expected = ChannelWiseDivergence(temperature=4.0)(
        {"output": student(images)}, {"output": direct.detach()}
    )
    assert module.distillers[0](
        {"output": student(images)}, module.teacher_features(images)
    ).item() == pytest.approx(expected.item(), rel=1e-5)


def test_preview_goes_to_image_loggers_and_draws_bpkd_masks(tmp_path) -> None:
    import torchvision
    from lightning.pytorch.loggers import Logger, TensorBoardLogger

    from datamodules import SyntheticSegmentationDataModule
    from lightningkd.distillers import BPKD

    class ImageLogger(Logger):
        name, version = "images", 0
        images: list = []

        def log_image(self, key, images, step=None):
            self.images.append((key, images[0].shape))

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    data = SyntheticSegmentationDataModule(
        num_classes=3, image_size=16, train_size=4, val_size=2, batch_size=2
    )
    module = SegmentationDistillationModule(
        nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), [BPKD(num_classes=3, edge_width=3)], num_classes=3
    )
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    loggers = [ImageLogger(), tensorboard]
    preview = SegmentationPreview(num_images=2, dirpath=str(tmp_path / "png"))
    trainer(max_epochs=1, callbacks=[preview], limit_train_batches=1, logger=loggers).fit(module, data)
    # 2 rows x 6 columns: image, truth, teacher, student, BPKD edge mask, BPKD body mask
    assert BPKD(num_classes=3).name == "bpkd"
    assert preview.last_columns == ["image", "ground truth", "teacher", "student", "bpkd edge", "bpkd body"]
    assert [len(row) for row in preview.last_boxes] == [6, 6]
    saved = torchvision.io.read_image(preview.saved[0])
    assert ImageLogger.images == [("val/segmentation_preview", saved.shape)]
    # the edge and body masks are drawn in black and white only
    for box in preview.last_boxes[0][4:]:
        assert set(tile(saved.float() / 255, box).unique().tolist()) <= {0, 255}
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    content = b"".join(e.read_bytes() for e in events)
    assert b"val/segmentation_preview" in content and b"\x89PNG" in content  # an image summary


def test_preview_draws_maskd_spatial_masks_as_heat_maps(tmp_path) -> None:
    from matplotlib import colormaps

    from datamodules import SyntheticSegmentationDataModule
    from lightningkd.distillers import MasKD
    from lightningkd.distillers.maskd import ReceptiveTokens, save_mask_tokens

    torch.manual_seed(0)
    tokens = ReceptiveTokens(channels=3, num_tokens=4)
    tokens.tokens.data.normal_(0.0, 2.0)  # masks far from the untrained tokens' 0.5 everywhere
    path = save_mask_tokens(tmp_path / "tokens.pt", {"output": tokens})
    maskd = MasKD(tokens=str(path), student_layer="output", teacher_layer="output", channels=3, eps=1e-5)
    # both models predict at half resolution: 8 x 8 masks, resized to the 16 x 16 images
    module = SegmentationDistillationModule(Pointwise(), Pointwise(), [maskd], num_classes=3)
    data = SyntheticSegmentationDataModule(num_classes=3, image_size=16, train_size=2, val_size=2)
    data.setup("validate")
    images, targets = (torch.stack(t) for t in zip(*(data.val_dataloader().dataset[i] for i in (0, 1))))
    plain = SegmentationPreview(num_images=2, max_masks=0).render(module, data, images, targets)
    preview = SegmentationPreview(num_images=2)
    grid = preview.render(module, data, images, targets)
    base = ["image", "ground truth", "teacher", "student"]
    assert preview.last_columns == [*base, "maskd mask 0", "maskd mask 1", "maskd mask 2"]  # max_masks 3 of 4
    assert [len(row) for row in preview.last_boxes] == [7, 7] and module.training
    # three more tiles in every row: the picture is wider by three tiles and their gaps
    top, left, height, width = preview.last_boxes[0][4]
    assert grid.shape[-2] == plain.shape[-2] and grid.shape[-1] - plain.shape[-1] == 3 * (width + 4)
    # each mask tile is the image with the teacher's token mask, resized bilinearly, as an inferno heat map
    scale = height // 16
    picture = images * torch.tensor(data.std).view(1, 3, 1, 1) + torch.tensor(data.mean).view(1, 3, 1, 1)
    with torch.no_grad():
        masks = torch.sigmoid(torch.einsum("tc,nchw->nthw", tokens.tokens, module.teacher.eval()(images)))
    masks = F.interpolate(masks, size=(16, 16), mode="bilinear", align_corners=False)
    assert masks.amax() - masks.amin() > 0.5
    for row in range(2):
        for k in range(3):
            heat = torch.from_numpy(colormaps["inferno"](masks[row, k].numpy())[..., :3]).permute(2, 0, 1)
            expected = (0.5 * picture[row].clamp(0, 1).double() + 0.5 * heat) * 255
            expected = expected.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            drawn = tile(grid, preview.last_boxes[row][4 + k])
            assert (drawn - expected).abs().max() <= 1, (row, k)
            assert (drawn - tile(grid, preview.last_boxes[row][0])).abs().amax(0).float().mean() > 20
    # max_masks limits the columns; 0 draws none
    for max_masks, count in ((1, 1), (0, 0)):
        preview = SegmentationPreview(num_images=2, max_masks=max_masks)
        preview.render(module, data, images, targets)
        assert preview.last_columns == base + [f"maskd mask {k}" for k in range(count)]
    with pytest.raises(ValueError, match="max_masks"):
        SegmentationPreview(max_masks=-1)


def test_preview_shrinks_large_tiles() -> None:
    module = SegmentationDistillationModule(nn.Conv2d(3, 2, 1), num_classes=2)
    preview = SegmentationPreview(num_images=1, max_side=32)
    target = torch.zeros(1, 64, 128, dtype=torch.long)
    target[:, :, 64:] = 1
    grid = preview.render(module, None, torch.zeros(1, 3, 64, 128), target)
    # image, truth, student shrunk to 16x32, then each pixel drawn as a whole-number block so titles fit
    assert preview.last_columns == ["image", "ground truth", "student"]
    (_, _, height, width), _, _ = preview.last_boxes[0]
    assert height * 2 == width and width % 32 == 0
    truth = tile(grid, preview.last_boxes[0][1])
    scale = width // 32
    assert torch.equal(truth[:, ::scale, ::scale], truth[:, scale - 1 :: scale, scale - 1 :: scale])
    # no datamodule: names "class <i>" and the fixed fallback palette
    assert [name for name, _ in preview.last_legend] == ["class 0", "class 1", "ignored"]
    assert truth[:, 0, width - 1].tolist() == list(preview.last_legend[1][1])


def test_several_auxiliary_heads_each_add_their_loss() -> None:
    class TwoAux(Pointwise):
        def __init__(self) -> None:
            super().__init__()
            self.aux2 = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            out = super().forward(x)
            if self.training:
                self.aux2(F.avg_pool2d(x, 2))
            return out

    torch.manual_seed(0)
    student = TwoAux()
    module = SegmentationDistillationModule(student, num_classes=3, aux_layer=["aux", "aux2"], aux_weight=0.4)
    images, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    pooled = F.avg_pool2d(images, 2)

    def ce(logits):
        return F.cross_entropy(F.interpolate(logits, size=(8, 8), mode="bilinear"), target)

    expected = ce(student.head(pooled)) + 0.4 * ce(student.aux(pooled)) + 0.4 * ce(student.aux2(pooled))
    got = module.task_loss_from_features(module.student_features(images), {"target": target})
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
