"""Tests of the detection datamodules (synthetic, COCO mini, BCCD VOC, generated replicas)."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules import (
    COCODetectionDataModule,
    DetectionDataset,
    DetectionRecord,
    SyntheticDetectionDataModule,
    VOCDetectionDataModule,
    detection_train_transform,
    load_voc_records,
    to_coco_detections,
    to_coco_ground_truth,
)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
COCO_DIR, BCCD_DIR = DATA / "coco-mini", DATA / "bccd"
needs_coco = pytest.mark.skipif(not COCO_DIR.is_dir(), reason=f"real COCO mini set not found at {COCO_DIR}")
needs_bccd = pytest.mark.skipif(not BCCD_DIR.is_dir(), reason=f"real BCCD set not found at {BCCD_DIR}")
BCCD_CLASSES = ["RBC", "WBC", "Platelets"]


def _check_target(image: torch.Tensor, target: dict, num_classes: int) -> None:
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
    assert labels.dtype == torch.int64 and isinstance(target["image_id"], int)
    h, w = image.shape[1:]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ((labels >= 1) & (labels <= num_classes)).all()


def _map(dataset, loader_targets=None) -> float:
    from pycocotools.cocoeval import COCOeval

    gt = to_coco_ground_truth(dataset)
    if loader_targets is None:
        loader_targets = [dataset[i][1] for i in range(len(dataset))]
    dets = to_coco_detections(loader_targets, loader_targets)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


# ---------------------------------------------------------------- synthetic


def test_synthetic_counts_and_boxes():
    dm = SyntheticDetectionDataModule(num_classes=3, image_size=64, train_size=6, val_size=3, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3 and dm.num_classes == 3
    for ds in (dm.train_set, dm.val_set):
        for i in range(len(ds)):
            image, target = ds[i]
            assert image.shape == (3, 64, 64) and len(target["labels"]) >= 1
            _check_target(image, target, 3)
    # eval boxes are the exact extents of the drawn shapes
    record = dm.val_set.records[0]
    raw = record.image.astype(int)
    x1, y1, x2, y2 = record.boxes[-1].astype(int)  # the last shape is drawn on top: fully visible
    inside = raw[y1:y2, x1:x2]
    assert inside.max() > 120  # shape colours lie outside the background range [60, 120)
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 2 and len(targets) == 2


def test_synthetic_map_round_trip():
    dm = SyntheticDetectionDataModule(image_size=64, train_size=4, val_size=5)
    dm.setup("validate")
    assert _map(dm.val_set) == pytest.approx(1.0)


# ---------------------------------------------------------------- augmentation


def test_train_augmentation_boxes_follow_flip_and_scale():
    h, w = 60, 100
    image = np.zeros((h, w, 3), np.uint8)
    image[10:30, 5:25] = 255  # one white rectangle, box (5, 10, 25, 30)
    record = DetectionRecord(
        0, None, h, w, np.array([[5, 10, 25, 30]], np.float32), np.array([1]), image=image
    )
    transform = detection_train_transform(max_size=120, scale_range=(0.7, 1.3), mean=(0, 0, 0), std=(1, 1, 1))
    ds = DetectionDataset([record], ["a"], transform)
    flips = set()
    for _ in range(12):
        img, target = ds[0]
        _check_target(img, target, 1)
        x1, y1, x2, y2 = target["boxes"][0].tolist()
        ys, xs = np.nonzero(img[0].numpy() > 0.5)
        # the box tracks the white pixels after random scale and flip (within resampling error)
        assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5
        assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5
        s = img.shape[-1] / w
        flipped = x1 > img.shape[-1] / 2
        flips.add(flipped)
        expect_x = (img.shape[-1] - 25 * s, img.shape[-1] - 5 * s) if flipped else (5 * s, 25 * s)
        assert x1 == pytest.approx(expect_x[0], abs=1e-3) and x2 == pytest.approx(expect_x[1], abs=1e-3)
        assert y1 == pytest.approx(10 * img.shape[-2] / h, abs=0.5)
    assert flips == {True, False}


def test_box_at_border_stays_inside_after_flip():
    image = np.zeros((40, 50, 3), np.uint8)
    record = DetectionRecord(
        0,
        None,
        40,
        50,
        np.array([[0, 0, 50, 40], [-3, 2, 10, 45]], np.float32),
        np.array([1, 1]),
        image=image,
    )
    ds = DetectionDataset([record], ["a"], detection_train_transform(hflip_p=1.0))
    for _ in range(5):
        img, target = ds[0]
        _check_target(img, target, 1)
        assert len(target["boxes"]) == 2


# ---------------------------------------------------------------- COCO mini


@needs_coco
def test_coco_mini_counts_labels_and_crowd():
    dm = COCODetectionDataModule(COCO_DIR, batch_size=2, num_workers=0, min_size=None, max_size=256)
    dm.setup("fit")
    assert len(dm.train_set) == 128 and len(dm.val_set) == 79
    assert dm.num_classes == 80 and len(dm.label_to_cat_id) == 80
    assert sorted(dm.cat_id_to_label.values()) == list(range(1, 81))
    assert dm.cat_id_to_label[1] == 1 and dm.cat_id_to_label[90] == 80 and dm.classes[0] == "person"
    n_crowd = sum(len(r.ignore_boxes) for r in dm.train_set.records)
    assert n_crowd == 10  # the 10 crowd annotations of the train file are ignore regions, not targets
    for r in dm.train_set.records:
        assert len(r.boxes) == len(r.labels) and ((r.labels >= 1) & (r.labels <= 80)).all()
    assert sum(len(r.boxes) for r in dm.train_set.records) == 939 - 10
    dropped = COCODetectionDataModule(COCO_DIR, num_workers=0, keep_empty=False)
    dropped.setup("fit")
    assert len(dropped.train_set) == 126 and len(dropped.val_set) == 79
    image, target = dm.train_set[0]
    assert max(image.shape[1:]) <= 256 * 1.25 + 1
    _check_target(image, target, 80)


@needs_coco
def test_coco_mini_round_trip_map_is_one():
    dm = COCODetectionDataModule(COCO_DIR, num_workers=0, min_size=None, max_size=200)
    dm.setup("validate")
    subset = torch.utils.data.Subset(dm.val_set, range(12))
    # targets come from the resized eval images and are mapped back to original coordinates
    assert _map(subset, [subset[i][1] for i in range(len(subset))]) == pytest.approx(1.0)


@needs_coco
def test_coco_loader_with_workers():
    dm = COCODetectionDataModule(COCO_DIR, batch_size=2, num_workers=2, min_size=None, max_size=128)
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 2 and len(targets) == 2
    for image, target in zip(images, targets):
        _check_target(image, target, 80)


# ---------------------------------------------------------------- BCCD (VOC)


@needs_bccd
def test_bccd_splits_classes_and_difficult():
    dm = VOCDetectionDataModule(BCCD_DIR, BCCD_CLASSES, num_workers=0, test_split="test")
    dm.setup(None)
    for split in ("train", "val", "test"):
        listed = [x for x in (BCCD_DIR / "ImageSets" / "Main" / f"{split}.txt").read_text().split() if x]
        assert len(getattr(dm, f"{split}_set")) == len(listed)
    assert dm.num_classes == 3
    labels = np.concatenate([r.labels for r in dm.train_set.records])
    assert set(labels.tolist()) == {1, 2, 3}
    image, target = dm.val_set[0]
    assert image.shape == (3, 480, 640)
    _check_target(image, target, 3)
    # BloodImage_00000: first object is a WBC with 1-based VOC box (260, 177, 491, 376)
    records, _ = load_voc_records(BCCD_DIR, "trainval", BCCD_CLASSES)
    ids = (BCCD_DIR / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    first = records[ids.index("BloodImage_00000")]
    assert first.boxes[0].tolist() == [259.0, 176.0, 491.0, 376.0] and first.labels[0] == 2
    assert all(len(r.ignore_boxes) == 0 for r in dm.train_set.records)  # BCCD marks no object difficult


def _voc_replica(root: Path, objects: str, split_ids=("img0",)) -> Path:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in split_ids:
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), np.zeros((40, 60, 3), np.uint8))
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>60</width><height>40</height><depth>3</depth></size>{objects}</annotation>"
        )
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(split_ids) + "\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(split_ids) + "\n")
    return root


def _obj(name: str, box: tuple[int, int, int, int], difficult: int = 0) -> str:
    x1, y1, x2, y2 = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


def test_voc_coordinates_and_difficult(tmp_path):
    root = _voc_replica(tmp_path, _obj("a", (1, 1, 10, 20)) + _obj("b", (5, 5, 30, 30), difficult=1))
    dm = VOCDetectionDataModule(root, ["a", "b"], num_workers=0, augment=False, batch_size=1)
    dm.setup("fit")
    _, target = dm.train_set[0]
    assert target["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0]] and target["labels"].tolist() == [1]
    assert dm.train_set.records[0].ignore_boxes.tolist() == [[4.0, 4.0, 30.0, 30.0]]
    assert _map(dm.val_set) == pytest.approx(1.0)
    dm2 = VOCDetectionDataModule(root, ["a", "b"], num_workers=0, augment=False, use_difficult=True)
    dm2.setup("validate")
    assert dm2.val_set[0][1]["labels"].tolist() == [1, 2]


def test_voc_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*nothere.*JPEGImages/<id>.jpg"):
        VOCDetectionDataModule(tmp_path / "nothere", ["a"])
    root = _voc_replica(tmp_path / "voc", _obj("zebra", (1, 1, 5, 5)))
    with pytest.raises(ValueError, match=r"img0\.xml.*'zebra'.*\['a', 'b'\]"):
        VOCDetectionDataModule(root, ["a", "b"], num_workers=0).setup("fit")
    bad_split = VOCDetectionDataModule(root, ["zebra"], num_workers=0, val_split="nosuch")
    with pytest.raises(FileNotFoundError, match=r"(?s)nosuch\.txt.*ImageSets/Main/<split>\.txt"):
        bad_split.setup("validate")
    (root / "JPEGImages" / "img0.jpg").write_bytes(b"not a jpeg")
    dm = VOCDetectionDataModule(root, ["zebra"], num_workers=0)
    dm.setup("validate")
    with pytest.raises(OSError, match=r"(?s)img0\.jpg.*Annotations/<id>\.xml"):
        dm.val_set[0]
    (root / "Annotations" / "img0.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"img0\.xml"):
        VOCDetectionDataModule(root, ["zebra"], num_workers=0).setup("fit")


# ---------------------------------------------------------------- generated COCO replica


def _coco_replica(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    cats = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 7, "name": "train"}]
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir()
        images, anns = [], []
        for i in range(3):
            cv2.imwrite(str(root / f"{split}2017" / f"{i:012d}.jpg"), np.zeros((50, 80, 3), np.uint8))
            images.append({"id": 10 + i, "file_name": f"{i:012d}.jpg", "height": 50, "width": 80})
        anns += [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [10, 5, 20, 30], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [70, 10, 30, 0], "area": 0, "iscrowd": 0},
            {"id": 4, "image_id": 11, "category_id": 1, "bbox": [70, 10, 30, 20], "area": 200, "iscrowd": 0},
        ]
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    return root


@pytest.mark.filterwarnings("ignore:COCO val. dropped 1 boxes")
def test_coco_replica_mapping_crowd_zero_area_and_empty(tmp_path):
    root = _coco_replica(tmp_path / "coco")
    dm = COCODetectionDataModule(
        root, num_workers=0, batch_size=1, augment=False, min_size=None, max_size=None
    )
    assert dm.cat_id_to_label == {1: 1, 3: 2, 7: 3} and dm.label_to_cat_id == {1: 1, 2: 3, 3: 7}
    assert dm.classes == ["person", "car", "train"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert any("dropped 1 boxes" in str(w.message) for w in caught)
    assert len(dm.train_set) == 3  # image 12 has no boxes and is kept
    _, t0 = dm.train_set[0]
    assert t0["image_id"] == 10 and t0["labels"].tolist() == [3]
    assert t0["boxes"][0].tolist() == pytest.approx([10.0, 5.0, 30.0, 35.0])  # crowd box excluded
    _, t1 = dm.train_set[1]
    assert t1["boxes"][0].tolist() == pytest.approx([70.0, 10.0, 80.0, 30.0])  # clipped to the image width
    assert _map(dm.val_set) == pytest.approx(1.0)
    no_empty = COCODetectionDataModule(root, num_workers=0, keep_empty=False)
    no_empty.setup("validate")
    assert [r.image_id for r in no_empty.val_set.records] == [10, 11]


def test_coco_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*instances_train2017\.json"):
        COCODetectionDataModule(tmp_path / "missing")
    root = _coco_replica(tmp_path / "coco")
    (root / "annotations" / "instances_val2017.json").unlink()
    dm = COCODetectionDataModule(root, num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"(?s)instances_val2017\.json.*val2017/\*\.jpg"):
        dm.setup("validate")
    (root / "train2017" / "000000000000.jpg").write_bytes(b"")
    train = COCODetectionDataModule(root, num_workers=0)
    with pytest.warns(UserWarning, match="dropped 1 boxes"):
        train.train_set = train._build("train")
    with pytest.raises(OSError, match=r"(?s)000000000000\.jpg.*annotations/"):
        train.train_set[0]
    (root / "annotations" / "instances_train2017.json").write_text("{not json")
    with pytest.raises(ValueError, match="instances_train2017.json"):
        COCODetectionDataModule(root, num_workers=0)


# ---------------------------------------------------------------- labels outside the class list


def test_coco_val_category_unknown_to_train_names_the_file(tmp_path):
    root = _coco_replica(tmp_path / "coco")
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["categories"].append({"id": 42, "name": "zebra"})
    data["annotations"].append(
        {"id": 9, "image_id": 12, "category_id": 42, "bbox": [1, 1, 5, 5], "iscrowd": 0}
    )
    path.write_text(json.dumps(data))
    dm = COCODetectionDataModule(root, num_workers=0)
    with pytest.raises(
        ValueError, match=r"instances_val2017\.json: annotation 9 of image 12 has category_id 42"
    ):
        dm.setup("validate")


def test_coco_class_map_must_give_labels_one_to_n(tmp_path):
    from datamodules import load_coco_records

    root = _coco_replica(tmp_path / "coco")
    annotations = root / "annotations" / "instances_train2017.json"
    with pytest.raises(ValueError, match=r"labels 1\.\.3 .*\{1: 1, 3: 2, 7: 5\}"):
        load_coco_records(annotations, root / "train2017", {1: 1, 3: 2, 7: 5})


# ---------------------------------------------------------------- skip_corrupt


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _textured_jpeg(path: Path, seed: int) -> None:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_voc_skip_corrupt(tmp_path, num_workers):
    ids = ("img0", "img1", "img2", "img3")
    root = _voc_replica(tmp_path / "voc", _obj("a", (1, 1, 10, 20)), ids)
    for seed, name in enumerate(ids):
        _textured_jpeg(root / "JPEGImages" / f"{name}.jpg", seed)
    bad = root / "JPEGImages" / "img2.jpg"
    _truncate(bad)
    with pytest.raises(OSError, match=r"(?s)img2\.jpg.*Annotations/<id>\.xml"):
        list(VOCDetectionDataModule(root, ["a"], num_workers=0, batch_size=2).val_dataloader())
    dm = VOCDetectionDataModule(root, ["a"], num_workers=num_workers, batch_size=2, skip_corrupt=True)
    batches = list(dm.val_dataloader())
    assert [[t["image_id"] for t in targets] for _, targets in batches] == [[0, 1], [3]]
    assert dm.skipped_files == {str(bad): 1}
    with pytest.warns(UserWarning, match=r"(?s)VOCDetectionDataModule skipped 1 samples.*img2\.jpg \(1x\)"):
        dm.teardown("validate")


def test_voc_size_read_from_a_corrupt_image_is_skipped(tmp_path):
    root = _voc_replica(tmp_path / "voc", _obj("a", (1, 1, 10, 20)), ("img0", "img1"))
    xml = root / "Annotations" / "img1.xml"
    xml.write_text(
        xml.read_text().replace("<width>60</width><height>40</height>", "<width>0</width><height>0</height>")
    )
    bad = root / "JPEGImages" / "img1.jpg"
    _truncate(bad)
    with pytest.raises(OSError, match=r"img1\.jpg"):
        VOCDetectionDataModule(root, ["a"], num_workers=0).setup("validate")
    dm = VOCDetectionDataModule(root, ["a"], num_workers=0, skip_corrupt=True)
    dm.setup("validate")
    assert [r.image_id for r in dm.val_set.records] == [0] and dm.skipped_files == {str(bad): 1}


def test_coco_skip_corrupt(tmp_path):
    root = _coco_replica(tmp_path / "coco")
    bad = root / "val2017" / "000000000001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dm = COCODetectionDataModule(
        root, num_workers=0, batch_size=3, augment=False, min_size=None, max_size=None, skip_corrupt=True
    )
    with pytest.warns(UserWarning, match="dropped 1 boxes"):
        (images, targets), *rest = list(dm.val_dataloader())
    assert rest == [] and [t["image_id"] for t in targets] == [10, 12] and len(images) == 2
    assert dm.skipped_files == {str(bad): 1}
