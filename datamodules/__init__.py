"""LightningDataModules, datasets and albumentations pipelines for the lightningkd recipes.

Classification: :class:`SyntheticClassificationDataModule` (in memory, no download),
:class:`CIFAR10DataModule` / :class:`CIFAR100DataModule` (official python pickles or ImageFolder),
:class:`ImageFolderDataModule` and :class:`ImageNetDataModule`. Batches are ``(images, labels)``:
``float32`` ``(N, 3, H, W)`` normalised with the module's ``mean``/``std`` and ``int64`` ``(N,)``.

Segmentation: :class:`SyntheticSegmentationDataModule` and :class:`CamVidDataModule` (SegNet layout), :class:`CityscapesDataModule`,
:class:`ADE20KDataModule` and :class:`VOCSegmentationDataModule` (optionally with SBD); batches
are ``(images, masks)`` with ``int64`` masks ``(N, H, W)`` holding the ignore index where unlabelled.
Detection: :class:`SyntheticDetectionDataModule`, :class:`COCODetectionDataModule` (pycocotools) and
:class:`VOCDetectionDataModule` (VOC XML); batches are ``(list of images, list of target dicts)`` in the
torchvision detection format (``boxes`` xyxy ``float32``, ``labels`` ``int64``, 0 is background).
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before albumentations is imported: no version check

from datamodules.base import BaseClassificationDataModule, BaseDataModule  # noqa: E402
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule  # noqa: E402
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
from datamodules.imagefolder import ImageFolderDataModule, ImageNetDataModule  # noqa: E402
from datamodules.seg_sets import (  # noqa: E402
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    VOC_PALETTE,
    ADE20KDataModule,
    CityscapesDataModule,
    LabelMappedSegmentationDataset,
    VOCSegmentationDataModule,
    ade20k_lut,
    cityscapes_lut,
    voc_colormap,
)
from datamodules.seg_transforms import seg_eval_transform, seg_train_transform  # noqa: E402
from datamodules.segmentation import (  # noqa: E402
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    SYNTHETIC_SEG_MEAN,
    SYNTHETIC_SEG_STD,
    BaseSegmentationDataModule,
    CamVidDataModule,
    SegmentationFileDataset,
    SyntheticSegmentationDataModule,
    collate_segmentation,
    read_mask,
    synthetic_segmentation,
)
from datamodules.synthetic import SyntheticClassificationDataModule  # noqa: E402
from datamodules.transforms import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    cifar_eval_transform,
    cifar_train_transform,
    imagenet_eval_transform,
    imagenet_train_transform,
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
