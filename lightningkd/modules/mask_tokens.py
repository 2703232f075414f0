"""MasKD's first stage: learn receptive tokens on a frozen teacher and write the token file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightningkd.distillers.base import Features
from lightningkd.distillers.maskd import ReceptiveTokens, save_mask_tokens
from lightningkd.functional.maskd import dice_diversity
from lightningkd.modules.base import default_optimizer
from lightningkd.modules.detection import DetectionDistillationModule
from lightningkd.modules.segmentation import SegmentationDistillationModule
from lightningkd.taps import ITEM_SEPARATOR, OUTPUT


class _TokenLearning:
    """What both tasks share: tokens hooked into the frozen model's layers, the Dice term, the file.

    The model is the module's ``student`` so that the task module's data handling, task loss and
    evaluation serve unchanged (its validation scores the *masked* teacher); its weights are frozen and
    its BatchNorm and dropout layers stay in eval mode, only the tokens train.
    """

    student: nn.Module

    def _install_tokens(
        self,
        layers: Sequence[str],
        channels: int,
        num_tokens: int,
        weighted: bool,
        tokens_file: str,
        overwrite: bool,
        dice_weight: float,
    ) -> None:
        if isinstance(layers, str) or not layers:
            raise ValueError(f"layers must be a non-empty list of layer names, got {layers!r}.")
        if dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}.")
        self.tokens_file = str(tokens_file)
        self.overwrite = bool(overwrite)
        self.dice_weight = float(dice_weight)
        self.token_layers = tuple(layers)
        self.tokens = nn.ModuleDict(
            {_key(layer): ReceptiveTokens(channels, num_tokens, weighted) for layer in self.token_layers}
        )
        self.student.requires_grad_(False)
        modules = dict(self.student.named_modules())
        self._masks: list[Tensor] = []
        for layer in self.token_layers:
            module_name, sep, item = layer.partition(ITEM_SEPARATOR)
            module_name = "" if module_name == OUTPUT else module_name
            if module_name not in modules:
                valid = [n for n in modules if n]
                raise ValueError(
                    f"Unknown layer {layer!r} for the teacher {type(self.student).__name__}; valid names: "
                    f"'output' (the model's output), {valid[:40]}{' ...' if len(valid) > 40 else ''}."
                )
            hook = partial(self._mask_output, layer, item if sep else None)
            modules[module_name].register_forward_hook(hook)
        # the teacher's BatchNorm and dropout in eval mode from the start: Lightning does not call
        # train() when fit starts, so the override below alone would let the running statistics move
        self.train(self.training)  # type: ignore[attr-defined]

    def setup(self, stage: str) -> None:
        if stage == "fit" and Path(self.tokens_file).exists() and not self.overwrite:
            # before the first step, not at the end of a long run
            raise FileExistsError(
                f"The token file {self.tokens_file} exists; it is kept. Name another tokens_file, or set "
                "overwrite: true to replace it."
            )
        super().setup(stage)  # type: ignore[misc]

    def _mask_output(self, layer: str, item: str | None, module: nn.Module, inputs: Any, output: Any) -> Any:
        tokens = self.tokens[_key(layer)]
        keep = self.training  # type: ignore[attr-defined]  # evaluation passes keep no masks
        if item is None:
            masked, masks = tokens(output)
            if keep:
                self._masks.append(masks)
            return masked
        if not isinstance(output, Mapping) or item not in output:
            keys = list(output) if isinstance(output, Mapping) else type(output).__name__
            raise KeyError(f"Layer {layer!r}: the module returns {keys}, not the entry {item!r}.")
        masked, masks = tokens(output[item])
        if keep:
            self._masks.append(masks)
        replaced = type(output)(output) if isinstance(output, dict) else dict(output)
        replaced[item] = masked
        return replaced

    def train(self, mode: bool = True) -> Any:
        super().train(mode)  # type: ignore[misc]
        for module in self.student.modules():  # the teacher's statistics never change
            if isinstance(module, (_BatchNorm, nn.Dropout)):
                module.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.tokens.parameters())

    def student_features(self, images: Any, batch: Mapping[str, Any] | None = None) -> Features:
        self._masks = []
        return super().student_features(images, batch)  # type: ignore[misc]

    def task_loss_from_features(self, student: Features, batch: Mapping[str, Any]) -> Tensor:
        task = super().task_loss_from_features(student, batch)  # type: ignore[misc]
        if not self._masks:
            raise RuntimeError(
                f"None of the token layers {list(self.token_layers)} ran in the model's forward."
            )
        dice = sum(dice_diversity(m) for m in self._masks)
        self._masks = []
        if self.log_due():  # type: ignore[attr-defined]
            self.log("train/dice", dice, batch_size=len(batch["image"]))  # type: ignore[attr-defined]
        return task + self.dice_weight * dice

    @rank_zero_only
    def save_tokens(self, path: str | None = None) -> Path:
        """Write the tokens to ``path`` (default ``tokens_file``), keyed by teacher layer name."""
        modules = {layer: self.tokens[_key(layer)] for layer in self.token_layers}
        return save_mask_tokens(path or self.tokens_file, modules, overwrite=self.overwrite)

    def on_train_end(self) -> None:
        written = self.save_tokens()
        if written is not None:
            print(f"MasKD tokens written to {written}")


def _key(layer: str) -> str:
    return layer.replace(".", "_").replace(ITEM_SEPARATOR, "__")


class SegmentationMaskTokens(_TokenLearning, SegmentationDistillationModule):
    """Learn MasKD's receptive tokens on a trained segmentation teacher and write the token file.

    MasKD's mask-learning stage for segmentation (Huang et al., ICLR 2023, arXiv:2205.14589; hunto/MasKD
    ``segmentation/losses/maskd.py``): the teacher's output at each of ``layers`` (its logits by default)
    is replaced by ``sum_t F * sigmoid(K_t . F)`` (not normalised, as the official code: up to T times the
    logits), and the tokens ``K`` are trained with the teacher's pixel cross-entropy on that output plus
    ``dice_weight`` times the Dice diversity of the masks
    (:func:`~lightningkd.functional.maskd.dice_diversity`). The teacher is frozen, BatchNorm in eval
    mode. At the end of ``fit`` the tokens go to ``tokens_file``, read by
    :class:`~lightningkd.distillers.MasKD`. Validation scores the masked teacher (it should stay close to
    the teacher's own score). ``train/task_loss`` holds the task loss plus the weighted Dice term, and
    ``train/dice`` the Dice term alone.

    Args:
        model: the trained teacher (frozen here).
        tokens_file: where to write the tokens; an existing file is kept unless ``overwrite``.
        layers: the teacher layers to learn tokens for (``"output"``: the logits).
        num_tokens: T (8 in the official segmentation setting).
        channels: the channels of those layers; default ``num_classes`` (logits).
        weighted: learn a token-weight head too (the detection setting; off for segmentation).
        dice_weight: the Dice term's coefficient (1 in the official code).
        overwrite: replace an existing ``tokens_file``.
        num_classes: as :class:`~lightningkd.modules.SegmentationDistillationModule`.
        ignore_index: as :class:`~lightningkd.modules.SegmentationDistillationModule`.
        class_names: as :class:`~lightningkd.modules.SegmentationDistillationModule`.
        eval_scale: as :class:`~lightningkd.modules.SegmentationDistillationModule`.
        optimizer: as :class:`~lightningkd.modules.SegmentationDistillationModule`.
        lr_scheduler: as :class:`~lightningkd.modules.SegmentationDistillationModule`.
        lr_scheduler_interval: as :class:`~lightningkd.modules.SegmentationDistillationModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens_file: str,
        layers: Sequence[str] = (OUTPUT,),
        num_tokens: int = 8,
        channels: int | None = None,
        weighted: bool = False,
        dice_weight: float = 1.0,
        overwrite: bool = False,
        num_classes: int = 19,
        ignore_index: int = 255,
        class_names: list[str] | None = None,
        eval_scale: float = 1.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        super().__init__(
            model,
            num_classes=num_classes,
            ignore_index=ignore_index,
            class_names=class_names,
            eval_scale=eval_scale,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            lr_scheduler_interval=lr_scheduler_interval,
        )
        self._install_tokens(
            layers, channels or num_classes, num_tokens, weighted, tokens_file, overwrite, dice_weight
        )


class DetectionMaskTokens(_TokenLearning, DetectionDistillationModule):
    """Learn MasKD's receptive tokens on a trained torchvision detector's FPN levels; write the token file.

    MasKD's mask-learning stage for detection (Huang et al., ICLR 2023, arXiv:2205.14589; hunto/MasKD
    ``mmdetection/maskd.py`` ``MaskModule``): each FPN level ``F`` of the frozen teacher is replaced by
    ``sum_t F * sigmoid(K_t . F) * w_t`` (``w``: the token-weight head's softmax), and the tokens and
    heads are trained with the detector's own losses plus ``dice_weight`` times the Dice diversity of each
    level's masks (summed over levels). The official stage runs 2000 iterations with Adam lr 0.01 and a
    cosine schedule (Faster R-CNN: SGD lr 0.1). The token file is keyed ``"<layer>:<level>"``, the names
    :class:`~lightningkd.distillers.PerLevel` gives each level's :class:`~lightningkd.distillers.MasKD`.
    Validation scores the masked teacher; ``train/dice`` logs the Dice term (also inside
    ``train/task_loss``).

    Args:
        model: the trained teacher detector (frozen here; BatchNorm in eval mode).
        tokens_file: where to write the tokens; an existing file is kept unless ``overwrite``.
        levels: the FPN levels (``lightningkd layers --model <detector>`` lists them).
        layer: the module returning the levels (``"backbone"`` in torchvision detectors).
        num_tokens: T per level (6 in the official configs).
        channels: the FPN width (256).
        weighted: learn the token-weight head (on in the official configs).
        dice_weight: the Dice term's coefficient (1 in the official code).
        overwrite: replace an existing ``tokens_file``.
        num_classes: as :class:`~lightningkd.modules.DetectionDistillationModule`.
        class_names: as :class:`~lightningkd.modules.DetectionDistillationModule`.
        size_divisible: as :class:`~lightningkd.modules.DetectionDistillationModule`.
        optimizer: as :class:`~lightningkd.modules.DetectionDistillationModule`.
        lr_scheduler: as :class:`~lightningkd.modules.DetectionDistillationModule`.
        lr_scheduler_interval: as :class:`~lightningkd.modules.DetectionDistillationModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens_file: str,
        levels: Sequence[str] = ("0", "1", "2", "p6", "p7"),
        layer: str = "backbone",
        num_tokens: int = 6,
        channels: int = 256,
        weighted: bool = True,
        dice_weight: float = 1.0,
        overwrite: bool = False,
        num_classes: int = 80,
        class_names: list[str] | None = None,
        size_divisible: int = 32,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        super().__init__(
            model,
            num_classes=num_classes,
            class_names=class_names,
            size_divisible=size_divisible,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            lr_scheduler_interval=lr_scheduler_interval,
        )
        if isinstance(levels, str) or not levels:
            raise ValueError(f"levels must be a non-empty list of FPN level keys, got {levels!r}.")
        layers = [f"{layer}{ITEM_SEPARATOR}{level}" for level in levels]
        self._install_tokens(layers, channels, num_tokens, weighted, tokens_file, overwrite, dice_weight)
