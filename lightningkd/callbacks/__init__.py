"""Lightning callbacks for distillation runs."""

from lightningkd.callbacks.centers import NDClassCenters
from lightningkd.callbacks.precise_bn import PreciseBatchNorm, recompute_batchnorm
from lightningkd.callbacks.seg_preview import SegmentationPreview
from lightningkd.callbacks.summary import MetricsSummary
from lightningkd.callbacks.warmup import KDWeightWarmup

__all__ = [
    "KDWeightWarmup",
    "MetricsSummary",
    "NDClassCenters",
    "PreciseBatchNorm",
    "SegmentationPreview",
    "recompute_batchnorm",
]
