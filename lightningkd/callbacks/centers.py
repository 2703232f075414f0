"""Compute the teacher class centres that the ND (KD++) distiller needs, before training starts."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lightningkd.modules.base import DistillationModule


class NDClassCenters(L.Callback):
    """Fill the ``centers`` of every :class:`~lightningkd.distillers.ND` distiller that has none.

    The centre of class ``k`` is the mean teacher embedding of the training images of class ``k``, as in
    WangYZ1608/Knowledge-Distillation-via-ND (``emb_fea_distribution.py``), which iterates the training
    set with its training augmentation. Each process iterates a fresh, un-sharded training loader from the
    datamodule, so all DDP ranks get the same centres. The centres are buffers of the distiller: they are
    saved in checkpoints and not recomputed on resume.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightningkd.distillers.nd import ND, class_centers

        if not isinstance(pl_module, DistillationModule):
            raise TypeError("NDClassCenters works with lightningkd DistillationModule subclasses.")
        pending = [d for d in pl_module.distillers if isinstance(d, ND) and not d.has_centers]
        if not pending:
            return
        if trainer.datamodule is None:
            raise RuntimeError(
                "NDClassCenters needs a LightningDataModule (trainer.fit(module, datamodule=...)) to iterate the "
                "training set; otherwise pass centers= to ND."
            )
        loader = trainer.datamodule.train_dataloader()
        for d in pending:
            rank_zero_info(
                f"NDClassCenters: computing {d.num_classes} teacher class centres at {d.teacher_layers[0]!r}"
            )
            centers = class_centers(
                pl_module.teacher,
                loader,
                d.teacher_layers[0],
                d.num_classes,
                device=pl_module.device,
                teacher_input=pl_module.teacher_input,
            )
            d.set_centers(centers)
