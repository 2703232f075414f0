"""Segmentation datamodules: synthetic shapes, CamVid (SegNet layout) and the joint image/mask transforms."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules.seg_transforms import seg_eval_transform, seg_train_transform
from datamodules.segmentation import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CamVidDataModule,
    SegmentationFileDataset,
    SyntheticSegmentationDataModule,
    synthetic_segmentation,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
CAMVID = SHARED_DATA / "camvid"
needs_camvid = pytest.mark.skipif(
    not (CAMVID / "train.txt").is_file(),
    reason=f"real CamVid not found at {CAMVID} (the shared data folder ../shared/data is absent)",
)


def _unnormalise(image: torch.Tensor, mean, std) -> np.ndarray:
    x = image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (x * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_batches_shapes_dtypes_labels():
    dm = SyntheticSegmentationDataModule(
        num_classes=5, image_size=32, train_size=16, val_size=8, batch_size=4
    )
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert masks.shape == (4, 32, 32) and masks.dtype == torch.int64
    values = set(torch.cat([m for _, m in dm.val_dataloader()]).unique().tolist())
    assert values <= set(range(5)) | {255}
    assert dm.num_classes == 5 and dm.ignore_index == 255
    assert len(dm.classes) == 5 and len(dm.palette) == 5 and dm.classes[0] == "background"
    assert len(dm.val_set) == 8 and dm.test_dataloader() is not None
    # normalised: roughly zero mean, unit-ish spread
    assert abs(images.mean().item()) < 0.6 and 0.4 < images.std().item() < 1.5


def test_synthetic_deterministic_and_seeded():
    a = synthetic_segmentation(seed=3, train_size=4, val_size=2)
    b = synthetic_segmentation(seed=3, train_size=4, val_size=2)
    c = synthetic_segmentation(seed=4, train_size=4, val_size=2)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][1], c[0][1])


def test_synthetic_boundaries_and_ignore_pixels():
    (x, y), _ = synthetic_segmentation(num_classes=5, image_size=64, train_size=16, val_size=1)
    assert (y == 0).any() and (y > 0).any()  # background and objects
    for mask in y:  # every image has an object with a real boundary (a class change between neighbours)
        assert (mask[:, 1:] != mask[:, :-1]).any()
    ignored = y == 255
    assert 0 < ignored.float().mean() < 0.05  # a few, not many
    # every ignored pixel sits next to a labelled pixel of another class or another ignored pixel on an edge
    pad = torch.nn.functional.pad(y.float(), (1, 1, 1, 1), mode="replicate")
    neighbours = torch.stack([pad[:, 1:-1, :-2], pad[:, 1:-1, 2:], pad[:, :-2, 1:-1], pad[:, 2:, 1:-1]])
    assert ((neighbours != 255) & (neighbours != neighbours[0:1])).any(0)[ignored].float().mean() > 0.5
    # classes are distinguishable from pixels: per-class mean colours differ
    means = [x.permute(0, 2, 3, 1)[y == c].mean(0) for c in range(5) if (y == c).any()]
    assert min(torch.dist(a, b).item() for i, a in enumerate(means) for b in means[i + 1 :]) > 0.02


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ignore_index"):
        SyntheticSegmentationDataModule(num_classes=5, ignore_index=3)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSegmentationDataModule(num_classes=1)


# -------------------------------------------------------------------------------------------- transforms


def test_train_transform_pads_with_ignore_index():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    t = seg_train_transform((40, 50), scale_range=(1.0, 1.0), ignore_index=11, mean=mean, std=std)
    assert t.mean == mean and t.std == std
    image = np.full((30, 20, 3), 200, np.uint8)
    mask = np.full((30, 20), 3, np.uint8)
    zero = ((0 - torch.tensor(mean)) / torch.tensor(std))[:, None, None].expand(3, 40, 50)
    for _ in range(20):  # photometric jitter is random: padding must stay exactly 0 every time
        out = t(image=image, mask=mask)
        img, m = out["image"], torch.as_tensor(out["mask"])
        assert img.shape == (3, 40, 50) and m.shape == (40, 50)
        assert (m == 11).sum() == 40 * 50 - 30 * 20 and (m == 3).sum() == 30 * 20
        padded = (m == 11)[None].expand_as(img)
        assert torch.allclose(img[padded], zero[padded])


def test_train_transform_flip_keeps_alignment():
    rng = np.random.default_rng(0)
    mask = (
        np.repeat(rng.integers(0, 5, (12, 16)), 4, axis=0).repeat(4, axis=1).astype(np.uint8)
    )  # 48x64 blocks
    mask[:, :8] = 0  # make the image asymmetric
    image = np.stack([mask * 40, 255 - mask * 40, np.full_like(mask, 7)], axis=-1).astype(
        np.uint8
    )  # f(image)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    t = seg_train_transform(
        (48, 64), (1.0, 1.0), ignore_index=11, mean=mean, std=std, hflip_p=1.0, photometric=False
    )
    out = t(image=image, mask=mask)
    img, m = _unnormalise(out["image"], mean, std), np.asarray(out["mask"])
    assert np.array_equal(m, mask[:, ::-1])  # it was flipped
    assert np.array_equal(img[..., 0] // 40, m)  # and the mask still equals f(image)
    # with scaling and the default (random) flip the mask still follows the image away from edges
    t = seg_train_transform((48, 64), (0.75, 1.5), ignore_index=11, mean=mean, std=std, photometric=False)
    t.set_random_seed(0)
    for _ in range(5):
        out = t(image=image, mask=mask)
        img, m = _unnormalise(out["image"], mean, std), np.asarray(out["mask"])
        interior = np.zeros_like(m, dtype=bool)  # labelled pixels whose 4 neighbours share their class
        c = m[1:-1, 1:-1]
        interior[1:-1, 1:-1] = (
            (c != 11) & (c == m[:-2, 1:-1]) & (c == m[2:, 1:-1]) & (c == m[1:-1, :-2]) & (c == m[1:-1, 2:])
        )
        assert interior.sum() > 200
        assert (np.round(img[..., 0] / 40) == m)[interior].mean() > 0.98


def test_eval_transform_is_deterministic():
    t = seg_eval_transform()
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.ones((20, 30), np.uint8)
    a, b = t(image=image, mask=mask), t(image=image, mask=mask)
    assert torch.equal(a["image"], b["image"]) and a["image"].shape == (3, 20, 30)
    assert seg_eval_transform(size=(10, 15))(image=image, mask=mask)["mask"].shape == (10, 15)


# ------------------------------------------------------------------------------------------------ CamVid


@needs_camvid
def test_camvid_real_splits_and_values():
    dm = CamVidDataModule(CAMVID, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 367 and len(dm.val_set) == 101
    assert dm.num_classes == 11 and dm.ignore_index == 11
    assert dm.classes == CAMVID_CLASSES and len(dm.palette) == 11 == len(CAMVID_PALETTE)
    image, mask = dm.val_set[0]
    assert image.shape == (3, 360, 480) and image.dtype == torch.float32
    assert mask.shape == (360, 480) and mask.dtype == torch.int64
    for i in (0, 50, 100):
        raw = dm.val_set.load(i)[1]
        assert set(np.unique(raw).tolist()) <= set(range(12))


@needs_camvid
def test_camvid_train_augmentation_range_and_padding():
    dm = CamVidDataModule(CAMVID, crop_size=(400, 520), batch_size=2, num_workers=0)
    torch.manual_seed(0)  # the datasets seed their augmentation from torch
    dm.setup("fit")
    for i in range(3):
        image, mask = dm.train_set[i]
        assert image.shape == (3, 400, 520) and mask.shape == (400, 520)
        assert 0 <= mask.min() and mask.max() <= 11
    # no rescaling and a crop larger than the 480x360 image: the border is all padding
    ds = dm.train_set
    ds.transform = seg_train_transform((400, 520), (1.0, 1.0), ignore_index=11, mean=dm.mean, std=dm.std)
    image, mask = ds[0]
    # padding is bottom/right, then the random flip may move the right band to the left
    assert (mask[360:] == 11).all() and ((mask[:, 480:] == 11).all() or (mask[:, :40] == 11).all())
    assert (mask == 11).sum() >= 400 * 520 - 360 * 480
    assert set(mask.unique().tolist()) <= set(range(12))
    zero = (0 - torch.tensor(dm.mean)) / torch.tensor(dm.std)
    assert torch.allclose(image[:, 360:, :], zero[:, None, None].expand(3, 40, 520))


@needs_camvid
def test_camvid_loader_with_workers():
    dm = CamVidDataModule(CAMVID, crop_size=(128, 160), batch_size=4, num_workers=2)
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 128, 160) and images.dtype == torch.float32
    assert masks.shape == (4, 128, 160) and masks.dtype == torch.int64
    assert masks.min() >= 0 and masks.max() <= 11


@needs_camvid
def test_camvid_official_absolute_paths(tmp_path):
    root = tmp_path / "camvid"
    for folder in ("train", "trainannot", "val", "valannot"):
        (root / folder).mkdir(parents=True)
    lines = (CAMVID / "val.txt").read_text().split("\n")[:2]
    for split in ("train", "val"):
        entries = []
        for line in lines:
            img, ann = line.split()
            shutil.copy(CAMVID / img, root / split / Path(img).name)
            shutil.copy(CAMVID / ann, root / f"{split}annot" / Path(ann).name)
            # official SegNet list: absolute paths and .png images (here stored as .jpg)
            entries.append(
                f"/SegNet/CamVid/{split}/{Path(img).stem}.png /SegNet/CamVid/{split}annot/{Path(ann).name}"
            )
        (root / f"{split}.txt").write_text("\n".join(entries) + "\n")
    dm = CamVidDataModule(root, batch_size=2, num_workers=0, augment=False)
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 360, 480) and masks.shape == (2, 360, 480)
    # an unreadable mask names the file and the layout
    bad = root / "valannot" / Path(lines[0].split()[1]).name
    bad.write_bytes(b"not a png")
    dm.setup("validate")
    with pytest.raises(OSError, match=r"(?s)Cannot .*mask file.*valannot.*trainannot/\*\.png"):
        dm.val_set[0]


def test_camvid_wrong_folder_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)Expected the SegNet CamVid layout.*trainannot"):
        CamVidDataModule(tmp_path / "nope")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)train\.txt.*Offending path.*train\.txt.*valannot"):
        CamVidDataModule(tmp_path)
    (tmp_path / "train.txt").write_text("train/a.png trainannot/a.png\n")
    with pytest.raises(FileNotFoundError, match=r"(?s)trainannot/.*missing.*Offending path"):
        CamVidDataModule(tmp_path)
    (tmp_path / "trainannot").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)train/a\.png.*not in 'train/'.*Offending path.*a\.png"):
        CamVidDataModule(tmp_path)


def test_unreadable_image_names_file(tmp_path):
    img, ann = tmp_path / "x.jpg", tmp_path / "x.png"
    img.write_bytes(b"")
    cv2.imwrite(str(ann), np.zeros((4, 4), np.uint8))
    ds = SegmentationFileDataset([img], [ann], seg_eval_transform(), layout="LAYOUT-TREE")
    with pytest.raises(OSError, match=r"(?s)x\.jpg.*LAYOUT-TREE"):
        ds[0]
