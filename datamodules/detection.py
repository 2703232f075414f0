"""Object-detection datamodules: COCO 2017 JSON (pycocotools), Pascal VOC XML and a synthetic set.

Samples and batches follow torchvision's detection convention. A sample is ``(image, target)``:
``image`` a ``float32`` ``(3, H, W)`` tensor normalised with the module's ``mean``/``std``, ``target`` a
dict with ``boxes`` (``float32`` ``(K, 4)``, ``x1, y1, x2, y2`` in absolute pixels of the transformed
image), ``labels`` (``int64`` ``(K,)``, foreground classes ``1..num_classes``; 0 is background, as
torchvision detectors expect), ``image_id`` (``int``), ``orig_size`` and ``size`` (``int64`` ``(2,)``,
``(H, W)`` before and after the transform). :func:`collate_detection` keeps variable image sizes: a
batch is ``(list of images, list of targets)``.

For evaluation, :func:`to_coco_ground_truth` turns any of these datasets into a pycocotools ``COCO``
object in original-image coordinates (COCO crowd boxes and VOC ``difficult`` boxes kept as ignore
regions, ``iscrowd=1``), and :func:`to_coco_detections` maps predictions back to those coordinates.
"""

from __future__ import annotations

import contextlib
import io
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch import Tensor
from torch.utils.data import Dataset, Subset

from datamodules.base import BaseDataModule, Split
from datamodules.datasets import _seed_from_torch, read_image
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "COCODetectionDataModule",
    "DetectionDataset",
    "DetectionRecord",
    "ResizeMinMax",
    "SyntheticDetectionDataModule",
    "VOCDetectionDataModule",
    "collate_detection",
    "detection_eval_transform",
    "detection_train_transform",
    "load_coco_records",
    "load_voc_records",
    "to_coco_detections",
    "to_coco_ground_truth",
]

Target = dict[str, Any]

COCO_LAYOUT = (
    "Expected the COCO {year} layout:\n"
    "      data_dir/\n"
    "      ├── train{year}/*.jpg\n"
    "      ├── val{year}/*.jpg\n"
    "      └── annotations/\n"
    "          ├── instances_train{year}.json\n"
    "          └── instances_val{year}.json\n"
)

VOC_LAYOUT = (
    "Expected the Pascal VOC layout (data_dir is the folder holding JPEGImages, e.g. VOCdevkit/VOC2012/):\n"
    "      data_dir/\n"
    "      ├── JPEGImages/<id>.jpg\n"
    "      ├── Annotations/<id>.xml\n"
    "      └── ImageSets/Main/<split>.txt   (one <id> per line; e.g. train.txt, val.txt, trainval.txt)\n"
)


# --------------------------------------------------------------------------------------------------
# records, dataset, collate
# --------------------------------------------------------------------------------------------------


@dataclass
class DetectionRecord:
    """Annotations of one image in original pixel coordinates (``x1, y1, x2, y2``, 0-based, exclusive).

    ``ignore_boxes``/``ignore_labels`` hold COCO crowd regions and VOC ``difficult`` objects: they are
    not training targets but are kept for evaluation (as ``iscrowd=1``). ``areas`` optionally overrides
    the box areas in the COCO ground truth (COCO's segmentation areas). ``image`` holds the pixels of
    in-memory (synthetic) sets, whose ``file`` is ``None``.
    """

    image_id: int
    file: Path | None
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    ignore_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    areas: np.ndarray | None = None
    image: np.ndarray | None = None


