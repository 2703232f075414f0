"""Cityscapes, ADE20K and Pascal VOC datamodules on tiny replicas of the official layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.seg_sets import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    VOC_PALETTE,
    ADE20KDataModule,
    CityscapesDataModule,
    VOCSegmentationDataModule,
    cityscapes_lut,
    voc_colormap,
)

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
