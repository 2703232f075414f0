"""A distillation step keeps no teacher activation that no distiller reads."""

from __future__ import annotations

import gc
import weakref

import torch

from lightningkd.distillers import KD, FitNet
from lightningkd.modules import ClassificationDistillationModule
from tests.toys import toy_classifier


def test_teacher_activations_that_no_distiller_reads_are_freed() -> None:
    teacher = toy_classifier(num_classes=4, width=8, seed=0)
    fitnet = FitNet(student_layer="block", teacher_layer="block", student_channels=4, teacher_channels=8)
    module = ClassificationDistillationModule(
        toy_classifier(num_classes=4, width=4, seed=1), teacher, [KD(), fitnet], num_classes=4
    )
    refs: list[tuple[str, weakref.ref]] = []
    for name, layer in teacher.named_modules():
        if name:  # every layer of the teacher, tapped or not
            layer.register_forward_hook(lambda m, i, out, name=name: refs.append((name, weakref.ref(out))))
    module.train()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    loss = module.training_step((x, y), 0)
    gc.collect()
    alive = {name for name, ref in refs if ref() is not None}
    # what the losses' graphs hold until backward: the layer FitNet reads, and the logits KD reads
    assert alive <= {"block", "block.1", "fc"}, alive
    assert {"stem", "stem.0", "stem.1", "stem.2", "block.0", "pool", "flat"}.isdisjoint(alive)
    loss.backward()
    del loss
    gc.collect()
    assert not [name for name, ref in refs if ref() is not None]  # nothing outlives the step
