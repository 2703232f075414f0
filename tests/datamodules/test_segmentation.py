"""Segmentation datamodules (datamodules/segmentation/): synthetic shapes, CamVid (SegNet layout), tiny
replicas of the Cityscapes, ADE20K and Pascal VOC layouts, the joint image/mask transforms, label checks
and ``skip_corrupt``."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    VOC_PALETTE,
    ADE20KDataModule,
    CamVidDataModule,
    CityscapesDataModule,
    SegmentationFileDataset,
    SyntheticSegmentationDataModule,
    VOCSegmentationDataModule,
    cityscapes_lut,
    seg_eval_transform,
    seg_train_transform,
    synthetic_segmentation,
    voc_colormap,
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


# ============================================== Cityscapes, ADE20K, Pascal VOC (tiny replicas)

H, W = 64, 128


def _save_image(path: Path, seed: int, ext_format: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path, format=ext_format)


def _save_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8), mode="P" if palette else "L")
    if palette:  # VOC SegmentationClass masks are palette PNGs: the indices are the labels
        img.putpalette([c for rgb in voc_colormap(256) for c in rgb])
    img.save(path)


def _stripes(values: list[int]) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    for i, v in enumerate(values):
        mask[:, i * W // len(values) : (i + 1) * W // len(values)] = v
    return mask


# ----------------------------------------------------------------------------------------- Cityscapes

CS_IDS = [0, 7, 26, 33, 4]  # -> 255, 0, 13, 18, 255


def _cityscapes(root: Path) -> Path:
    for split, cities in (("train", {"aachen": 2, "bremen": 1}), ("val", {"lindau": 2})):
        for city, n in cities.items():
            for i in range(n):
                stem = f"{city}_{i:06d}_000019"
                _save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", i)
                _save_mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", _stripes(CS_IDS))
                # decoy train-id files (must not be read)
                _save_mask(
                    root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", _stripes([1] * 5)
                )
    return root


def test_cityscapes_counts_mapping_and_loader(tmp_path):
    dm = CityscapesDataModule(_cityscapes(tmp_path / "cs"), crop_size=(32, 64), batch_size=2, num_workers=0)
    assert dm.num_classes == 19 and len(dm.classes) == 19 and len(dm.palette) == 19
    assert dm.classes == CITYSCAPES_CLASSES and dm.palette == CITYSCAPES_PALETTE
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    _, mask = dm.val_set[0]
    assert mask.shape == (H, W) and mask.dtype == torch.int64
    assert [int(mask[0, i * W // 5]) for i in range(5)] == [255, 0, 13, 18, 255]
    lut = cityscapes_lut()
    assert lut[26] == 13 and lut[0] == 255 and lut[7] == 0 and lut[33] == 18 and lut[34] == 255
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 64) and images.dtype == torch.float32
    assert masks.shape == (2, 32, 64) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 13, 18, 255}
    assert len(dm.test_dataloader().dataset) == 2


def test_cityscapes_wrong_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="leftImg8bit") as info:
        CityscapesDataModule(tmp_path / "empty")
    assert "gtFine_labelIds.png" in str(info.value) and "Offending path" in str(info.value)
    with pytest.raises(FileNotFoundError, match="Expected the official Cityscapes layout"):
        CityscapesDataModule(tmp_path / "missing")
    root = _cityscapes(tmp_path / "cs")
    next((root / "gtFine" / "val" / "lindau").glob("*_labelIds.png")).unlink()
    with pytest.raises(FileNotFoundError, match="No labelIds mask"):
        CityscapesDataModule(root)


# --------------------------------------------------------------------------------------------- ADE20K

ADE_VALUES = [0, 1, 75, 150]  # -> 255, 0, 74, 149


def _ade(parent: Path) -> Path:
    root = parent / "ADEChallengeData2016"
    for folder, prefix, n in (("training", "ADE_train", 3), ("validation", "ADE_val", 2)):
        for i in range(n):
            _save_image(root / "images" / folder / f"{prefix}_{i + 1:08d}.jpg", i, "JPEG")
            _save_mask(root / "annotations" / folder / f"{prefix}_{i + 1:08d}.png", _stripes(ADE_VALUES))
    return parent


@pytest.mark.parametrize("nested", [False, True])
def test_ade20k_counts_mapping_and_loader(tmp_path, nested):
    parent = _ade(tmp_path / "data")
    data_dir = parent / "ADEChallengeData2016" if nested else parent
    dm = ADE20KDataModule(data_dir, crop_size=(48, 48), batch_size=3, num_workers=0)
    assert dm.num_classes == 150 and len(dm.classes) == 150 and len(dm.palette) == 150
    assert dm.classes[:5] == ["wall", "building", "sky", "floor", "tree"] and dm.classes[-1] == "flag"
    assert dm.classes == ADE20K_CLASSES and len(set(ADE20K_PALETTE)) == 150
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    _, mask = dm.val_set[1]
    assert [int(mask[0, i * W // 4]) for i in range(4)] == [255, 0, 74, 149]
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 48, 48) and masks.shape == (3, 48, 48)
    values = set(masks.unique().tolist())
    assert values <= {0, 74, 149, 255}


def test_ade20k_wrong_folder(tmp_path):
    (tmp_path / "x" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016") as info:
        ADE20KDataModule(tmp_path / "x")
    assert "annotations/" in str(info.value) and "Offending path" in str(info.value)


# ------------------------------------------------------------------------------------------------ VOC

VOC_VALUES = [0, 15, 20, 255]


def _voc(parent: Path, sbd: bool = False) -> Path:
    root = parent / "VOCdevkit" / "VOC2012"
    names = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033", "2007_000042", "2007_000061"]}
    for i, name in enumerate(names["train"] + names["val"] + ["2008_000002"]):
        _save_image(root / "JPEGImages" / f"{name}.jpg", i, "JPEG")
        _save_mask(root / "SegmentationClass" / f"{name}.png", _stripes(VOC_VALUES), palette=True)
        if sbd:
            _save_mask(root / "SegmentationClassAug" / f"{name}.png", _stripes([0, 1, 2, 255]))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, split_names in names.items():
        (sets / f"{split}.txt").write_text("\n".join(split_names) + "\n")
    if sbd:  # DeepLab-style 'image mask' lines
        aug = names["train"] + ["2008_000002"]
        (sets / "train_aug.txt").write_text(
            "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in aug)
        )
    return parent


@pytest.mark.parametrize("level", ["parent", "VOCdevkit", "VOC2012"])
def test_voc_counts_mapping_and_loader(tmp_path, level):
    parent = _voc(tmp_path / "data")
    data_dir = {
        "parent": parent,
        "VOCdevkit": parent / "VOCdevkit",
        "VOC2012": parent / "VOCdevkit" / "VOC2012",
    }
    dm = VOCSegmentationDataModule(data_dir[level], crop_size=(40, 40), batch_size=2, num_workers=0)
    assert dm.num_classes == 21 and dm.classes == VOC_CLASSES and dm.palette == VOC_PALETTE
    assert VOC_PALETTE[15] == (192, 128, 128) and VOC_PALETTE[20] == (0, 64, 128)
    dm.setup("fit")
    assert len(dm.train_set) == 2 and len(dm.val_set) == 3
    _, mask = dm.val_set[0]
    assert [int(mask[0, i * W // 4]) for i in range(4)] == [0, 15, 20, 255]
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 40, 40) and masks.shape == (2, 40, 40) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 15, 20, 255}


def test_voc_sbd(tmp_path):
    dm = VOCSegmentationDataModule(_voc(tmp_path, sbd=True), use_sbd=True, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 3
    assert "SegmentationClassAug" in str(dm._files["train"][1][0])
    _, mask = dm.train_set.load(0)
    assert sorted(np.unique(mask).tolist()) == [0, 1, 2, 255]
    _, val_mask = dm.val_set.load(0)
    assert sorted(np.unique(val_mask).tolist()) == [0, 15, 20, 255]


def test_voc_wrong_folder(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="JPEGImages") as info:
        VOCSegmentationDataModule(tmp_path / "nothing")
    assert "SegmentationClass/" in str(info.value) and "train_aug.txt" in str(info.value)
    with pytest.raises(FileNotFoundError, match="train_aug.txt"):
        VOCSegmentationDataModule(_voc(tmp_path / "v"), use_sbd=True)


# ============================================================================= label checks

CAMVID_H, CAMVID_W = 24, 32


def _camvid_replica(root: Path, n_train: int = 2, n_val: int = 5) -> Path:
    """A generated SegNet CamVid folder: PNG images, masks holding 0..10 and 11 (unlabelled)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for i in range(n):
            name = f"{split}_{i:03d}.png"
            _save(root / split / name, rng.integers(0, 256, (CAMVID_H, CAMVID_W, 3), dtype=np.uint8))
            _save(root / f"{split}annot" / name, rng.integers(0, 12, (CAMVID_H, CAMVID_W), dtype=np.uint8))
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_camvid_mask_value_out_of_range_names_the_file(tmp_path):
    root = _camvid_replica(tmp_path / "camvid")
    bad = root / "valannot" / "val_003.png"
    mask = np.array(Image.open(bad))
    mask[5, 7] = 50  # CamVid: classes 0..10, ignore 11
    _save(bad, mask)
    dm = CamVidDataModule(root, batch_size=2, num_workers=0, augment=False)
    dm.setup("validate")
    for i in (0, 1, 2, 4):  # the other masks are fine
        assert dm.val_set[i][1].max() <= 11
    with pytest.raises(ValueError) as info:
        dm.val_set[3]
    message = str(info.value)
    for expected in (str(bad), "label 50", "11 classes", "ignore index 11", "mask encoding"):
        assert expected in message, expected
    with pytest.raises(ValueError, match="val_003.png' holds label 50"):  # also through the loader
        list(dm.val_dataloader())


