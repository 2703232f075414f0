"""Draw a few augmented training samples with their masks or boxes, to check a pipeline by eye.

    python -m datamodules.preview segmentation camvid ../shared/data/camvid docs/camvid_train_augmented.png
    python -m datamodules.preview detection voc ../shared/data/bccd docs/bccd_train_augmented.png

The images are un-normalised with the datamodule's ``mean``/``std``; masks are coloured with its palette
(ignore pixels black) and boxes drawn with their class names.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def _to_rgb(image: torch.Tensor, mean, std) -> np.ndarray:
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    return (image.float() * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()


def colour_mask(mask: torch.Tensor, palette, ignore_index: int) -> np.ndarray:
    """RGB picture of a class-index mask: each class in its palette colour, ignore pixels black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    lut[ignore_index] = 0
    return lut[mask.numpy().astype(np.int64).clip(0, 255)]


def preview_segmentation(datamodule, path: str, count: int = 4) -> str:
    """Save ``count`` augmented training samples (image | mask) of a segmentation datamodule to ``path``."""
    datamodule.setup("fit")
    fig, axes = plt.subplots(count, 2, figsize=(6, 2.2 * count), squeeze=False)
    for row in range(count):
        image, mask = datamodule.train_set[row]
        axes[row, 0].imshow(_to_rgb(image, datamodule.mean, datamodule.std))
        axes[row, 1].imshow(colour_mask(mask, datamodule.palette, datamodule.ignore_index))
        for ax in axes[row]:
            ax.axis("off")
    axes[0, 0].set_title("augmented image")
    axes[0, 1].set_title("mask (ignore = black)")
    return _save(fig, path)


def preview_detection(datamodule, path: str, count: int = 4) -> str:
    """Save ``count`` augmented training samples of a detection datamodule, boxes drawn, to ``path``."""
    datamodule.setup("fit")
    cols = min(count, 2)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        image, target = datamodule.train_set[i]
        ax.imshow(_to_rgb(image, datamodule.mean, datamodule.std))
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", linewidth=1))
            ax.text(x0, y0, datamodule.classes[label - 1], color="yellow", fontsize=6, va="bottom")
    return _save(fig, path)


def _save(fig, path: str) -> str:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    from datamodules import CamVidDataModule, COCODetectionDataModule, VOCDetectionDataModule

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=["segmentation", "detection"])
    parser.add_argument("dataset", choices=["camvid", "coco", "voc"])
    parser.add_argument("data_dir")
    parser.add_argument("output")
    parser.add_argument("--classes", nargs="+", default=["RBC", "WBC", "Platelets"], help="VOC class list")
    parser.add_argument("--count", type=int, default=4)
    ns = parser.parse_args()
    torch.manual_seed(0)
    if ns.task == "segmentation":
        if ns.dataset != "camvid":
            raise SystemExit("segmentation previews: dataset camvid (or call preview_segmentation in Python)")
        path = preview_segmentation(CamVidDataModule(ns.data_dir, num_workers=0), ns.output, ns.count)
    elif ns.dataset == "coco":
        path = preview_detection(COCODetectionDataModule(ns.data_dir, num_workers=0), ns.output, ns.count)
    else:
        path = preview_detection(
            VOCDetectionDataModule(ns.data_dir, ns.classes, num_workers=0), ns.output, ns.count
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
