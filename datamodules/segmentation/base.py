"""Shared pieces of the semantic-segmentation datamodules: mask reading, label checks, datasets, loaders.

Batches are ``(images, masks)`` tuples: ``float32`` ``(N, 3, H, W)`` normalised with the module's
``mean`` / ``std`` and ``int64`` ``(N, H, W)`` class indices, with ``ignore_index`` marking pixels
that carry no label (padding, unlabelled or ambiguous pixels).

Every mask is checked when its sample is read: each value must be a class index ``0..num_classes-1`` or
the ignore index (for the label-mapped sets: a raw value of the set's encoding that the mapping turns
into one of those), else a ``ValueError`` names the file and the offending value, instead of the
model failing later with torch's "Target 50 is out of bounds".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, Split
from datamodules.corrupt import CorruptFileError, CorruptFileLog, drop_skipped, skip_or_raise
from datamodules.datasets import Transform, _seed_from_torch, read_image
from datamodules.segmentation.transforms import seg_eval_transform, seg_train_transform

__all__ = [
    "BaseSegmentationDataModule",
    "LabelMappedSegmentationDataset",
    "SegmentationFileDataset",
    "collate_segmentation",
    "read_mask",
]

_ADVICE = (
    "Check the mask encoding (one class index per pixel, not RGB colours or another data set's ids), "
    "that the folder holds this data set's masks, and {what}."
)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label image as a ``uint8`` ``(H, W)`` array of class indices.

    Single-channel (``L``) and palette (``P``, the indices, not the colours) PNGs are accepted.

    Raises:
        CorruptFileError: (an ``OSError``) the file cannot be opened or decoded; ``path`` names it.
        ValueError: the file is not a single-channel label image, or holds values above 255.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/mask.png"
        >>> Image.fromarray(np.array([[0, 3], [11, 1]], np.uint8), mode="L").save(path)
        >>> read_mask(path).tolist()
        [[0, 3], [11, 1]]
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            mask = np.array(img)
    except OSError as err:
        raise CorruptFileError(f"Cannot read mask file '{path}': {err}", path) from err
    except Exception as err:  # PIL raises e.g. UnidentifiedImageError / SyntaxError subclasses
        raise CorruptFileError(f"Cannot decode mask file '{path}': {err}", path) from err
    if mode not in ("L", "P", "I;16", "I"):
        raise ValueError(
            f"Mask '{path}' has mode {mode}; expected a single-channel index image (L or P), one class "
            "index per pixel (a colour-coded mask must be converted to indices first)."
        )
    if mask.max(initial=0) > 255:
        raise ValueError(f"Mask '{path}' has class indices above 255 (largest {mask.max()}).")
    return mask.astype(np.uint8, copy=False)


def collate_segmentation(batch: Sequence[tuple[Tensor, Tensor] | None]) -> tuple[Tensor, Tensor] | None:
    """Stack ``(image, mask)`` samples into ``(float32 (N, 3, H, W), int64 (N, H, W))``.

    Skipped samples (``None``, see ``skip_corrupt``) are left out; ``None`` if every sample was skipped.

    Example:
        >>> images, masks = collate_segmentation([(torch.zeros(3, 2, 2), torch.ones(2, 2)), None])
        >>> tuple(images.shape), masks.dtype
        ((1, 3, 2, 2), torch.int64)
    """
    batch = drop_skipped(batch)
    if not batch:
        return None
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack([m.long() for m in masks])


def _value_runs(values: np.ndarray) -> str:
    """``[0, 1, 2, 5]`` -> ``'0..2, 5'`` (sorted integers as ranges)."""
    runs: list[str] = []
    start = prev = None
    for v in [int(x) for x in values] + [None]:
        if prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            runs.append(str(start) if start == prev else f"{start}..{prev}")
        start = prev = v
    return ", ".join(runs)


class SegmentationFileDataset(Dataset):
    """Image / mask file pairs, read when indexed, label-checked and passed through a joint transform.

    Args:
        images: image paths.
        masks: mask paths (same length, same order).
        transform: albumentations pipeline called as ``transform(image=..., mask=...)``; ``None``
            returns the raw ``uint8`` image as a ``(3, H, W)`` float tensor in [0, 255].
        layout: text appended to read errors (the expected on-disk layout).
        num_classes: classes of the set; with it, a mask value that is neither ``0..num_classes-1`` nor
            ``ignore_index`` raises a ``ValueError`` naming the file. ``None``: masks are not checked.
        ignore_index: mask value of unlabelled pixels.
        skip_log: where unreadable files are recorded; the sample is then ``None`` (dropped by
            :func:`collate_segmentation`). ``None`` (default): an unreadable file raises
            :class:`~datamodules.corrupt.CorruptFileError`.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(folder + "/a.png")
        >>> Image.fromarray(np.full((2, 3), 50, np.uint8), mode="L").save(folder + "/a_mask.png")
        >>> image, mask = folder + "/a.png", folder + "/a_mask.png"
        >>> ds = SegmentationFileDataset([image], [mask], num_classes=11, ignore_index=11)
        >>> ds[0]  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Mask '.../a_mask.png' holds label 50, but this data set has 11 classes (labels 0..10) ...
    """

    def __init__(
        self,
        images: Sequence[str | os.PathLike],
        masks: Sequence[str | os.PathLike],
        transform: Transform | None = None,
        layout: str = "",
        num_classes: int | None = None,
        ignore_index: int | None = None,
        skip_log: CorruptFileLog | None = None,
    ) -> None:
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks.")
        self.images = np.array([os.fsencode(p) for p in images], dtype=np.bytes_)
        self.masks = np.array([os.fsencode(p) for p in masks], dtype=np.bytes_)
        self.transform = transform
        self.layout = layout
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.skip_log = skip_log
        self.valid_labels = self._valid_labels()
        _seed_from_torch(transform)

    def _valid_labels(self) -> np.ndarray | None:
        """``valid[v]``: a mask holding value ``v`` is fine (``None``: no check)."""
        if self.num_classes is None:
            return None
        valid = np.zeros(256, bool)
        valid[: self.num_classes] = True
        if self.ignore_index is not None and 0 <= self.ignore_index <= 255:
            valid[self.ignore_index] = True
        return valid

    def _label_error(self, path: str, invalid: np.ndarray) -> str:
        shown = ", ".join(str(v) for v in invalid[:10]) + (", ..." if len(invalid) > 10 else "")
        return (
            f"Mask '{path}' holds label {invalid[-1]}, but this data set has {self.num_classes} classes "
            f"(labels 0..{self.num_classes - 1}) and ignore index {self.ignore_index}; invalid values in "
            f"this mask: [{shown}]. " + _ADVICE.format(what="ignore_index")
        )

    def check_labels(self, mask: np.ndarray, path: str) -> None:
        """Raise a ``ValueError`` naming ``path`` if ``mask`` holds a value outside :attr:`valid_labels`."""
        if self.valid_labels is None or self.valid_labels[mask].all():
            return
        present = np.zeros(256, bool)
        present[mask] = True
        raise ValueError(self._label_error(path, np.flatnonzero(present & ~self.valid_labels)))

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw ``uint8`` RGB image ``(H, W, 3)`` and label-checked mask ``(H, W)`` of sample ``index``.

        Raises:
            CorruptFileError: the image or mask cannot be read (the message adds the expected layout).
            ValueError: sizes differ, or the mask holds a value that is no class nor the ignore index.
        """
        image_path, mask_path = os.fsdecode(self.images[index]), os.fsdecode(self.masks[index])
        try:
            image = read_image(image_path)
            mask = read_mask(mask_path)
        except CorruptFileError as err:
            raise CorruptFileError(f"{err}\n{self.layout}", err.path) from err
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"Image '{image_path}' is {image.shape[1]}x{image.shape[0]} but its mask '{mask_path}' "
                f"is {mask.shape[1]}x{mask.shape[0]}."
            )
        self.check_labels(mask, mask_path)
        return image, mask

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | None:
        try:
            image, mask = self.load(index)
        except CorruptFileError as err:
            return skip_or_raise(err, self.skip_log)
        if self.transform is None:
            return torch.from_numpy(image).permute(2, 0, 1).float(), torch.from_numpy(mask).long()
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(out["mask"]).long()


