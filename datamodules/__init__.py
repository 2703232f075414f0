"""LightningDataModules, datasets and albumentations pipelines for the lightningkd recipes.

One sub-package per task, one module per data set (as torchvision's datasets): ``classification/``,
``segmentation/`` and ``detection/``; every public name is importable from ``datamodules`` itself.

Classification: :class:`SyntheticClassificationDataModule` (in memory, no download),
:class:`CIFAR10DataModule` / :class:`CIFAR100DataModule` (official python pickles or ImageFolder),
:class:`ImageFolderDataModule` and :class:`ImageNetDataModule`. Batches are ``(images, labels)``:
``float32`` ``(N, 3, H, W)`` normalised with the module's ``mean``/``std`` and ``int64`` ``(N,)``.

Segmentation: :class:`SyntheticSegmentationDataModule`, :class:`CamVidDataModule` (SegNet layout),
:class:`CityscapesDataModule`, :class:`ADE20KDataModule` and :class:`VOCSegmentationDataModule`
(optionally with SBD); batches are ``(images, masks)`` with ``int64`` masks ``(N, H, W)`` holding the
ignore index where unlabelled; a mask value that is no class nor the ignore index raises an error
naming the file.
Detection: :class:`SyntheticDetectionDataModule`, :class:`COCODetectionDataModule` (pycocotools) and
:class:`VOCDetectionDataModule` (VOC XML); batches are ``(list of images, list of target dicts)`` in the
torchvision detection format (``boxes`` xyxy ``float32``, ``labels`` ``int64``, 0 is background).

Every datamodule that reads image / mask files takes ``skip_corrupt`` (default ``False``: an unreadable
file stops the run with a :class:`CorruptFileError` naming it; ``True``: it is skipped, counted and
listed, see :class:`BaseDataModule`).
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before albumentations is imported: no version check

from datamodules.base import BaseClassificationDataModule, BaseDataModule  # noqa: E402
from datamodules.classification import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    SyntheticClassificationDataModule,
    cifar_eval_transform,
    cifar_train_transform,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from datamodules.corrupt import CorruptFileError  # noqa: E402
from datamodules.datasets import ArrayDataset, ImageFileDataset, read_image  # noqa: E402
from datamodules.detection import (  # noqa: E402
    COCODetectionDataModule,
    DetectionDataset,
    DetectionRecord,
    ResizeMinMax,
    SyntheticDetectionDataModule,
    VOCDetectionDataModule,
    collate_detection,
    detection_eval_transform,
    detection_train_transform,
    load_coco_records,
    load_voc_records,
    to_coco_detections,
    to_coco_ground_truth,
)
from datamodules.segmentation import (  # noqa: E402
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    SYNTHETIC_SEG_MEAN,
    SYNTHETIC_SEG_STD,
    VOC_CLASSES,
    VOC_PALETTE,
    ADE20KDataModule,
    BaseSegmentationDataModule,
    CamVidDataModule,
    CityscapesDataModule,
    LabelMappedSegmentationDataset,
    SegmentationFileDataset,
    SyntheticSegmentationDataModule,
    VOCSegmentationDataModule,
    ade20k_lut,
    cityscapes_lut,
    collate_segmentation,
    read_mask,
    seg_eval_transform,
    seg_train_transform,
    synthetic_segmentation,
    voc_colormap,
)

__all__ = [
    "CityscapesDataModule",
    "ADE20KDataModule",
    "VOCSegmentationDataModule",
    "LabelMappedSegmentationDataset",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "CITYSCAPES_ID_TO_TRAINID",
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "VOC_CLASSES",
    "VOC_PALETTE",
    "cityscapes_lut",
    "ade20k_lut",
    "voc_colormap",
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
    "seg_eval_transform",
    "seg_train_transform",
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "SYNTHETIC_SEG_MEAN",
    "SYNTHETIC_SEG_STD",
    "BaseSegmentationDataModule",
    "CamVidDataModule",
    "SegmentationFileDataset",
    "SyntheticSegmentationDataModule",
    "collate_segmentation",
    "read_mask",
    "synthetic_segmentation",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayDataset",
    "BaseClassificationDataModule",
    "CorruptFileError",
    "BaseDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "SyntheticClassificationDataModule",
    "cifar_eval_transform",
    "cifar_train_transform",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "read_image",
]
