"""CIRKD: cross-image relational KD for semantic segmentation (mini-batch and memory-bank terms)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightningkd.distillers.base import Distiller, Features, require_labels, sum_terms
from lightningkd.functional._helpers import (
    check_feature_pair,
    check_int_at_most,
    check_label_map,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_segmentation_labels,
    resize_labels,
)
from lightningkd.functional.cirkd import cirkd_enqueue_, cirkd_memory_terms, cirkd_minibatch_loss


class CIRKDMiniBatch(Distiller):
    """Mini-batch pixel-to-pixel CIRKD: KL between cross-image pixel-similarity distributions.

    Yang, Zhou, An, Jiang, Xu & Zhang, "Cross-Image Relational Knowledge Distillation for Semantic
    Segmentation", CVPR 2022, arXiv:2204.06986. Authors' ``CriterionMiniBatchCrossImagePair`` in
    winycg/CIRKD ``losses/cirkd_mini_batch.py`` (commit 05a2753); maths in
    :func:`~lightningkd.functional.cirkd.cirkd_minibatch_loss`: L2-normalised features, all ``B^2`` ordered
    image pairs including ``i = j``, row softmax of the ``HW x HW`` cosine maps at ``temperature``,
    ``KL(teacher || student)`` 'batchmean' over rows, averaged over pairs, no ``T^2``. Computed in the
    inputs' dtype (the authors accumulate in a float32 scalar). The ``pooling`` flag is the 05a2753 2x2
    ceil-mode average pool (unused by the authors' script); the authors' HEAD instead pools 4x4 whenever
    ``H, W >= 256`` (not reproduced).

    The full CIRKD objective (``train_cirkd.py``) is ``CE + 1 * pixel KD (T=1) + 1 * this + 0.1 * memory
    p2p + 0.1 * memory p2r``: combine this distiller (``weight=1``) with the pixel-wise logit KD
    (``lightningkd.distillers.pixel_kd.PixelKD``, T=1) and :class:`CIRKDMemory` (``weight=0.1``) in a
    recipe. Under DDP each process compares only its own images (the authors' all-gather is commented out).

    Args:
        student_layer: tapped student feature (the authors: the decode head's feature before the
            classifier, e.g. DeepLabV3's ASPP + 3x3 conv output, 1/8 resolution).
        teacher_layer: tapped teacher feature at the same spatial size (channels may differ).
        temperature: tau of the similarity softmax (authors' default 0.1).
        pooling: 2x2 average pooling (ceil mode) of both maps before the similarities.
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(B, C_s, H, W)``, teacher ``(B, C_t, H, W)``.

    Returns:
        the unweighted 0-dim loss from :meth:`forward`.

    Example:
        >>> import torch
        >>> cirkd = CIRKDMiniBatch(student_layer="head", teacher_layer="head")
        >>> f = torch.randn(2, 16, 4, 4)
        >>> cirkd({"head": f}, {"head": f}).item()
        0.0
    """

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        temperature: float = 0.1,
        pooling: bool = False,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.temperature = check_positive("CIRKDMiniBatch", "temperature", temperature)
        self.pooling = bool(pooling)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = self.read_pair(student, teacher)
        return cirkd_minibatch_loss(s, t, self.temperature, self.pooling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, pooling={self.pooling}"


class CIRKDMemory(Distiller):
    """Memory-based CIRKD: pixel-to-pixel and pixel-to-region KD against queues of teacher embeddings.

    Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022,
    arXiv:2204.06986. Authors' ``StudentSegContrast`` in winycg/CIRKD ``losses/cirkd_memory.py`` (commit
    05a2753), weighted in ``train_cirkd.py``. Maths in :func:`~lightningkd.functional.cirkd.cirkd_memory_terms`
    and :func:`~lightningkd.functional.cirkd.cirkd_enqueue_`.

    Each step: the student feature goes through a learnable projection head (1x1 conv ``C_s -> C_t``
    without bias, BatchNorm, ReLU, 1x1 conv ``C_t -> C_t`` without bias; created here, trained with the
    student) and both embeddings are L2-normalised. The labels are nearest-resized to the feature size.
    In training mode the current batch's normalised teacher embeddings are **enqueued first** (per class:
    the class-mean into the region queue, up to ``pixels_per_class`` random pixels into the pixel queue),
    then ``pixel_contrast_size`` / ``region_contrast_size`` slots are drawn (one index set shared by all
    classes) and the two terms are ``kd_T^2 * KL`` between the teacher's and the student's similarity
    distributions over those keys (similarities / ``contrast_temperature``), 'batchmean' over labelled
    pixels. :meth:`terms` returns ``{"p2p": pixel_weight * p2p, "p2r": region_weight * p2r}`` and
    :meth:`forward` their sum; each call enqueues the batch once (so call one of them per step). In eval
    mode the queues are not updated.

    The queues are buffers (not parameters), saved in checkpoints, initialised like the authors' with random
    unit vectors: ``pixel_queue`` ``(K, pixel_memory_size, C_t)``, ``region_queue``
    ``(K, region_memory_size, C_t)`` and the int64 pointers ``pixel_queue_ptr``, ``region_queue_ptr``.
    At the authors' sizes (20000 and 2000 per class) with 19 classes and 256 channels they take about
    430 MB of device memory (and checkpoint).

    Differences from the authors' code:

    - The pixel enqueue takes pixels **of class c** and the pixel queue is a true ring buffer. The authors'
      code takes the first positions of the image (a bug) and, when ``ptr + K >= size``, overwrites the
      last K slots and resets ``ptr`` to 0; ``official_enqueue=True`` reproduces both.
    - BatchNorm2d instead of SyncBatchNorm (use Lightning's ``sync_batchnorm=True`` to convert it).
    - No labelled pixel in the batch gives an exact 0 (the authors' code returns NaN there).
    - Under DDP the teacher embeddings and labels of all processes are all-gathered into the queues (as
      the authors); every process draws its own random pixels, so the queues of different processes may
      differ. The gather requires the same feature and label sizes on every process.
    - ``ignore_index`` defaults to 255 (the authors' training script uses -1).

    Recipe: the authors' objective is ``CE + 1 * pixel KD + 1 * mini-batch p2p + 0.1 * memory p2p + 0.1 *
    memory p2r`` (0.01/0.01 in their Pascal VOC scripts): use this distiller with ``weight=0.1`` (and
    ``pixel_weight = region_weight = 1``) next to :class:`CIRKDMiniBatch` and the pixel-wise logit KD
    (``lightningkd.distillers.pixel_kd.PixelKD``).

    Args:
        student_layer: tapped student feature (the decode head's feature before the classifier).
        teacher_layer: tapped teacher feature at the same spatial size.
        student_channels: C_s.
        teacher_channels: C_t (the embedding dimension).
        num_classes: K.
        pixel_memory_size: pixel-queue length per class (authors: 20000).
        region_memory_size: region-queue length per class (authors: 2000).
        pixel_contrast_size: pixel keys drawn per class; ``None``: ``min(4096 // K + 1, pixel_memory_size)``
            (the authors' ``--pixel-contrast-size 4096`` divided by the classes, plus one).
        region_contrast_size: region keys per class; ``None``: ``min(1024 // K + 1, region_memory_size)``.
        pixels_per_class: most pixels of one class enqueued per image (authors: 16).
        contrast_temperature: divides the similarities (authors: 0.1).
        kd_temperature: KL temperature, whose square scales the terms (authors: 1).
        pixel_weight: factor of the pixel-to-pixel term in :meth:`forward`.
        region_weight: factor of the pixel-to-region term in :meth:`forward`.
        ignore_index: label of unlabelled pixels.
        official_enqueue: reproduce the authors' pixel enqueue (bug and ring-buffer quirk included).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, C_s, h, w)``, teacher ``(N, C_t, h, w)``, ``batch["target"]`` ``(N, H, W)`` int64.

    Returns:
        the unweighted 0-dim loss from :meth:`forward`.

    Example:
        >>> import torch
        >>> cirkd = CIRKDMemory(student_layer="head", teacher_layer="head", student_channels=8,
        ...                     teacher_channels=16, num_classes=3, pixel_memory_size=64, region_memory_size=8)
        >>> s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
        >>> y = torch.zeros(2, 16, 16, dtype=torch.long)
        >>> y[:, :, 8:] = 1
        >>> y[1, 8:] = 2  # image 0 holds classes 0 and 1, image 1 classes 0, 1 and 2
        >>> loss = cirkd({"head": s}, {"head": t}, {"target": y})
        >>> loss.ndim, cirkd.region_queue_ptr.tolist()  # one class mean per image and class present
        (0, [2, 2, 1])
    """

    needs_labels = True

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int | None = None,
        region_contrast_size: int | None = None,
        pixels_per_class: int = 16,
        contrast_temperature: float = 0.1,
        kd_temperature: float = 1.0,
        pixel_weight: float = 1.0,
        region_weight: float = 1.0,
        ignore_index: int = 255,
        official_enqueue: bool = False,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        for key, value in (
            ("student_channels", student_channels),
            ("teacher_channels", teacher_channels),
            ("num_classes", num_classes),
            ("pixel_memory_size", pixel_memory_size),
            ("region_memory_size", region_memory_size),
            ("pixels_per_class", pixels_per_class),
        ):
            check_positive_int("CIRKDMemory", key, value)
        if pixel_contrast_size is None:
            pixel_contrast_size = min(4096 // num_classes + 1, pixel_memory_size)  # train_cirkd.py
        if region_contrast_size is None:
            region_contrast_size = min(1024 // num_classes + 1, region_memory_size)  # train_cirkd.py
        for key, value, limit in (
            ("pixel_contrast_size", pixel_contrast_size, pixel_memory_size),
            ("region_contrast_size", region_contrast_size, region_memory_size),
        ):
            check_int_at_most("CIRKDMemory", key, value, limit, "the memory size")
        self.contrast_temperature = check_positive(
            "CIRKDMemory", "contrast_temperature", contrast_temperature
        )
        self.kd_temperature = check_positive("CIRKDMemory", "kd_temperature", kd_temperature)
        self.pixel_weight = check_non_negative("CIRKDMemory", "pixel_weight", pixel_weight)
        self.region_weight = check_non_negative("CIRKDMemory", "region_weight", region_weight)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.num_classes = num_classes
        self.pixel_contrast_size = pixel_contrast_size
        self.region_contrast_size = region_contrast_size
        self.pixels_per_class = pixels_per_class
        self.ignore_index = ignore_index
        self.official_enqueue = bool(official_enqueue)
        self.project_head = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
        )
        # random unit vectors until real teacher embeddings arrive (as the authors)
        self.register_buffer(
            "pixel_queue", F.normalize(torch.randn(num_classes, pixel_memory_size, teacher_channels), dim=2)
        )
        self.register_buffer("pixel_queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer(
            "region_queue", F.normalize(torch.randn(num_classes, region_memory_size, teacher_channels), dim=2)
        )
        self.register_buffer("region_queue_ptr", torch.zeros(num_classes, dtype=torch.long))

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """``{"p2p": pixel_weight * p2p, "p2r": region_weight * p2r}``; in training mode the batch is
        enqueued first."""
        s, t = self.read_pair(student, teacher)
        labels = require_labels(batch, "CIRKDMemory")
        if s.ndim != 4 or t.ndim != 4:
            raise ValueError(
                f"CIRKDMemory expects (N, C, h, w) feature maps, got student {tuple(s.shape)} and teacher "
                f"{tuple(t.shape)}."
            )
        if s.shape[1] != self.student_channels or t.shape[1] != self.teacher_channels:
            raise ValueError(
                f"CIRKDMemory was built for {self.student_channels} student and {self.teacher_channels} teacher "
                f"channels, got student {tuple(s.shape)} and teacher {tuple(t.shape)}."
            )
        check_feature_pair("CIRKDMemory", s, t)
        check_label_map("CIRKDMemory", labels, s.shape[0])
        check_segmentation_labels("CIRKDMemory", labels, self.num_classes, self.ignore_index)
        small = resize_labels(labels, tuple(s.shape[-2:]))
        embed = self.project_head(s)
        if self.training:
            keys, key_labels = _gather_across_processes(t.detach(), small)
            cirkd_enqueue_(
                self.pixel_queue,
                self.pixel_queue_ptr,
                self.region_queue,
                self.region_queue_ptr,
                keys,
                key_labels,
                pixels_per_class=self.pixels_per_class,
                ignore_index=self.ignore_index,
                official=self.official_enqueue,
            )
        p2p, p2r = cirkd_memory_terms(
            embed,
            t,
            small,
            self.pixel_queue,
            self.region_queue,
            pixel_contrast_size=self.pixel_contrast_size,
            region_contrast_size=self.region_contrast_size,
            contrast_temperature=self.contrast_temperature,
            kd_temperature=self.kd_temperature,
            ignore_index=self.ignore_index,
        )
        return {"p2p": self.pixel_weight * p2p, "p2r": self.region_weight * p2r}

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_classes={self.num_classes}, "
            f"pixel_memory={tuple(self.pixel_queue.shape[1:2])}, region_memory={tuple(self.region_queue.shape[1:2])}, "
            f"contrast=({self.pixel_contrast_size}, {self.region_contrast_size}), "
            f"official_enqueue={self.official_enqueue}"
        )


@torch.no_grad()
def _gather_across_processes(embed: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """All processes' teacher embeddings and labels, concatenated along the batch (the authors'
    ``concat_all_gather`` before their enqueue); the inputs unchanged when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embed, labels
    world = dist.get_world_size()
    embed = embed.contiguous()
    labels = labels.contiguous()
    embeds = [torch.empty_like(embed) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(embeds, embed)
    dist.all_gather(all_labels, labels)
    return torch.cat(embeds), torch.cat(all_labels)
