"""What the evidence protocols share: the command line, and the results file (one JSON line per run)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from typing import Any


def done(out_dir: str, arm: str, seed: int, epochs: int) -> bool:
    """Whether ``results.jsonl`` already holds this run (the runner scripts can then be restarted)."""
    path = os.path.join(out_dir, "results.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return any((r["arm"], r["seed"], r["epochs"]) == (arm, seed, epochs) for r in rows)


def record(out_dir: str, result: dict) -> None:
    """Print ``result`` and append it to ``results.jsonl``."""
    print(json.dumps(result), flush=True)
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")


def protocol_main(
    doc: str,
    arms: Mapping[str, Any],
    run: Callable[[argparse.Namespace, str, int, int], Any],
    *,
    data_dir: str,
    out_dir: str,
    epochs: int,
    teacher_epochs: int,
    token_epochs: int = 10,
    extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse ``teacher | tokens | student --arm A --seed S | list`` and call ``run(args, arm, seed, epochs)``.

    ``tokens`` learns MasKD's receptive tokens on the trained teacher (``run`` gets the arm ``"tokens"``).
    ``extra_arguments`` adds a protocol's own options to the parser.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["teacher", "tokens", "student", "list"])
    parser.add_argument("--data-dir", default=data_dir, help="the data set's folder")
    parser.add_argument("--arm", default="student", help=f"one of {sorted(arms)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=epochs, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=teacher_epochs)
    parser.add_argument("--token-epochs", type=int, default=token_epochs, help="MasKD token learning")
    parser.add_argument("--out-dir", default=out_dir)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="data loader processes")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--limit-batches", type=int, default=None, help="smoke test: batches per epoch")
    if extra_arguments is not None:
        extra_arguments(parser)
    args = parser.parse_args()
    if args.command == "list":
        print("\n".join(sorted(arms)))
        return
    os.makedirs(args.out_dir, exist_ok=True)
    if args.command == "teacher":
        run(args, "teacher", 0, args.teacher_epochs)
    elif args.command == "tokens":
        run(args, "tokens", 0, args.token_epochs)
    elif args.arm not in arms:
        raise SystemExit(f"unknown arm {args.arm!r}; valid: {sorted(arms)}")
    else:
        run(args, args.arm, args.seed, args.epochs)