def _as_boxes(boxes: Any) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _clip_and_filter(
    boxes: np.ndarray, height: int, width: int, *others: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Clip boxes to the image; drop those with zero width or height. Returns (boxes, others, dropped)."""
    boxes = _as_boxes(boxes).copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], [np.asarray(o)[keep] for o in others], int((~keep).sum())


def collate_detection(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Batch ``(image, target)`` samples as ``(list of images, list of targets)`` (sizes may differ).

    Example:
        >>> images, targets = collate_detection([(torch.zeros(3, 4, 5), {"image_id": 0})] * 2)
        >>> len(images), targets[1]["image_id"]
        (2, 0)
    """
    if not batch:
        return [], []
    images, targets = zip(*batch)
    return list(images), list(targets)


class DetectionDataset(Dataset):
    """Map-style detection dataset over :class:`DetectionRecord` s, passed through an albumentations pipeline.

    Args:
        records: one record per image.
        classes: foreground class names; label ``i`` (1-based) is ``classes[i - 1]``.
        transform: albumentations ``Compose`` with ``bbox_params`` in ``pascal_voc`` format and
            ``label_fields=["labels"]`` (see :func:`detection_train_transform`); it must return a
            tensor image (end with ``ToTensorV2``). ``None``: image only converted to ``[0, 1]``.
        layout: expected on-disk layout, quoted when an image cannot be read.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        classes: Sequence[str],
        transform: Callable[..., dict[str, Any]] | None = None,
        layout: str = "",
    ) -> None:
        self.records = list(records)
        self.classes = list(classes)
        self.transform = transform
        self.layout = layout
        _seed_from_torch(transform)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> np.ndarray:
        """The RGB ``uint8`` ``(H, W, 3)`` image of ``index`` (before the transform)."""
        record = self.records[index]
        if record.image is not None:
            return record.image
        try:
            return read_image(record.file)
        except OSError as err:
            raise OSError(f"{err}\n{self.layout}") from err

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        record = self.records[index]
        image = self.load_image(index)
        height, width = image.shape[:2]
        boxes, (labels,), _ = _clip_and_filter(record.boxes, height, width, record.labels)
        if self.transform is None:
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
        else:
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            tensor = out["image"]
            boxes = _as_boxes(out["bboxes"])
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            boxes, (labels,), _ = _clip_and_filter(boxes, tensor.shape[-2], tensor.shape[-1], labels)
        target = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
            "image_id": int(record.image_id),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor(list(tensor.shape[-2:]), dtype=torch.int64),
        }
        return tensor, target


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------


class ResizeMinMax(A.DualTransform):
    """Resize keeping the aspect ratio: shorter side to ``min_size`` unless the longer would pass ``max_size``.

    This is the resize rule of torchvision's ``GeneralizedRCNNTransform`` (scale =
    ``min(min_size / short, max_size / long)``); either bound may be ``None`` (no limit; both ``None``:
    scale 1). The scale is then multiplied by a factor drawn uniformly from ``scale_range`` (scale
    jitter; ``(1, 1)`` is deterministic). Boxes follow exactly (albumentations keeps them normalised).
    """

    def __init__(
        self,
        min_size: int | None = None,
        max_size: int | None = None,
        scale_range: tuple[float, float] = (1.0, 1.0),
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if scale_range[0] <= 0 or scale_range[1] < scale_range[0]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}.")
        self.min_size = min_size
        self.max_size = max_size
        self.scale_range = tuple(scale_range)
        self.interpolation = interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        scale = 1.0
        limits = []
        if self.min_size is not None:
            limits.append(self.min_size / min(height, width))
        if self.max_size is not None:
            limits.append(self.max_size / max(height, width))
        if limits:
            scale = min(limits)
        low, high = self.scale_range
        if high > low:
            scale *= self.py_random.uniform(low, high)
        else:
            scale *= low
        return {"target_shape": (max(1, round(height * scale)), max(1, round(width * scale)))}

    def apply(self, img: np.ndarray, target_shape: tuple[int, int], **params: Any) -> np.ndarray:
        if img.shape[:2] == tuple(target_shape):
            return img
        return cv2.resize(img, (target_shape[1], target_shape[0]), interpolation=self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, target_shape: tuple[int, int], **params: Any) -> np.ndarray:
        if mask.shape[:2] == tuple(target_shape):
            return mask
        return cv2.resize(mask, (target_shape[1], target_shape[0]), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalised coordinates are invariant to an aspect-preserving resize

    def apply_to_keypoints(
        self, keypoints: np.ndarray, target_shape: tuple[int, int], **params: Any
    ) -> np.ndarray:
        height, width = params["shape"][:2]
        keypoints = keypoints.copy()
        keypoints[:, 0] *= target_shape[1] / width
        keypoints[:, 1] *= target_shape[0] / height
        return keypoints

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size", "scale_range", "interpolation")


def _bbox_params() -> A.BboxParams:
    return A.BboxParams(
        format="pascal_voc", label_fields=["labels"], min_width=1e-3, min_height=1e-3, clip=True
    )


def detection_train_transform(
    min_size: int | None = None,
    max_size: int | None = None,
    scale_range: tuple[float, float] = (0.75, 1.25),
    hflip_p: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Detection training augmentation: min/max-size resize with random scale jitter, horizontal flip.

    Call as ``transform(image=hwc_uint8, bboxes=(K, 4) xyxy pixels, labels=(K,))``; returns the image
    as a normalised ``float32`` ``(3, H', W')`` tensor and the boxes in the new pixel frame.

    Example:
        >>> t = detection_train_transform(max_size=64, scale_range=(1, 1), hflip_p=1.0)
        >>> out = t(image=np.zeros((50, 100, 3), np.uint8), bboxes=[[0, 0, 10, 20]], labels=[1])
        >>> tuple(out["image"].shape), [round(float(v), 3) for v in out["bboxes"][0]]
        ((3, 32, 64), [57.6, 0.0, 64.0, 12.8])
    """
    return A.Compose(
        [
            ResizeMinMax(min_size, max_size, scale_range=scale_range),
            A.HorizontalFlip(p=hflip_p),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ],
        bbox_params=_bbox_params(),
    )


