"""``lightningkd`` command line: LightningCLI subcommands plus ``layers`` and ``export``.

Lightning installs no ``lightning fit`` command, so lightningkd ships its own entry point. The recipes are
plain LightningCLI configs: any LightningCLI built on ``DistillationModule`` runs them too.

    lightningkd fit --config recipes/classification/kd/resnet18_from_resnet34_synthetic.yaml
    lightningkd fit --config recipe.yaml --config recipes/trainer/gpu_bf16.yaml
    lightningkd layers --model resnet18 --num_classes 10 --small_input --input_size 3 32 32
    lightningkd layers --config recipe.yaml
    lightningkd export path/to/last.ckpt student.pt
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402
import yaml  # noqa: E402
from jsonargparse import ArgumentParser  # noqa: E402
from lightning.pytorch import LightningDataModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightningkd.export import export_student  # noqa: E402
from lightningkd.models import MMSegSegmenter, TorchvisionSegmenter, classifier  # noqa: E402
from lightningkd.modules.base import DistillationModule  # noqa: E402
from lightningkd.taps import describe_layers  # noqa: E402


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the LightningCLI that runs the recipes (``args=None`` reads ``sys.argv``)."""
    return LightningCLI(
        DistillationModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the modules take optimizer/lr_scheduler callables
        save_config_kwargs={"overwrite": True},  # a second run in the same folder must not fail
        args=None if args is None else list(args),
        run=run,
    )


def _layers(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightningkd layers", description="List the tappable layer names of a model (and output shapes)."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", help="torchvision or timm classifier, or torchvision segmentation model, e.g. resnet18"
    )
    source.add_argument("--mmseg", help="mmsegmentation config name or file, e.g. pspnet/pspnet_r18-d8_...")
    source.add_argument(
        "--config", action="append", help="a recipe: lists the student's and teacher's layers"
    )
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument(
        "--small_input", action="store_true", help="CIFAR stem (3x3 stride-1 conv, no max-pool)"
    )
    parser.add_argument(
        "--input_size", type=int, nargs=3, metavar=("C", "H", "W"), help="print output shapes"
    )
    ns = parser.parse_args(list(argv))
    example = torch.zeros(1, *ns.input_size) if ns.input_size else None
    if ns.model or ns.mmseg:
        if ns.mmseg:
            model = MMSegSegmenter(ns.mmseg, num_classes=ns.num_classes)
        elif ns.model in torchvision.models.list_models(module=torchvision.models.segmentation):
            model = TorchvisionSegmenter(ns.model, num_classes=ns.num_classes)
        else:
            model = classifier(ns.model, num_classes=ns.num_classes, small_input=ns.small_input)
        print(describe_layers(model.eval(), example))
        return
    module = _model_from_configs(ns.config)
    for who in ("student", "teacher"):
        model = getattr(module, who)
        if model is not None:
            print(f"== {who}: {type(model).__name__}")
            print(describe_layers(model, example))


def _model_from_configs(paths: Sequence[str]) -> DistillationModule:
    """Build only the ``model:`` section of one or more recipes (later files override earlier ones).

    Weight files are not loaded: they do not change the layer names, and need not exist yet.
    """
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            _deep_update(merged, (yaml.safe_load(f) or {}).get("model", {}))
    if not merged:
        raise ValueError(f"No 'model:' section in {list(paths)}.")
    for who in ("student", "teacher"):
        init = (merged.get("init_args", {}).get(who) or {}).get("init_args", {})
        for key in ("checkpoint", "backbone_checkpoint"):
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
        description="Write the student's weights from a lightningkd checkpoint; the file loads with "
        "strict=True into the bare student model.",
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of a lightningkd run")
    parser.add_argument("output", help="where to write the student state_dict (.pt)")
    ns = parser.parse_args(list(argv))
    count = export_student(ns.checkpoint, ns.output)
    print(f"wrote {count} student tensors to {ns.output}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightningkd`` console script and of ``python -m lightningkd``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "layers":
        _layers(args[1:])
    elif args and args[0] == "export":
        _export(args[1:])
    else:
        lightning_cli(None if argv is None else args)


if __name__ == "__main__":
    main()
