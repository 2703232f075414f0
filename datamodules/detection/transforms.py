"""Albumentations pipelines for object detection: images and ``x1, y1, x2, y2`` pixel boxes together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from datamodules.classification.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ResizeMinMax", "detection_eval_transform", "detection_train_transform"]


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
