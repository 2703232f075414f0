"""Lightning callbacks for distillation runs."""

from lightningkd.callbacks.centers import NDClassCenters, class_centers, load_class_centers
from lightningkd.callbacks.det_preview import DetectionPreview
from lightningkd.callbacks.interrupt import InterruptCheckpoint
from lightningkd.callbacks.overwrite import NoOverwrite
from lightningkd.callbacks.precise_bn import PreciseBatchNorm, recompute_batchnorm
from lightningkd.callbacks.seg_preview import SegmentationPreview
from lightningkd.callbacks.summary import MetricsSummary
from lightningkd.callbacks.warmup import KDWeightWarmup

__all__ = [
    "DetectionPreview",
    "InterruptCheckpoint",
    "KDWeightWarmup",
    "MetricsSummary",
    "NDClassCenters",
    "NoOverwrite",
    "PreciseBatchNorm",
    "SegmentationPreview",
    "class_centers",
    "load_class_centers",
    "recompute_batchnorm",
]
