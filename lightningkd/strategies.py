"""Multi-process strategies that know about the frozen teacher of a :class:`DistillationModule`.

Lightning's strategies treat a LightningModule as one model to train. A distillation module holds two: a
trainable student (with the distillers' adapters) and a frozen teacher that only runs forward.
:class:`DistillationFSDPStrategy` is Lightning's ``FSDPStrategy`` (FSDP1,
``torch.distributed.fsdp.FullyShardedDataParallel``) with the teacher handled on purpose:

* ``teacher="replicate"`` (default): the teacher is left out of FSDP (``ignored_modules``): every process
  keeps the whole teacher, as under DDP, and its forward pass needs no communication. It works with every
  distiller and task module.
* ``teacher="shard"``: the teacher is an FSDP unit of its own. Its weights are split across the processes
  like the student's and gathered for each forward pass of the whole teacher; its flat parameter has
  ``requires_grad=False``, so it gets no gradient buffer, no gradient reduce-scatter and no optimizer
  state. The choice for a teacher too large to hold once per GPU. Only a teacher that is run whole can be
  sharded (its weights exist only inside its forward pass): distillers that run the teacher's own layers
  (ScaleKD) or back-propagate through it, and task modules that run parts of it (detection), are refused
  with a message to use ``"replicate"``.

Either way only the student and the adapters are given to the optimizer
(:meth:`~lightningkd.modules.base.DistillationModule.trainable_parameters`), checkpoints hold the full
(unsharded) state of the student and adapters in one file that ``lightningkd export`` reads like any
other run's (the teacher's keys are dropped by the module's ``on_save_checkpoint``), and on resume the
teacher built from the recipe is used.

The strategy also runs on CPU processes (``accelerator: cpu``, gloo), which lets CI test FSDP without a
GPU. Lightning refuses ``strategy: fsdp`` with ``accelerator: cpu`` and torch's FSDP refuses CPU modules
unless it is given the CPU as ``device_id``; this subclass passes the process's device itself.
"""

from __future__ import annotations

import os
from collections.abc import Set
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from torch.distributed.fsdp.wrap import CustomPolicy

from lightningkd.distillers.base import Distiller
from lightningkd.modules.base import DistillationModule

TeacherPlacement = Literal["shard", "replicate"]


