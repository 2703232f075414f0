"""A synthetic detection set: coloured rectangles and discs with exact boxes, generated in memory."""

from __future__ import annotations

import numpy as np

from datamodules.base import Split
from datamodules.detection.base import BaseDetectionDataModule, DetectionDataset, DetectionRecord, as_boxes
from datamodules.detection.transforms import detection_eval_transform, detection_train_transform

__all__ = ["SyntheticDetectionDataModule"]


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
                boxes=as_boxes(boxes),
                labels=np.asarray(labels, np.int64),
                image=image,
            )
        )
    return records


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