class LabelMappedSegmentationDataset(SegmentationFileDataset):
    """:class:`SegmentationFileDataset` whose raw masks go through ``lut`` (after the label check).

    Args:
        images: image paths.
        masks: mask paths (same length, same order).
        lut: ``uint8`` array of 256 entries; a raw mask value ``v`` becomes ``lut[v]``.
        transform: joint albumentations pipeline (applied after the mapping).
        layout: text appended to read errors.
        num_classes: classes after the mapping; with it, a raw value that ``lut`` does not map to a class
            or ``ignore_index`` (or that is not in ``valid_values``) raises a ``ValueError`` naming the file.
        ignore_index: mask value of unlabelled pixels after the mapping.
        valid_values: the raw values the set's encoding uses (e.g. Cityscapes ``labelIds`` 0..33); any
            other raw value is an error even where ``lut`` sends it to ``ignore_index``. ``None``: every
            value ``lut`` maps to a class or the ignore index.
        skip_log: as in :class:`SegmentationFileDataset`.

    Example:
        >>> lut = np.full(256, 255, np.uint8)
        >>> lut[1:4] = [0, 1, 2]  # raw 1..3 -> classes 0..2, raw 0 -> ignored
        >>> ds = LabelMappedSegmentationDataset([], [], lut, num_classes=3, ignore_index=255,
        ...     valid_values=range(4))
        >>> ds.check_labels(np.array([[0, 3]], np.uint8), "m.png")  # fine
        >>> ds.check_labels(np.array([[0, 9]], np.uint8), "m.png")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Mask 'm.png' holds raw label 9, which the label mapping turns into none of the ...
    """

    def __init__(
        self,
        images: Sequence[str | os.PathLike],
        masks: Sequence[str | os.PathLike],
        lut: np.ndarray,
        transform: Transform | None = None,
        layout: str = "",
        num_classes: int | None = None,
        ignore_index: int | None = None,
        valid_values: Sequence[int] | None = None,
        skip_log: CorruptFileLog | None = None,
    ) -> None:
        lut = np.asarray(lut)
        if lut.shape != (256,):
            raise ValueError(f"lut must have 256 entries, got shape {lut.shape}.")
        self.lut = lut.astype(np.uint8)
        self.valid_values = None if valid_values is None else sorted(int(v) for v in valid_values)
        super().__init__(images, masks, transform, layout, num_classes, ignore_index, skip_log)

    def _valid_labels(self) -> np.ndarray | None:
        valid_mapped = super()._valid_labels()
        if valid_mapped is None:
            return None
        valid = valid_mapped[self.lut]
        if self.valid_values is not None:
            known = np.zeros(256, bool)
            known[self.valid_values] = True
            valid &= known
        return valid

    def _label_error(self, path: str, invalid: np.ndarray) -> str:
        shown = ", ".join(str(v) for v in invalid[:10]) + (", ..." if len(invalid) > 10 else "")
        return (
            f"Mask '{path}' holds raw label {invalid[-1]}, which the label mapping turns into none of the "
            f"{self.num_classes} classes (0..{self.num_classes - 1}) nor the ignore index "
            f"{self.ignore_index} (valid raw values: {_value_runs(np.flatnonzero(self.valid_labels))}); "
            f"invalid values in this mask: [{shown}]. " + _ADVICE.format(what="the label mapping")
        )

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = super().load(index)
        return image, self.lut[mask]


