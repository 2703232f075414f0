"""PreciseBatchNorm: running statistics become exact averages over training batches, before validation."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightningkd.callbacks import PreciseBatchNorm, recompute_batchnorm
from lightningkd.modules import SegmentationDistillationModule


class BNThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3, momentum=0.01)
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    # batch k has channel means around k: a stale moving average (momentum 0.01) cannot follow
    return [
        (torch.randn(4, 3, 5, 5, generator=g) + k, torch.randint(0, 2, (4, 5, 5), generator=g))
        for k in range(6)
    ]


def test_recompute_gives_the_average_of_the_batch_statistics() -> None:
    module = SegmentationDistillationModule(BNThenConv(), num_classes=2)
    data = batches()
    module.student.eval()
    assert recompute_batchnorm(module, data, num_batches=4) == 4
    bn = module.student.bn
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x, _ in data[:4]]).mean(0)
    expected_var = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x, _ in data[:4]]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert bn.momentum == 0.01 and not module.student.training  # restored


def test_callback_runs_before_validation_during_fit_only() -> None:
    data = batches()
    loader = DataLoader(
        TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])), batch_size=4
    )
    module = SegmentationDistillationModule(
        BNThenConv(), num_classes=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.0)
    )
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[PreciseBatchNorm(num_batches=2)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, loader)
    expected = torch.stack([x.mean(dim=(0, 2, 3)) for x, _ in data[:2]]).mean(0)
    torch.testing.assert_close(module.student.bn.running_mean, expected)
    module.student.bn.running_mean.fill_(7.0)
    trainer.validate(module, loader, verbose=False)  # a separate validate keeps the statistics
    assert module.student.bn.running_mean.eq(7.0).all()
    with pytest.raises(ValueError, match="num_batches"):
        PreciseBatchNorm(num_batches=0)
