import matplotlib.image as mpimg
import numpy as np
import torch

from datamodules import SyntheticDetectionDataModule, SyntheticSegmentationDataModule
from datamodules.preview import colour_mask, preview_detection, preview_segmentation


def test_colour_mask_uses_palette_and_blacks_out_ignore() -> None:
    mask = torch.tensor([[0, 1], [255, 1]])
    rgb = colour_mask(mask, [(10, 20, 30), (200, 100, 0)], ignore_index=255)
    assert rgb.tolist() == [[[10, 20, 30], [200, 100, 0]], [[0, 0, 0], [200, 100, 0]]]


def test_previews_are_written_as_images(tmp_path) -> None:
    seg = preview_segmentation(SyntheticSegmentationDataModule(), str(tmp_path / "seg.png"), count=2)
    det = preview_detection(SyntheticDetectionDataModule(), str(tmp_path / "det" / "boxes.png"), count=3)
    for path, min_height in ((seg, 2 * 2.2 * 80 - 2), (det, 2 * 3.2 * 80 - 2)):
        picture = mpimg.imread(path)
        assert picture.ndim == 3 and picture.shape[0] >= min_height
        assert np.ptp(picture[..., :3]) > 0.5  # something was drawn, not a blank canvas
