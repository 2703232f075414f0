"""Fit the same distillation run under several strategies; each writes a checkpoint and a per-rank report.

Run as a script (by tests/test_strategies.py) it starts 2 CPU processes (gloo) and fits, one after the
other in the same processes: DDP, FSDP with the teacher sharded, FSDP with the teacher replicated, then
resumes the sharded-teacher FSDP run for one more step. :func:`fit_single` is the single-process run of
the same training, called in the test's own process.

The runs are built to train identically: the same initial weights, and each optimizer step sees the same
8 samples split into the same two halves of 4 (ranks 0 and 1 under DDP/FSDP; two accumulated micro-batches
in the single process, taken from the index lists of the distributed sampler). The student's BatchNorm normalises each half by its own statistics, and the gradient is the mean of the two
halves' gradients in every run.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import lightning as L
import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lightningkd import ClassificationDistillationModule
from lightningkd.distillers import KD, FitNet
from lightningkd.strategies import DistillationFSDPStrategy, full_teacher_state
from tests.toys import toy_classifier, toy_loader

STEPS = 3
SAMPLES = 2 * 4 * STEPS  # two halves of 4 per step


def build() -> tuple[ClassificationDistillationModule, torch.nn.Module, torch.nn.Module]:
    """The module, its student and its teacher, with fixed initial weights."""
    student, teacher = toy_classifier(width=6, seed=1), toy_classifier(width=10, seed=2)
    torch.manual_seed(3)  # the FitNet regressor's initial weights
    module = ClassificationDistillationModule(
        student,
        teacher,
        [
            KD(temperature=2.0),
            FitNet(student_layer="block", teacher_layer="block", student_channels=6, teacher_channels=10),
        ],
        num_classes=4,
        # momentum: a stateless optimizer trips Lightning 2.6 when resuming FSDP (IndexError on its empty state)
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    )
    return module, student, teacher


def trainer(strategy: Any, devices: int, max_steps: int, accumulate: int = 1) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit_single(checkpoint: str) -> None:
    """The single-process run: two accumulated micro-batches per step, halves as the ranks see them."""
    module, _, _ = build()
    data = toy_loader(n=SAMPLES, batch_size=4).dataset
    # the indices each rank gets from the DistributedSampler Lightning adds (it shuffles training data,
    # seed 0, epoch 0: the one epoch of these runs), interleaved as the micro-batches of each step
    ranks = [list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    order = [i for step in range(STEPS) for rank in ranks for i in rank[4 * step : 4 * step + 4]]
    run = trainer("auto", devices=1, max_steps=STEPS, accumulate=2)
    run.fit(module, DataLoader(Subset(data, order), batch_size=4))
    run.save_checkpoint(checkpoint)


def _teacher_report(
    module: Any, teacher: torch.nn.Module, before: dict, run: L.Trainer, sharded: bool
) -> dict:
    state = full_teacher_state(run.strategy) if sharded else teacher.state_dict()
    optimizer = run.optimizers[0]
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    teacher_ids = {id(p) for p in teacher.parameters()} | {id(p) for p in module.teacher.parameters()}
    trainable = [*module.student.parameters(), *module.distillers.parameters()]
    return {
        "world_size": run.world_size,
        "global_step": run.global_step,
        "teacher_unchanged": sorted(state) == sorted(before)
        and all(torch.equal(before[k], state[k]) for k in before),
        # FSDP's wrappers keep a training flag of their own that nothing reads: the layers' flags count
        "teacher_eval": not any(m.training for m in teacher.modules() if not isinstance(m, FSDP)),
        "teacher_grads": sum(
            p.grad is not None for p in [*teacher.parameters(), *module.teacher.parameters()]
        ),
        "teacher_requires_grad": sum(p.requires_grad for p in module.teacher.parameters()),
        "optimizer_teacher_params": sum(id(p) in teacher_ids for p in in_optimizer),
        "optimizer_params": len(in_optimizer),
        "trainable_params": len(trainable),
        "optimizer_is_trainable": {id(p) for p in in_optimizer} == {id(p) for p in trainable},
    }


def main(out_dir: str) -> None:
    strategies = {
        "ddp": lambda: "ddp",
        "fsdp_shard": lambda: DistillationFSDPStrategy(teacher="shard"),
        "fsdp_replicate": lambda: DistillationFSDPStrategy(teacher="replicate"),
    }
    reports = {}
    for name, make in strategies.items():
        module, _, teacher = build()
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        run = trainer(make(), devices=2, max_steps=STEPS)
        run.fit(module, toy_loader(n=SAMPLES, batch_size=4))
        reports[name] = _teacher_report(module, teacher, before, run, sharded=name == "fsdp_shard")
        run.save_checkpoint(f"{out_dir}/{name}.ckpt")
        if name == "fsdp_shard":
            # resume the saved run for one more step: the checkpoint holds no teacher keys
            module, _, teacher = build()
            run = trainer(DistillationFSDPStrategy(teacher="shard"), devices=2, max_steps=STEPS + 1)
            run.fit(module, toy_loader(n=SAMPLES + 8, batch_size=4), ckpt_path=f"{out_dir}/{name}.ckpt")
            reports["fsdp_shard_resumed"] = _teacher_report(module, teacher, before, run, sharded=True)
    rank = torch.distributed.get_rank()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(reports, f)
    # Lightning leaves the gloo group alive; tearing it down here, once both ranks are done, keeps its
    # threads from being killed at interpreter exit ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