def detection_eval_transform(
    min_size: int | None = None,
    max_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Deterministic detection evaluation transform: min/max-size resize (none if both ``None``), normalise."""
    return A.Compose(
        [
            ResizeMinMax(min_size, max_size),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ],
        bbox_params=_bbox_params(),
    )


# --------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO())  # pycocotools prints progress lines


def _coco_layout_error(problem: str, path: Path, year: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}\nOffending path: '{path}' (absolute: '{path.absolute()}').\n{COCO_LAYOUT.format(year=year)}"
    )


def load_coco_records(
    annotation_file: str | Path,
    image_dir: str | Path,
    cat_id_to_label: dict[int, int] | None = None,
    keep_empty: bool = True,
) -> tuple[list[DetectionRecord], dict[int, int], list[str], int]:
    """Read a COCO ``instances_*.json`` with pycocotools.

    Boxes are converted from ``x, y, w, h`` to ``x1, y1, x2, y2`` and clipped to the image; boxes of zero
    width or height are dropped (counted); crowd annotations become ignore regions. Category ids map to
    contiguous labels ``1..C`` in increasing id order unless ``cat_id_to_label`` is given.

    Returns:
        ``(records, cat_id_to_label, class names, number of dropped zero-area boxes)``.
    """
    from pycocotools.coco import COCO

    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    try:
        with _quiet():
            coco = COCO(str(annotation_file))
    except Exception as err:  # noqa: BLE001 - json or key errors from a malformed file
        raise ValueError(f"Cannot read COCO annotation file '{annotation_file}': {err!r}") from err
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    if cat_id_to_label is None:
        cat_id_to_label = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
    names_by_id = {int(c["id"]): str(c["name"]) for c in cats}
    classes = [
        names_by_id.get(cid, str(cid)) for cid, _ in sorted(cat_id_to_label.items(), key=lambda kv: kv[1])
    ]
    records, dropped = [], 0
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        boxes, labels, areas, ign_boxes, ign_labels = [], [], [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            cid = int(ann["category_id"])
            if cid not in cat_id_to_label:
                raise ValueError(
                    f"{annotation_file}: annotation {ann.get('id')} of image {image_id} has category_id {cid}, "
                    f"not among the categories {sorted(cat_id_to_label)}."
                )
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = [x, y, x + w, y + h]
            if ann.get("iscrowd", 0):
                ign_boxes.append(box)
                ign_labels.append(cat_id_to_label[cid])
            else:
                boxes.append(box)
                labels.append(cat_id_to_label[cid])
                areas.append(float(ann.get("area", w * h)))
        boxes_np, (labels_np, areas_np), n_drop = _clip_and_filter(
            _as_boxes(boxes), height, width, np.asarray(labels, np.int64), np.asarray(areas, np.float32)
        )
        dropped += n_drop
        ign_np, (ign_lab_np,), _ = _clip_and_filter(
            _as_boxes(ign_boxes), height, width, np.asarray(ign_labels, np.int64)
        )
        if not keep_empty and len(boxes_np) == 0:
            continue
        records.append(
            DetectionRecord(
                image_id=int(image_id),
                file=image_dir / info["file_name"],
                height=height,
                width=width,
                boxes=boxes_np,
                labels=labels_np.astype(np.int64),
                ignore_boxes=ign_np,
                ignore_labels=ign_lab_np.astype(np.int64),
                areas=areas_np.astype(np.float32),
            )
        )
    return records, cat_id_to_label, classes, dropped


# --------------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------------


def _voc_error(problem: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}\nOffending path: '{path}' (absolute: '{path.absolute()}').\n{VOC_LAYOUT}"
    )


def _xml_text(node: ET.Element, tag: str, file: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"VOC annotation '{file}': missing <{tag}>.")
    return child.text.strip()


def load_voc_records(
    data_dir: str | Path, split: str, classes: Sequence[str], use_difficult: bool = False
) -> tuple[list[DetectionRecord], int]:
    """Read the images listed in ``ImageSets/Main/<split>.txt`` and their ``Annotations/<id>.xml``.

    VOC's 1-based inclusive pixel boxes become 0-based ``x1, y1, x2, y2`` (``xmin - 1, ymin - 1, xmax,
    ymax``), clipped to the image. ``difficult`` objects become ignore regions unless ``use_difficult``.
    Image ids are the positions in the split list.

    Returns:
        ``(records, number of dropped zero-area boxes)``.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise _voc_error("VOC data_dir does not exist or is not a folder.", root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        if not (root / sub).is_dir():
            raise _voc_error(f"VOC folder '{sub}' is missing.", root / sub)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise _voc_error(
            f"VOC split list for split {split!r} not found (available: {available}).", split_file
        )
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    label_of = {name: i + 1 for i, name in enumerate(classes)}
    records, dropped = [], 0
    for index, name in enumerate(ids):
        xml_file = root / "Annotations" / f"{name}.xml"
        if not xml_file.is_file():
            raise _voc_error(
                f"Annotation file of image {name!r} (listed in {split_file.name}) not found.", xml_file
            )
        try:
            tree = ET.parse(xml_file).getroot()
        except ET.ParseError as err:
            raise ValueError(f"Cannot parse VOC annotation '{xml_file}': {err}") from err
        size = tree.find("size")
        height = int(float(_xml_text(size, "height", xml_file))) if size is not None else 0
        width = int(float(_xml_text(size, "width", xml_file))) if size is not None else 0
        image_file = root / "JPEGImages" / f"{name}.jpg"
        if height <= 0 or width <= 0:  # some VOC-style exports write 0 x 0: read the image header instead
            height, width = read_image(image_file).shape[:2]
        boxes, labels, ign_boxes, ign_labels = [], [], [], []
        for obj in tree.findall("object"):
            cls = _xml_text(obj, "name", xml_file)
            if cls not in label_of:
                raise ValueError(
                    f"VOC annotation '{xml_file}' has an object of class {cls!r}, which is not in classes={list(classes)}."
                )
            bnd = obj.find("bndbox")
            if bnd is None:
                raise ValueError(f"VOC annotation '{xml_file}': an object of class {cls!r} lacks <bndbox>.")
            x1, y1, x2, y2 = (float(_xml_text(bnd, k, xml_file)) for k in ("xmin", "ymin", "xmax", "ymax"))
            box = [x1 - 1, y1 - 1, x2, y2]
            difficult_node = obj.find("difficult")
            difficult = difficult_node is not None and (difficult_node.text or "0").strip() not in ("0", "")
            if difficult and not use_difficult:
                ign_boxes.append(box)
                ign_labels.append(label_of[cls])
            else:
                boxes.append(box)
                labels.append(label_of[cls])
        boxes_np, (labels_np,), n_drop = _clip_and_filter(
            _as_boxes(boxes), height, width, np.asarray(labels, np.int64)
        )
        dropped += n_drop
        ign_np, (ign_lab_np,), _ = _clip_and_filter(
            _as_boxes(ign_boxes), height, width, np.asarray(ign_labels, np.int64)
        )
        records.append(
            DetectionRecord(
                image_id=index,
                file=image_file,
                height=height,
                width=width,
                boxes=boxes_np,
                labels=labels_np.astype(np.int64),
                ignore_boxes=ign_np,
                ignore_labels=ign_lab_np.astype(np.int64),
            )
        )
    return records, dropped


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------


def _synthetic_records(
    n: int, num_classes: int, image_size: int, seed: int, max_objects: int = 3
) -> list[DetectionRecord]:
    """Images of coloured rectangles (odd labels) and discs (even labels) on a noisy background, exact boxes."""
    palette = np.array(
        [[230, 40, 40], [40, 200, 40], [40, 80, 230], [230, 200, 30], [200, 40, 200], [30, 200, 200]],
        np.float32,
    )
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    records = []
    for index in range(n):
        image = rng.integers(60, 120, size=(image_size, image_size, 3)).astype(np.uint8)
        k = int(rng.integers(1, max_objects + 1))
        boxes, labels = [], []
        for _ in range(k):
            label = int(rng.integers(1, num_classes + 1))
            colour = palette[(label - 1) % len(palette)] * (1.0 - 0.15 * ((label - 1) // len(palette) % 4))
            side_lo, side_hi = max(4, image_size // 8), max(6, image_size // 3)
            if label % 2 == 1:  # rectangle covering pixels [x0, x1) x [y0, y1)
                w, h = (int(v) for v in rng.integers(side_lo, side_hi + 1, size=2))
                x0 = int(rng.integers(0, image_size - w + 1))
                y0 = int(rng.integers(0, image_size - h + 1))
                mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            else:  # disc
                r = int(rng.integers(side_lo // 2, side_hi // 2 + 1))
                cx = int(rng.integers(r, image_size - r))
                cy = int(rng.integers(r, image_size - r))
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            image[mask] = colour.astype(np.uint8)
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(label)
        records.append(
            DetectionRecord(
                image_id=index,
                file=None,
                height=image_size,
                width=image_size,
                boxes=_as_boxes(boxes),
                labels=np.asarray(labels, np.int64),
                image=image,
            )
        )
    return records


# --------------------------------------------------------------------------------------------------
# datamodules
# --------------------------------------------------------------------------------------------------


class BaseDetectionDataModule(BaseDataModule):
    """Splits and loaders shared by the detection datamodules.

    Attributes set by subclasses: ``classes`` (foreground names; label ``i`` is ``classes[i - 1]``),
    ``num_classes`` (foreground classes; pass ``num_classes + 1`` to torchvision detectors, which count
    background), ``mean``/``std``. Batches: ``(list of images, list of targets)``, see
    :func:`collate_detection`. The train loader shuffles and drops the last incomplete batch.
    """

    classes: list[str]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    collate_fn = staticmethod(collate_detection)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes (labels ``1..num_classes``; 0 is background)."""
        return len(self.classes)


class COCODetectionDataModule(BaseDetectionDataModule):
    """COCO detection (2017 layout) through pycocotools.

    The 80 COCO categories (non-contiguous ids 1..90) map to contiguous labels 1..80 in id order
    (``cat_id_to_label`` and ``label_to_cat_id``); crowd annotations are left out of the targets (kept
    as ignore regions for :func:`to_coco_ground_truth`); zero-area boxes are dropped with a warning.
    ``test`` serves ``val{year}`` (test-dev has no public annotations).

    Args:
        data_dir: folder with ``train{year}/``, ``val{year}/`` and ``annotations/``.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        augment: random scale jitter and horizontal flip on the train split.
        keep_empty: keep images without (non-crowd) boxes.
        min_size / max_size: resize so the shorter side is ``min_size`` unless the longer would exceed
            ``max_size`` (torchvision detector defaults 800 / 1333); ``None`` disables a bound.
        scale_range: train scale jitter around that size.
        year: ``"2017"`` (or ``"2014"``).
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 2,
        num_workers: int = 4,
        augment: bool = True,
        keep_empty: bool = True,
        min_size: int | None = 800,
        max_size: int | None = 1333,
        scale_range: tuple[float, float] = (0.75, 1.25),
        year: str = "2017",
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.data_dir = Path(data_dir)
        self.augment, self.keep_empty = augment, keep_empty
        self.min_size, self.max_size, self.scale_range, self.year = min_size, max_size, scale_range, year
        if not self.data_dir.is_dir():
            raise _coco_layout_error("COCO data_dir does not exist or is not a folder.", self.data_dir, year)
        # the class map comes from the train annotation file (the same categories in every split); the
        # train records are kept so that the (large) train JSON is read once
        self._train_records = load_coco_records(
            self._annotation_file("train"), self._image_dir("train"), keep_empty=keep_empty
        )
        _, self.cat_id_to_label, self.classes, _ = self._train_records
        self.label_to_cat_id = {label: cid for cid, label in self.cat_id_to_label.items()}

    def _annotation_file(self, split: str) -> Path:
        name = "train" if split == "train" else "val"
        path = self.data_dir / "annotations" / f"instances_{name}{self.year}.json"
        if not path.is_file():
            raise _coco_layout_error(f"COCO annotation file for split {split!r} not found.", path, self.year)
        return path

    def _image_dir(self, split: str) -> Path:
        name = "train" if split == "train" else "val"
        path = self.data_dir / f"{name}{self.year}"
        if not path.is_dir():
            raise _coco_layout_error(f"COCO image folder for split {split!r} not found.", path, self.year)
        return path

    def _build(self, split: Split) -> DetectionDataset:
        if split == "train" and self._train_records is not None:
            records, _, _, dropped = self._train_records
            self._train_records = None
        else:
            records, _, _, dropped = load_coco_records(
                self._annotation_file(split), self._image_dir(split), self.cat_id_to_label, self.keep_empty
            )
        if dropped:
            warnings.warn(f"COCO {split}: dropped {dropped} boxes with zero width or height.", stacklevel=2)
        if split == "train" and self.augment:
            transform = detection_train_transform(self.min_size, self.max_size, self.scale_range)
        else:
            transform = detection_eval_transform(self.min_size, self.max_size)
        return DetectionDataset(records, self.classes, transform, COCO_LAYOUT.format(year=self.year))


class VOCDetectionDataModule(BaseDetectionDataModule):
    """Pascal VOC-style detection (``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/*.txt``).

    Args:
        data_dir: folder holding ``JPEGImages`` (e.g. ``VOCdevkit/VOC2012``).
        classes: foreground class names in label order (label ``i`` is ``classes[i - 1]``); an XML object
            of another class is an error.
        batch_size / num_workers: loader settings.
        train_split / val_split: names of the split lists in ``ImageSets/Main``.
        test_split: split served by the test loader (``None``: ``val_split``).
        augment: random scale jitter and horizontal flip on the train split.
        use_difficult: train on ``difficult`` objects (otherwise they are only ignore regions).
        min_size / max_size / scale_range: as in :class:`COCODetectionDataModule` (default: no resize).
    """

    def __init__(
        self,
        data_dir: str | Path,
        classes: Sequence[str],
        batch_size: int = 2,
        num_workers: int = 4,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        augment: bool = True,
        use_difficult: bool = False,
        min_size: int | None = None,
        max_size: int | None = None,
        scale_range: tuple[float, float] = (0.75, 1.25),
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be a non-empty list of distinct names, got {list(classes)}.")
        self.data_dir = Path(data_dir)
        self.classes = list(classes)
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.augment, self.use_difficult = augment, use_difficult
        self.min_size, self.max_size, self.scale_range = min_size, max_size, scale_range
        if not self.data_dir.is_dir():
            raise _voc_error("VOC data_dir does not exist or is not a folder.", self.data_dir)

    def _build(self, split: Split) -> DetectionDataset:
        records, dropped = load_voc_records(
            self.data_dir, self.splits[split], self.classes, self.use_difficult
        )
        if dropped:
            warnings.warn(
                f"VOC {self.splits[split]}: dropped {dropped} boxes with zero width or height.", stacklevel=2
            )
        if split == "train" and self.augment:
            transform = detection_train_transform(self.min_size, self.max_size, self.scale_range)
        else:
            transform = detection_eval_transform(self.min_size, self.max_size)
        return DetectionDataset(records, self.classes, transform, VOC_LAYOUT)


class SyntheticDetectionDataModule(BaseDetectionDataModule):
    """Coloured rectangles (odd labels) and discs (even labels) with exact boxes, generated in memory.

    Each image holds 1-3 objects (they may overlap; later ones are drawn on top, boxes stay those of the
    full shapes). ``test`` serves the validation images. Training images are horizontally flipped at
    random when ``augment``.
    """

    def __init__(
        self,
        num_classes: int = 3,
        image_size: int = 128,
        train_size: int = 32,
        val_size: int = 8,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if num_classes < 1 or image_size < 16 or train_size < 1 or val_size < 1:
            raise ValueError("need num_classes >= 1, image_size >= 16, train_size >= 1 and val_size >= 1.")
        self.classes = [f"class{i}" for i in range(1, num_classes + 1)]
        self.image_size, self.seed, self.augment = image_size, seed, augment
        self.sizes = {"train": train_size, "val": val_size, "test": val_size}

    def _build(self, split: Split) -> DetectionDataset:
        seed = self.seed * 1000 + (0 if split == "train" else 1)
        records = _synthetic_records(self.sizes[split], self.num_classes, self.image_size, seed)
        if split == "train" and self.augment:
            transform = detection_train_transform(scale_range=(1.0, 1.0))
        else:
            transform = detection_eval_transform()
        return DetectionDataset(records, self.classes, transform)


# --------------------------------------------------------------------------------------------------
# evaluation helpers
# --------------------------------------------------------------------------------------------------


def _unwrap(dataset: Dataset) -> tuple[DetectionDataset, list[int]]:
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        sub = list(dataset.indices)
        indices = sub if indices is None else [sub[i] for i in indices]
        dataset = dataset.dataset
    if not isinstance(dataset, DetectionDataset):
        raise TypeError(f"Expected a DetectionDataset (or a Subset of one), got {type(dataset).__name__}.")
    return dataset, indices if indices is not None else list(range(len(dataset)))


def to_coco_ground_truth(dataset: Dataset) -> Any:
    """The annotations of a detection dataset as a pycocotools ``COCO`` object, for ``COCOeval``.

    Boxes are in original image coordinates; ``category_id`` is the contiguous label (1..C), so
    predictions of a torchvision-style detector can be scored without remapping (use
    :func:`to_coco_detections`). Ignore regions (COCO crowd, VOC difficult) are written with
    ``iscrowd=1``, which COCOeval does not count as misses.
    """
    from pycocotools.coco import COCO

    base, indices = _unwrap(dataset)
    images, annotations = [], []
    for index in indices:
        record = base.records[index]
        images.append({"id": int(record.image_id), "height": record.height, "width": record.width})
        groups = (
            (record.boxes, record.labels, record.areas, 0),
            (record.ignore_boxes, record.ignore_labels, None, 1),
        )
        for boxes, labels, areas, crowd in groups:
            for k, (box, label) in enumerate(zip(_as_boxes(boxes), labels)):
                x1, y1, x2, y2 = (float(v) for v in box)
                area = (
                    float(areas[k])
                    if areas is not None and len(areas) == len(boxes)
                    else (x2 - x1) * (y2 - y1)
                )
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": int(record.image_id),
                        "category_id": int(label),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": area,
                        "iscrowd": crowd,
                    }
                )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(base.classes)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with _quiet():
        coco.createIndex()
    return coco


def to_coco_detections(predictions: Sequence[Target], targets: Sequence[Target]) -> list[dict[str, Any]]:
    """COCO result entries from torchvision-style predictions (``boxes``, ``labels``, ``scores``).

    Boxes are mapped from the transformed frame (``target["size"]``) back to the original image
    (``target["orig_size"]``), matching :func:`to_coco_ground_truth`. Missing ``scores`` count as 1.
    """
    results = []
    for pred, target in zip(predictions, targets, strict=True):
        boxes = torch.as_tensor(pred["boxes"], dtype=torch.float64).detach().cpu().reshape(-1, 4).clone()
        if "size" in target and "orig_size" in target:
            (h, w), (oh, ow) = (torch.as_tensor(target[k]).tolist() for k in ("size", "orig_size"))
            boxes[:, 0::2] *= ow / w
            boxes[:, 1::2] *= oh / h
        labels = torch.as_tensor(pred["labels"]).reshape(-1).tolist()
        scores = pred.get("scores")
        scores = [1.0] * len(labels) if scores is None else torch.as_tensor(scores).reshape(-1).tolist()
        for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels, scores):
            results.append(
                {
                    "image_id": int(target["image_id"]),
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return results
