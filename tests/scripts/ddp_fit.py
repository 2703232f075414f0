"""Run a 2-process CPU DDP distillation fit; each rank writes what the test checks (run by test_ddp.py)."""

import functools
import json
import sys

import lightning as L
import torch

from lightningkd import ClassificationDistillationModule
from lightningkd.distillers import KD, FitNet
from tests.toys import toy_classifier, toy_loader


def main(out_dir: str) -> None:
    student, teacher = toy_classifier(width=6, seed=1), toy_classifier(width=10, seed=2)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = ClassificationDistillationModule(
        student,
        teacher,
        [
            KD(temperature=2.0),
            FitNet(student_layer="block", teacher_layer="block", student_channels=6, teacher_channels=10),
        ],
        num_classes=4,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # different data per rank comes from the DistributedSampler Lightning adds
    trainer.fit(module, toy_loader(n=64, batch_size=4))
    rank = trainer.global_rank
    report = {
        "rank": rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "teacher_unchanged": all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items()),
        "teacher_eval": not teacher.training,
        "teacher_grads": [p.grad is not None for p in teacher.parameters()].count(True),
        "student_sum": float(sum(p.detach().double().sum() for p in student.parameters())),
        "adapter_sum": float(sum(p.detach().double().sum() for p in module.distillers.parameters())),
    }
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(report, f)
    # Lightning leaves the gloo group alive; tearing it down here, once both ranks are done, keeps its
    # threads from being killed at interpreter exit ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
