"""Recompute the student's BatchNorm statistics with its current weights before each validation."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class PreciseBatchNorm(L.Callback):
    """Replace the student's running BatchNorm statistics by exact averages over training batches.

    BatchNorm layers keep exponential moving averages of the batch statistics, which lag behind weights
    that change quickly (models trained from scratch, short schedules, and torchvision's MobileNetV3,
    whose BatchNorm momentum is 0.01); evaluation then sees statistics of older weights and can fall far
    below what the network has learned. Before every validation this callback runs ``num_batches``
    training batches through the student in train mode without gradients and sets each BatchNorm's
    running mean and variance to their plain average over those batches ("precise BN": Wu & Johnson,
    "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576). Under DDP the statistics are averaged over
    the processes. The weights and the optimizer are untouched. The teacher (frozen, eval mode) is left
    alone.

    Args:
        num_batches: training batches to average over (about 100-200 images are usually enough).

    Example:
        >>> PreciseBatchNorm(num_batches=20).num_batches
        20
    """

    def __init__(self, num_batches: int = 50) -> None:
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
        self.num_batches = num_batches

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # only during fit, with the weights the current epoch trained
        loader = trainer.train_dataloader
        if loader is None:
            return
        recompute_batchnorm(pl_module, loader, self.num_batches)
        for module in _batchnorms(pl_module.student):
            for name in ("running_mean", "running_var"):
                stat = getattr(module, name)
                stat.copy_(trainer.strategy.reduce(stat, reduce_op="mean"))


def recompute_batchnorm(pl_module: Any, loader: Any, num_batches: int) -> int:
    """Set the student's BatchNorm running statistics to their average over ``num_batches`` batches.

    Returns the number of batches used.
    """
    student: nn.Module = pl_module.student
    layers = list(_batchnorms(student))
    if not layers:
        return 0
    was_training = student.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts equally
    student.train()
    used = 0
    with torch.no_grad():
        for batch in loader:
            if used == num_batches:
                break
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            images = pl_module.unpack_batch(batch)["image"]
            student(pl_module.prepare_images(images))
            used += 1
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    student.train(was_training)
    return used


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
