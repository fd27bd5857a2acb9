"""``pysparse compress RECIPE --model MODULE:CALLABLE``: run a recipe file on a model from the command line.

CALLABLE() returns the model, or a dict with "model" and any of "data", "eval_fn",
"example_inputs", "loss_fn" (what ``pysparse.compress`` takes). Without example_inputs from the
callable, ``--example-shape`` gives a random float tensor of that shape.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Optional, Sequence

import torch
from torch import nn


class CliError(Exception):
    """A bad argument: one line on stderr, exit status 2."""


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 1,3,224,224, got {text!r}")
    if not shape or any(v <= 0 for v in shape):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 1,3,224,224, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pysparse compress``."""
    p = argparse.ArgumentParser(prog="pysparse compress", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="a recipe file (.json, .yaml or .yml): a list of steps, or {steps: [...]}")
    p.add_argument("--model", required=True, metavar="MODULE:CALLABLE",
                   help="import MODULE and call CALLABLE() for the model (or a dict with model, data, eval_fn, "
                        "example_inputs, loss_fn)")
    p.add_argument("--example-shape", type=_shape, metavar="1,3,224,224",
                   help="shape of a random example input when the callable gives none")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


def _load(spec: str) -> dict[str, Any]:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise CliError(f"--model must be MODULE:CALLABLE, got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise CliError(f"--model: cannot import {mod_name!r}: {e}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise CliError(f"--model: {mod_name!r} has no callable {attr!r}")
    got = fn()
    if isinstance(got, nn.Module):
        return {"model": got}
    if isinstance(got, dict) and isinstance(got.get("model"), nn.Module):
        unknown = set(got) - {"model", "data", "eval_fn", "example_inputs", "loss_fn"}
        if unknown:
            raise CliError(f"--model: {spec}() returned unknown keys {sorted(unknown)}")
        return got
    raise CliError(f"--model: {spec}() must return an nn.Module or a dict with 'model', got {type(got).__name__}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``pysparse compress`` with ``argv``; returns the exit status (2: a bad argument)."""
    from .run import compress

    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    try:
        if args.threads is not None:
            if args.threads <= 0:
                raise CliError(f"--threads must be a positive int, got {args.threads}")
            torch.set_num_threads(args.threads)
        got = _load(args.model)
        example = got.get("example_inputs")
        if example is None:
            if args.example_shape is None:
                raise CliError("--example-shape is needed: the model's callable gives no example_inputs")
            example = torch.randn(args.example_shape)
        _, report = compress(got["model"], args.recipe, data=got.get("data"), eval_fn=got.get("eval_fn"),
                                 example_inputs=example, loss_fn=got.get("loss_fn"), progress=not args.no_progress)
    except CliError as e:
        print(f"pysparse compress: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print("pysparse compress: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(report.table())
    print()
    print(report.layer_table())
    if args.json:
        report.to_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
