"""``lightningkd`` command line: LightningCLI subcommands plus ``layers`` and ``export``.

Lightning installs no ``lightning fit`` command, so lightningkd ships its own entry point. The recipes are
plain LightningCLI configs: any LightningCLI built on ``DistillationModule`` runs them too.

    lightningkd fit --config recipes/classification/kd/shufflenet_v2_x0_5_from_resnet18_synthetic.yaml
    lightningkd fit --config recipe.yaml --config recipes/trainer/gpu_bf16.yaml
    lightningkd layers --model resnet18 --num_classes 10 --small_input --input_size 3 32 32
    lightningkd layers --model deit_tiny_distilled_patch16_224 --small_input --input_size 3 32 32
    lightningkd layers --model retinanet_resnet18_fpn --num_classes 20 --input_size 3 512 512
    lightningkd layers --config recipe.yaml
    lightningkd export path/to/last.ckpt student.pt
    lightningkd cache --config recipe.yaml --output runs/teacher_cache --data.init_args.replays 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402
import yaml  # noqa: E402
from jsonargparse import ArgumentError, ArgumentParser  # noqa: E402
from lightning.pytorch import LightningDataModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from torchvision.models.detection.transform import GeneralizedRCNNTransform  # noqa: E402

from lightningkd.callbacks import InterruptCheckpoint, NoOverwrite  # noqa: E402
from lightningkd.checkpoint_io import check_checkpoint_file, load_checkpoint_file  # noqa: E402
from lightningkd.export import export_onnx, export_student  # noqa: E402
from lightningkd.models import (  # noqa: E402
    MMSegSegmenter,
    TorchvisionSegmenter,
    classifier,
    detector,
    detector_names,
    fpn_levels,
)
from lightningkd.models.weights import (  # noqa: E402
    STUDENT_PREFIX,
    extract_state_dict,
    load_state_dict_checked,
)
from lightningkd.modules.base import DistillationModule  # noqa: E402
from lightningkd.taps import ITEM_SEPARATOR, OUTPUT, describe_layers  # noqa: E402
from lightningkd.teacher_cache import write_teacher_cache  # noqa: E402


class DistillationCLI(LightningCLI):
    """LightningCLI for the recipes, with the fault handling every lightningkd run gets.

    Every run has :class:`~lightningkd.callbacks.InterruptCheckpoint` (SIGTERM/SIGINT write a resumable
    checkpoint and exit non-zero) and :class:`~lightningkd.callbacks.NoOverwrite` (a run does not replace
    an earlier run's checkpoints unless ``--overwrite true``).
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="let this run replace checkpoint files of an earlier run (fixed ModelCheckpoint names)",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path here, before anything else: name a truncated or wrong file first
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and str(ckpt_path) not in ("last", "best", "hpc") and "://" not in str(ckpt_path):
            check_checkpoint_file(ckpt_path)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config[self.subcommand] if self.subcommand else self.config
        for callback in trainer.callbacks:
            if isinstance(callback, NoOverwrite):
                callback.overwrite = bool(config.get("overwrite", False))
        return trainer


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the LightningCLI that runs the recipes (``args=None`` reads ``sys.argv``)."""
    return DistillationCLI(
        DistillationModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the modules take optimizer/lr_scheduler callables
        save_config_kwargs={"overwrite": True},  # the config file of a run's own (versioned) log folder
        trainer_defaults={"callbacks": [InterruptCheckpoint(), NoOverwrite()]},  # always present
        parser_kwargs={"exit_on_error": False},  # errors reach main(), which prints them without the usage
        args=None if args is None else list(args),
        run=run,
    )


def _layers(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightningkd layers", description="List the tappable layer names of a model (and output shapes)."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        help="torchvision or timm classifier (resnet18), torchvision segmentation model (deeplabv3_resnet50) "
        "or detector (retinanet_resnet18_fpn; lightningkd.models.detector_names())",
    )
    source.add_argument("--mmseg", help="mmsegmentation config name or file, e.g. pspnet/pspnet_r18-d8_...")
    source.add_argument(
        "--config", action="append", help="a recipe: lists the student's and teacher's layers"
    )
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help=f"classes of the head (default {_DEFAULT_CLASSES}; detectors: foreground classes, default "
        f"{_DEFAULT_DETECTOR_CLASSES})",
    )
    parser.add_argument(
        "--small_input",
        action="store_true",
        help="build for 32x32 images: CIFAR stem for CNNs (3x3 stride-1 conv, no max-pool); timm ViT/DeiT "
        "with 4-pixel patches, Swin with 2-pixel patches and 4x4 windows, ConvNeXt with a stride-1 stem",
    )
    parser.add_argument(
        "--model_kwargs",
        type=_json_dict,
        default=None,
        metavar="JSON",
        help="timm classifiers: keyword arguments for timm.create_model, e.g. '{\"depth\": 6}'",
    )
    parser.add_argument(
        "--input_size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="print output shapes (detectors run on one C x H x W image, without their own resize)",
    )
    ns = parser.parse_args(list(argv))
    example = torch.zeros(1, *ns.input_size) if ns.input_size else None
    if ns.model or ns.mmseg:
        is_detector = ns.model in detector_names()
        is_classifier = not (ns.mmseg or is_detector) and ns.model not in torchvision.models.list_models(
            module=torchvision.models.segmentation
        )
        if ns.model_kwargs is not None and not is_classifier:
            raise ValueError("--model_kwargs applies to timm classifiers (--model NAME) only.")
        if ns.num_classes is None:
            ns.num_classes = _DEFAULT_DETECTOR_CLASSES if is_detector else _DEFAULT_CLASSES
        if ns.mmseg:
            model = MMSegSegmenter(ns.mmseg, num_classes=ns.num_classes)
        elif is_detector:
            model = detector(ns.model, num_classes=ns.num_classes)
        elif ns.model in torchvision.models.list_models(module=torchvision.models.segmentation):
            model = TorchvisionSegmenter(ns.model, num_classes=ns.num_classes)
        else:
            model = classifier(
                ns.model, num_classes=ns.num_classes, small_input=ns.small_input, model_kwargs=ns.model_kwargs
            )
        print(_describe(model.eval(), example, ns.model or ns.mmseg))
        return
    if ns.model_kwargs is not None:
        raise ValueError(
            "--model_kwargs applies to --model; a recipe gives model_kwargs in its model section."
        )
    module = _model_from_configs(ns.config)
    for who in ("student", "teacher"):
        model = getattr(module, who)
        if model is not None:
            print(f"== {who}: {type(model).__name__}")
            print(_describe(model, example, who))


_DEFAULT_CLASSES = 1000
_DEFAULT_DETECTOR_CLASSES = 3


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 6}}', got {text!r}")
    return value


def _token_lines(model: torch.nn.Module) -> str:
    """Lines on the token layout of a timm transformer: its prefix-token count, NHWC stage outputs.

    The token -> map adapters take the count as a named argument (``TokensToMap(prefix_tokens=...)``) and
    the layout as ``layout="nhwc"``; nothing guesses them, so the listing states them. ``""`` for others.
    """
    lines = []
    prefix = getattr(model, "num_prefix_tokens", None)
    if isinstance(prefix, int) and not isinstance(prefix, bool):
        kinds = []
        if getattr(model, "cls_token", None) is not None:
            kinds.append("class token")
        if getattr(model, "dist_token", None) is not None:
            kinds.append("distillation token")
        registers = getattr(model, "num_reg_tokens", 0)
        if isinstance(registers, int) and registers > 0:
            kinds.append(f"{registers} register token{'s' if registers > 1 else ''}")
        kinds_text = f" ({', '.join(kinds)})" if kinds else ""
        lines.append(
            f"prefix tokens: {prefix}{kinds_text}: token outputs (N, L, C) start with them; "
            f"TokensToMap(prefix_tokens={prefix}) drops them"
        )
    if getattr(model, "output_fmt", None) == "NHWC":
        lines.append(
            "stage outputs are NHWC (N, H, W, C): TokensToMap(layout='nhwc') turns them into (N, C, H, W) maps"
        )
    return "".join(f"\n{line}" for line in lines)


def _describe(model: torch.nn.Module, example: torch.Tensor | None, name: str) -> str:
    """``describe_layers`` with an input-size error that names the expected channels.

    A torchvision detector runs on ``[example[0]]`` (its forward takes a list of images) with its own
    resize switched off, so the shapes are those of an image of the given size (as the distillation module
    feeds it); the FPN levels' tap names close the table.
    """
    if example is None:
        return describe_layers(model) + _fpn_line(model) + _token_lines(model)
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is not None and first.in_channels != example.shape[1]:
        raise ValueError(
            f"--input_size gives {example.shape[1]} channel(s), but the first convolution of {name} expects "
            f"{first.in_channels}: use --input_size {first.in_channels} {example.shape[2]} {example.shape[3]}."
        )
    try:
        with _as_given(model, example) as model_input:
            return describe_layers(model, model_input) + _fpn_line(model, shapes=True) + _token_lines(model)
    except (RuntimeError, AssertionError, ValueError) as err:  # conv shape errors, timm's size asserts
        raise ValueError(
            f"{name} cannot run on an input of shape {tuple(example.shape)} (--input_size "
            f"{' '.join(map(str, example.shape[1:]))}): {str(err).rstrip('.')}. Give the C H W the model was built for."
        ) from None


@contextlib.contextmanager
def _as_given(model: torch.nn.Module, example: torch.Tensor) -> Iterator[Any]:
    """The input ``model`` takes for ``example``: a detector gets a list of one image, kept at its size."""
    transform = getattr(model, "transform", None)
    if not isinstance(transform, GeneralizedRCNNTransform):
        yield example
        return
    saved = transform.min_size, transform.max_size
    height, width = example.shape[-2:]
    transform.min_size, transform.max_size = (min(height, width),), max(height, width)  # scale 1: no resize
    try:
        yield [example[0]]
    finally:
        transform.min_size, transform.max_size = saved


def _fpn_line(model: torch.nn.Module, shapes: bool = False) -> str:
    """Lines naming the FPN levels of a torchvision detector as taps (``""`` for other models)."""
    try:
        levels = fpn_levels(model)
    except TypeError:
        return ""
    names = ", ".join(f"backbone{ITEM_SEPARATOR}{level}" for level in levels)
    line = f"\nFPN levels (tap one as backbone{ITEM_SEPARATOR}<level>): {names}"
    if shapes:
        line += "\n(modules that run once per level, such as the heads' convolutions, show the last level's shape)"
    return line


def _model_from_configs(paths: Sequence[str]) -> DistillationModule:
    """Build only the ``model:`` section of one or more recipes (later files override earlier ones).

    Weight files are not loaded: they do not change the layer names, and need not exist yet. Without its
    backbone weights a detector trains every backbone layer, so ``trainable_backbone_layers`` goes too.
    """
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            _deep_update(merged, (yaml.safe_load(f) or {}).get("model", {}))
    if not merged:
        raise ValueError(f"No 'model:' section in {list(paths)}.")
    for who in ("student", "teacher", "model"):  # "model": the teacher of a MasKD token recipe
        init = (merged.get("init_args", {}).get(who) or {}).get("init_args", {})
        for key in ("checkpoint", "backbone_checkpoint", "trainable_backbone_layers"):
            if init.get(key) is not None:
                init[key] = None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=DistillationModule)
    return parser.instantiate_classes(parser.parse_object({"model": merged})).model


def _deep_update(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def _export(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightningkd export",
        description="Write the distilled student from a lightningkd checkpoint: its weights (--format pt, "
        "loading with strict=True into the bare student model) or an ONNX file (--format onnx, checked "
        "against PyTorch with onnxruntime). Never writes over the input or over a Lightning checkpoint.",
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of a lightningkd run")
    parser.add_argument("output", help="the file to write (.pt state_dict, or .onnx)")
    parser.add_argument("--format", choices=["pt", "onnx"], default="pt")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="onnx: the run's recipe (repeatable, later files override), which builds the student",
    )
    parser.add_argument(
        "--input_size", type=int, nargs=3, metavar=("C", "H", "W"), help="onnx: the input the model sees"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file (never a Lightning checkpoint)",
    )
    ns = parser.parse_args(list(argv))
    if ns.format == "pt":
        count = export_student(ns.checkpoint, ns.output, overwrite=ns.overwrite)
        print(f"wrote {count} student tensors to {ns.output}")
        return
    if not ns.config or not ns.input_size:
        raise ValueError(
            "--format onnx needs the architecture and an input size: add --config RECIPE.yaml (the recipe "
            "the checkpoint was trained with) and --input_size C H W (e.g. --input_size 3 512 1024)."
        )
    student = _model_from_configs(ns.config).student
    state = extract_state_dict(load_checkpoint_file(ns.checkpoint), prefix=STUDENT_PREFIX)
    load_state_dict_checked(student, state, ns.checkpoint, hint="Check that --config is the run's recipe.")
    example = torch.rand(1, *ns.input_size)
    difference = export_onnx(student, ns.output, example, overwrite=ns.overwrite)
    print(
        f"wrote {ns.output}: onnxruntime matches PyTorch on a {tuple(example.shape)} input "
        f"(largest difference {difference:.2g})"
    )


def _cache(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightningkd cache",
        description="Run a recipe's teacher once over every replayed training input (the datamodule's "
        "replays fixed augmentations of each image) and store its outputs by key; then train with "
        "model.init_args.teacher_cache: FOLDER. Other options (e.g. --data.init_args.replays 8) go to the "
        "recipe as in `lightningkd fit`.",
    )
    parser.add_argument("--config", action="append", required=True, help="the recipe (repeatable)")
    parser.add_argument("--output", required=True, help="the cache folder to create (never overwritten)")
    parser.add_argument(
        "--layers",
        nargs="+",
        default=[OUTPUT],
        help="teacher layers to store (default: output, the logits); feature maps are opt-in and cost "
        "far more disk: the size is printed before writing",
    )
    parser.add_argument("--top_k", type=int, help="keep only the k largest logits (and their log-sum-exp)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--batch_size", type=int, help="teacher batch size (default: the datamodule's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision", choices=["32", "bf16", "16"], default="32", help="autocast dtype of the teacher"
    )
    ns, rest = parser.parse_known_args(list(argv))
    recipe = [arg for path in ns.config for arg in ("--config", path)]
    cli = lightning_cli([*recipe, *rest], run=False)
    module, datamodule = cli.model, cli.datamodule
    needed = module.distilled_teacher_layers()
    missing = [name for name in needed if name not in ns.layers]
    if missing:
        raise ValueError(
            f"The recipe's distillers read the teacher layers {needed}, but only {ns.layers} would be "
            f"stored. Feature maps are opt-in (their size is printed before writing): add --layers "
            f"{' '.join(needed)}."
        )
    precision = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[ns.precision]
    write_teacher_cache(
        module,
        datamodule,
        ns.output,
        layers=ns.layers,
        top_k=ns.top_k,
        dtype=ns.dtype,
        batch_size=ns.batch_size,
        device=ns.device,
        precision=precision,
    )


TRACEBACK_VARIABLE = "LIGHTNINGKD_TRACEBACK"
OVERVIEW = f"""lightningkd: knowledge distillation recipes on PyTorch Lightning.

commands:
  lightningkd fit|validate|test|predict --config RECIPE.yaml [--config FRAGMENT.yaml] [--key value ...]
        run a recipe (LightningCLI; `lightningkd fit --help` lists every option). Every run saves a
        resumable checkpoint on SIGTERM/Ctrl+C and refuses to replace an earlier run's checkpoints
        (--overwrite true allows it).
  lightningkd layers (--model NAME | --mmseg CONFIG | --config RECIPE.yaml) [--input_size C H W]
        list the layer names distillers can tap, with output shapes.
  lightningkd export CHECKPOINT.ckpt STUDENT.pt [--overwrite]
        write the student's weights alone.
  lightningkd export CHECKPOINT.ckpt STUDENT.onnx --format onnx --config RECIPE.yaml --input_size C H W
        write the student as ONNX, checked against PyTorch with onnxruntime.
  lightningkd cache --config RECIPE.yaml --output FOLDER [--top_k K] [--layers output ...]
        run the teacher once over every replayed training input (data.init_args.replays) and store its
        outputs; train with model.init_args.teacher_cache: FOLDER to read them instead of running it.

errors print their root cause; add --traceback (or set {TRACEBACK_VARIABLE}=1) for the full traceback.
"""


def _release_process_group() -> None:
    # Lightning leaves a DDP process group alive after fit; gloo's threads then die at interpreter exit and
    # abort the process ("terminate called without an active exception"), so a finished run exits non-zero.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightningkd`` console script and of ``python -m lightningkd``."""
    args = list(sys.argv[1:] if argv is None else argv)
    full_traceback = "--traceback" in args or os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0")
    args = [a for a in args if a != "--traceback"]
    if not args or args[0] in ("-h", "--help"):
        print(OVERVIEW)
        if not args:
            sys.exit(2)
    try:
        if args[0] == "layers":
            _layers(args[1:])
        elif args[0] == "export":
            _export(args[1:])
        elif args[0] == "cache":
            _cache(args[1:])
        else:
            if argv is None:
                sys.argv = [sys.argv[0], *args]  # without --traceback, which LightningCLI does not know
            lightning_cli(None if argv is None else args)
            _release_process_group()
    except BrokenPipeError:  # `lightningkd layers ... | head` closed the pipe: not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        sys.exit(0)
    except Exception as err:
        if full_traceback:
            raise
        print(explain(err, args[0]), file=sys.stderr)
        sys.exit(1)


def explain(err: BaseException, command: str = "fit") -> str:
    """The root cause of ``err`` in a few lines: its type and message, and where it was raised.

    A recipe that does not parse (a typo, a wrong type) gets jsonargparse's own message, which names the
    key path, without the usage text and the dump of the given value.
    """
    if isinstance(err, ArgumentError):
        kept = [line for line in str(err).splitlines() if not line.strip().startswith("Given value")]
        return "\n".join(
            [f"error: the recipe or the command line does not parse: {kept[0]}", *kept[1:]]
            + [f"(`lightningkd {command} --help` lists the options; add --traceback for the full traceback)"]
        )
    root = err
    seen = {id(root)}
    while True:  # follow "raise ... from" and "during handling of" links to the first exception
        nxt = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        root = nxt
    message = str(root).strip() or repr(root)
    lines = [f"error: {type(root).__name__}: {message}"]
    frames = traceback.extract_tb(root.__traceback__)
    if frames:
        frame = frames[-1]
        lines.append(f"  raised at {frame.filename}:{frame.lineno} in {frame.name}")
    lines.append(f"(full traceback: add --traceback or set {TRACEBACK_VARIABLE}=1)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