def test_camvid_ignore_index_must_match_the_masks(tmp_path):
    root = _camvid_replica(tmp_path / "camvid", n_val=1)
    _save(root / "valannot" / "val_000.png", np.full((CAMVID_H, CAMVID_W), 11, np.uint8))  # all unlabelled
    dm = CamVidDataModule(root, batch_size=1, num_workers=0, augment=False, ignore_index=255)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"holds label 11, .*11 classes .* ignore index 255"):
        dm.val_set[0]


@pytest.mark.parametrize(
    ("make", "module", "bad_value", "valid"),
    [
        (lambda p: _cityscapes(p), CityscapesDataModule, 40, "0..33"),
        (lambda p: _ade(p), ADE20KDataModule, 200, "0..150"),
        (lambda p: _voc(p), VOCSegmentationDataModule, 30, "0..20, 255"),
    ],
    ids=["cityscapes", "ade20k", "voc"],
)
def test_mapped_mask_with_unmapped_value_names_the_file(tmp_path, make, module, bad_value, valid):
    dm = module(make(tmp_path / "data"), batch_size=1, num_workers=0, augment=False)
    dm.setup("validate")
    path = Path(os.fsdecode(dm.val_set.masks[1]))
    raw = np.array(Image.open(path))
    raw[0, 0] = bad_value
    _save_mask(path, raw, palette=Image.open(path).mode == "P")
    dm.val_set[0]  # untouched masks still load
    with pytest.raises(ValueError) as info:
        dm.val_set[1]
    message = str(info.value)
    for expected in (str(path), f"raw label {bad_value}", f"{dm.num_classes} classes", "ignore index 255"):
        assert expected in message, expected
    assert f"valid raw values: {valid}" in message and "label mapping" in message


