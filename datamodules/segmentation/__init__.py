"""Semantic segmentation: a synthetic set, CamVid, Cityscapes, ADE20K and Pascal VOC 2012 (+SBD).

Batches are ``(images, masks)``: ``float32`` ``(N, 3, H, W)`` normalised with the module's ``mean`` /
``std`` and ``int64`` ``(N, H, W)`` masks holding the ignore index where unlabelled.
"""

from datamodules.segmentation.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, ADE20KDataModule, ade20k_lut
from datamodules.segmentation.base import (
    BaseSegmentationDataModule,
    LabelMappedSegmentationDataset,
    SegmentationFileDataset,
    collate_segmentation,
    read_mask,
)
from datamodules.segmentation.camvid import CAMVID_CLASSES, CAMVID_PALETTE, CamVidDataModule
from datamodules.segmentation.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    CityscapesDataModule,
    cityscapes_lut,
)
from datamodules.segmentation.synthetic import (
    SYNTHETIC_SEG_MEAN,
    SYNTHETIC_SEG_STD,
    SyntheticSegmentationDataModule,
    synthetic_segmentation,
)
from datamodules.segmentation.transforms import seg_eval_transform, seg_train_transform
from datamodules.segmentation.voc import VOC_CLASSES, VOC_PALETTE, VOCSegmentationDataModule, voc_colormap

__all__ = [
    "ADE20KDataModule",
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "BaseSegmentationDataModule",
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_ID_TO_TRAINID",
    "CITYSCAPES_PALETTE",
    "CamVidDataModule",
    "CityscapesDataModule",
    "LabelMappedSegmentationDataset",
    "SYNTHETIC_SEG_MEAN",
    "SYNTHETIC_SEG_STD",
    "SegmentationFileDataset",
    "SyntheticSegmentationDataModule",
    "VOCSegmentationDataModule",
    "VOC_CLASSES",
    "VOC_PALETTE",
    "ade20k_lut",
    "cityscapes_lut",
    "collate_segmentation",
    "read_mask",
    "seg_eval_transform",
    "seg_train_transform",
    "synthetic_segmentation",
    "voc_colormap",
]