class DistillationFSDPStrategy(FSDPStrategy):
    """Fully Sharded Data Parallel for distillation: the student sharded and trained, the teacher frozen.

    See the module docstring for what ``teacher`` does. The other arguments are those of Lightning's
    ``FSDPStrategy`` that a recipe sets; the FSDP units use ``use_orig_params=True`` (Lightning's default),
    so the optimizer is built from the student's own parameters.

    Args:
        teacher: ``"replicate"`` (the teacher stays whole on every process, outside FSDP) or ``"shard"``
            (the teacher is an FSDP unit of its own, sharded, without gradients).
        auto_wrap_policy: layer classes of the student (and, with ``teacher="shard"``, of the teacher)
            that become FSDP units of their own (e.g. ``{torchvision.models.resnet.Bottleneck}``);
            ``None``: the student is one unit.
        activation_checkpointing_policy: layer classes whose activations are recomputed in the backward
            pass instead of stored.
        sharding_strategy: ``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ``"NO_SHARD"``, ``"HYBRID_SHARD"``.
        cpu_offload: keep the sharded parameters in CPU memory between uses.
        state_dict_type: only ``"full"``: checkpoints are single files holding the whole student. (A
            sharded checkpoint is a folder that would need the teacher's shards to resume.)
        process_group_backend: ``"nccl"``, ``"gloo"`` ... (``None``: the device's default).
        timeout: timeout of the collective operations.

    Example:
        >>> strategy = DistillationFSDPStrategy(teacher="replicate")
        >>> strategy.teacher
        'replicate'
        >>> DistillationFSDPStrategy(teacher="ignore")
        Traceback (most recent call last):
        ...
        ValueError: teacher must be 'shard' or 'replicate', got 'ignore'.
    """

    def __init__(
        self,
        teacher: TeacherPlacement = "replicate",
        auto_wrap_policy: Set[type[nn.Module]] | None = None,
        activation_checkpointing_policy: Set[type[nn.Module]] | None = None,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        cpu_offload: bool = False,
        state_dict_type: Literal["full"] = "full",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if teacher not in ("shard", "replicate"):
            raise ValueError(f"teacher must be 'shard' or 'replicate', got {teacher!r}.")
        if state_dict_type != "full":
            raise ValueError(
                f"state_dict_type {state_dict_type!r} is not supported: use 'full'. A sharded checkpoint is a "
                "folder of per-process shards whose loading needs every key of the module, including the "
                "teacher's, which lightningkd checkpoints leave out."
            )
        self.teacher = teacher
        self.wrap_layers = frozenset(auto_wrap_policy or ())
        super().__init__(
            auto_wrap_policy=None,  # built in _setup_model, once the teacher is known
            activation_checkpointing_policy=set(activation_checkpointing_policy)
            if activation_checkpointing_policy
            else None,
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            state_dict_type=state_dict_type,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def fsdp_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the root ``FullyShardedDataParallel`` (after the module is attached)."""
        teacher = getattr(self.lightning_module, "teacher", None)
        kwargs = dict(self.kwargs)
        layers = tuple(self.wrap_layers)
        if teacher is None or self.teacher == "replicate":
            if teacher is not None:
                kwargs["ignored_modules"] = [teacher]
                # FSDP moves only the modules it manages; the replicated teacher goes to the device here
                teacher.to(self.root_device)

            def wrap(module: nn.Module) -> bool:
                return bool(layers) and isinstance(module, layers)
        else:
            _check_teacher_runs_whole(self.lightning_module)

            # the teacher as one unit of its own: its flat parameter is all frozen, so it has no gradient
            def wrap(module: nn.Module) -> bool:
                return module is teacher or (bool(layers) and isinstance(module, layers))

        if layers or (teacher is not None and self.teacher == "shard"):
            kwargs["auto_wrap_policy"] = CustomPolicy(wrap)
        return kwargs

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` in FSDP with the teacher sharded or ignored (see the module docstring)."""
        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise ValueError(
                "The model already holds FullyShardedDataParallel modules: DistillationFSDPStrategy wraps the "
                "student and the teacher itself; pass plain models."
            )
        device = self.root_device
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            # torch's FSDP takes CPU modules only when told the CPU is their device (gloo, CI)
            device_id=device if device.type == "cpu" else device.index,
            **self.fsdp_kwargs(),
        )
        module = self.lightning_module
        tap = getattr(module, "teacher_tap", None)
        if self.teacher == "shard" and tap is not None:
            # the tap must call the FSDP unit (which gathers the weights), not the bare teacher inside it
            tap.model = module.teacher
        _move_torchmetrics_to_device(model, device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Check and load a full checkpoint, which has no teacher keys (the recipe's teacher is kept).

        Lightning's FSDP strategy loads the weights (and removes them from the checkpoint) before the
        module's ``on_load_checkpoint`` runs, so that hook can neither put the teacher's weights back in
        nor compare the keys. Here the file's keys and shapes are compared first with the module's full
        (gathered) ``state_dict``, so a checkpoint of another student or other adapters is refused with
        the module's own message; the weights are then loaded without ``strict`` (the teacher's keys are
        the only ones missing).
        """
        module = self.lightning_module
        path = self.broadcast(checkpoint_path)
        check = getattr(module, "_check_resumed_state", None)
        if check is not None and os.path.isfile(path):
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
            config = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
            with FullyShardedDataParallel.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
                own = self.model.state_dict()
            check(saved, own=own)
        strict = module.strict_loading
        module.strict_loading = False
        try:
            return super().load_checkpoint(path, weights_only=weights_only)
        finally:
            module.strict_loading = strict


def _check_teacher_runs_whole(module: Any) -> None:
    """Refuse ``teacher="shard"`` where something runs parts of the teacher, bypassing its FSDP unit."""
    fix = "use DistillationFSDPStrategy(teacher='replicate'), which keeps the whole teacher on every process."
    if isinstance(module, DistillationModule) and (
        type(module).teacher_features is not DistillationModule.teacher_features
    ):
        raise ValueError(
            f"teacher='shard' cannot shard the teacher of {type(module).__name__}: it runs parts of the teacher "
            f"itself (its own teacher_features), where a sharded teacher has no weights; {fix}"
        )
    for d in getattr(module, "distillers", ()):
        for part in d.modules():
            wrapper = any(isinstance(inner, Distiller) for inner in part.modules() if inner is not part)
            runs_layers = isinstance(part, Distiller) and "attach_teacher" in vars(type(part)) and not wrapper
            if runs_layers or getattr(part, "needs_teacher_grad", False):
                raise ValueError(
                    f"teacher='shard' cannot shard the teacher for {type(part).__name__}: it runs the teacher's "
                    f"own layers or back-propagates through them, where a sharded teacher has no weights; {fix}"
                )


def full_teacher_state(strategy: FSDPStrategy) -> dict[str, torch.Tensor]:
    """The teacher's whole ``state_dict`` on every process, gathered when it is sharded (a collective).

    For checks and tests: the teacher must be bit-identical before and after training.
    """
    model = strategy.model
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    return {k[len("teacher.") :]: v for k, v in state.items() if k.startswith("teacher.")}