def test_custom_lut_mapping_outside_the_classes_is_refused(tmp_path):
    from datamodules import LabelMappedSegmentationDataset

    _save(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / "m.png", np.array([[0, 1], [2, 2]], np.uint8).repeat(2, 0).repeat(2, 1))
    lut = np.full(256, 255, np.uint8)
    lut[:3] = [0, 1, 7]  # raw 2 -> 7, but there are only 3 classes
    ds = LabelMappedSegmentationDataset(
        [tmp_path / "x.png"], [tmp_path / "m.png"], lut, num_classes=3, ignore_index=255
    )
    with pytest.raises(ValueError, match=r"m\.png' holds raw label 2, .* 3 classes \(0\.\.2\)"):
        ds[0]
    unchecked = LabelMappedSegmentationDataset([tmp_path / "x.png"], [tmp_path / "m.png"], lut)
    assert unchecked[0][1].unique().tolist() == [0, 1, 7]  # num_classes=None: no check, as documented


def test_colour_mask_is_a_value_error_not_a_corrupt_file(tmp_path):
    root = _camvid_replica(tmp_path / "camvid", n_val=1)
    _save(root / "valannot" / "val_000.png", np.zeros((CAMVID_H, CAMVID_W, 3), np.uint8))
    dm = CamVidDataModule(root, batch_size=1, num_workers=0, augment=False, skip_corrupt=True)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"(?s)val_000\.png' has mode RGB.*one class index per pixel"):
        dm.val_set[0]


# ============================================================================= skip_corrupt


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_camvid_corrupt_image_stops_by_default(tmp_path):
    root = _camvid_replica(tmp_path / "camvid")
    bad = root / "val" / "val_002.png"
    _truncate(bad)
    dm = CamVidDataModule(root, batch_size=2, num_workers=0, augment=False)
    with pytest.raises(OSError, match=re.escape(str(bad))):
        list(dm.val_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("corrupt", ["val/val_002.png", "valannot/val_002.png"])
def test_camvid_skip_corrupt(tmp_path, num_workers, corrupt):
    root = _camvid_replica(tmp_path / "camvid")
    expected = [np.array(Image.open(root / "valannot" / f"val_{i:03d}.png")) for i in (0, 1, 3, 4)]
    _truncate(root / corrupt)
    dm = CamVidDataModule(root, batch_size=2, num_workers=num_workers, augment=False, skip_corrupt=True)
    batches = list(dm.val_dataloader())
    assert [len(masks) for _, masks in batches] == [2, 1, 1]  # sample 2 dropped from the second batch
    masks = torch.cat([m for _, m in batches])
    for mask, want in zip(masks, expected):  # every other sample, in order
        assert np.array_equal(mask.numpy(), want)
    assert dm.skipped_files == {str(root / corrupt): 1}
    with pytest.warns(UserWarning, match=r"(?s)skipped 1 samples of 1 unreadable files.*val_002\.png \(1x\)"):
        dm.teardown("validate")