class BaseSegmentationDataModule(BaseDataModule):
    """Splits and loaders of the segmentation datamodules (``(images, masks)`` batches).

    Subclasses set ``num_classes``, ``classes``, ``palette``, ``ignore_index``, ``mean`` and ``std``
    and implement :meth:`_build`. Same loader policy as the classification modules (train shuffled,
    last incomplete batch dropped, pinned memory on CUDA, persistent workers).
    """

    palette: list[tuple[int, int, int]]
    ignore_index: int

    collate_fn = staticmethod(collate_segmentation)
    num_classes: int


def layout_error(layout: str, problem: str, path: Path) -> FileNotFoundError:
    """A ``FileNotFoundError`` naming ``problem``, the offending ``path`` and the expected ``layout``."""
    return FileNotFoundError(
        f"{problem}\nOffending path: '{path}' (absolute: '{path.absolute()}').\n{layout}"
    )


def check_ignore_index(ignore_index: int, num_classes: int) -> None:
    """The ignore index must be a mask value (<= 255) that is not a class index."""
    if not num_classes <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be in [{num_classes}, 255], got {ignore_index}.")


class FileSegmentationDataModule(BaseSegmentationDataModule):
    """Shared by the file-based sets: ``self._files[split]`` image / mask lists (test falls back to val),
    an optional raw-label mapping ``self._lut`` (with the raw values the encoding uses,
    ``self._raw_values``) and the expected layout ``self._layout``, quoted by read errors.

    Training samples get :func:`~datamodules.segmentation.transforms.seg_train_transform` when
    ``augment``; the other splits are only normalised (full resolution).
    """

    _files: dict[str, tuple[list[Path], list[Path]]]
    _lut: np.ndarray | None = None
    _raw_values: Sequence[int] | None = None
    _layout: str

    def _set_options(
        self,
        crop_size: tuple[int, int],
        augment: bool,
        scale_range: tuple[float, float],
        ignore_index: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.augment = augment
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.ignore_index = ignore_index
        self.mean, self.std = tuple(mean), tuple(std)

    def _build(self, split: Split) -> SegmentationFileDataset:
        if split == "train" and self.augment:
            tf = seg_train_transform(self.crop_size, self.scale_range, self.ignore_index, self.mean, self.std)
        else:
            tf = seg_eval_transform(self.mean, self.std)
        images, masks = self._files.get(split, self._files["val"])
        checks = {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "skip_log": self.skip_log,
        }
        if self._lut is None:
            return SegmentationFileDataset(images, masks, tf, self._layout, **checks)
        return LabelMappedSegmentationDataset(
            images, masks, self._lut, tf, self._layout, valid_values=self._raw_values, **checks
        )
