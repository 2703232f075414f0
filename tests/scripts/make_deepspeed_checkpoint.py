"""Write the DeepSpeed ZeRO-2 checkpoint folder of tests/fixtures/deepspeed_zero2 (needs ``pip install deepspeed``).

Not run by the tests (DeepSpeed is not a lightningkd dependency); it made the fixture they read, on 2 CPU
processes with DeepSpeed's CPU accelerator and gloo::

    DS_BUILD_OPS=0 pip install deepspeed    # in a separate environment
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/scripts/make_deepspeed_checkpoint.py tests/fixtures

The toy distillation module of strategy_fit.py trains 2 ZeRO-2 steps in fp32 (Lightning's ``32-true``; each
process keeps the fp32 master weights of its partition in the optimizer file it writes), and the folder is saved with the
call Lightning's ``DeepSpeedStrategy.save_checkpoint`` makes: ``engine.save_checkpoint(folder,
client_state=<the Lightning checkpoint without state_dict and optimizer_states>, tag="checkpoint",
exclude_frozen_parameters=True)``. (Lightning's strategy itself refuses CPUs.) DeepSpeed's own converter,
``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``, then writes the expected fp32
student to ``deepspeed_zero2_student.pt``: the reference the export test compares with.
"""

from __future__ import annotations

import os
import shutil
import sys

import lightning as L
import torch

from tests.scripts.strategy_fit import build
from tests.toys import toy_loader


def main(out_dir: str) -> None:
    import deepspeed  # not a dependency: imported only when the fixture is remade (not at test collection)

    folder = os.path.join(out_dir, "deepspeed_zero2")
    module, _, _ = build()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,  # plain torch SGD, as lightningkd's optimizer callables give
    }
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.1, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    images, labels = toy_loader(n=16, batch_size=4).dataset.tensors
    rank = torch.distributed.get_rank()
    for step in range(2):
        part = slice(8 * step + 4 * rank, 8 * step + 4 * rank + 4)
        loss = module.training_step((images[part], labels[part]), step)
        engine.backward(loss)
        engine.step()
    client_state = {
        "epoch": 0,
        "global_step": 2,
        "pytorch-lightning_version": L.__version__,
        "loops": {},
        "callbacks": {},
        "lr_schedulers": [],
        "lightningkd": {"teacher_validated": False},
    }
    engine.save_checkpoint(
        folder, client_state=client_state, tag="checkpoint", exclude_frozen_parameters=True
    )
    torch.distributed.barrier()
    if rank == 0:
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's copies of its converters
            if os.path.exists(os.path.join(folder, script)):
                os.remove(os.path.join(folder, script))
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(folder)
        student = {k[len("student.") :]: v.clone() for k, v in state.items() if k.startswith("student.")}
        torch.save(student, os.path.join(out_dir, "deepspeed_zero2_student.pt"))
        shutil.rmtree(os.path.join(folder, "__pycache__"), ignore_errors=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
