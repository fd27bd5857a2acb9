"""``pysparse plan module:callable --example-shape 16,1024 ...``: plan a model from the command
line, print the table, optionally save it as JSON and measure the planned model.

The callable returns the model (an nn.Module, put in eval mode here). --eval names a second
callable, model -> float (higher is better), for the accuracy trials; without it only the
formats given by --formats are considered, by speed alone.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, Optional, Sequence

import torch


def _load(spec: str, what: str) -> Callable[..., Any]:
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise SystemExit(f"pysparse plan: {what} must be 'module:callable', got {spec!r}")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # a module in the current directory, as `python -m` finds it
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise SystemExit(f"pysparse plan: cannot import {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"pysparse plan: {mod_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SystemExit(f"pysparse plan: {spec!r} is not callable")
    return obj


def _shape(s: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in s.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--example-shape must be integers like 16,1024, got {s!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"--example-shape must be positive integers like 16,1024, got {s!r}")
    return dims


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pysparse plan", description="Measure each layer of a model in each format "
                                "on this machine and choose per layer under an accuracy budget.")
    p.add_argument("model", help="module:callable returning the nn.Module")
    p.add_argument("--example-shape", type=_shape, required=True, action="append",
                   help="shape of one input tensor (random normal), e.g. 16,1024; repeat for several inputs")
    p.add_argument("--eval", dest="eval_fn", help="module:callable, model -> float (higher is better)")
    p.add_argument("--budget", type=float, default=0.01, help="metric loss allowed (eval's units; default 0.01)")
    p.add_argument("--formats", nargs="+", help="formats to consider (dense, int8, bsr, bsr:0.25, bsr-int8, ...)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1],
                   help="densities of the block-sparse formats (default 0.5 0.25 0.1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the timings")
    p.add_argument("--json", help="save the plan here")
    p.add_argument("--measure", action="store_true", help="apply the plan and time it against the dense model")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``pysparse plan`` with ``argv`` (default sys.argv[1:]); returns the exit status."""
    from ._planner import plan

    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args.model, "model")()
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"pysparse plan: {args.model} returned {type(model).__name__}, not an nn.Module")
    model.eval()
    eval_fn = _load(args.eval_fn, "--eval") if args.eval_fn else None
    inputs = tuple(torch.randn(*s) for s in args.example_shape)
    example = inputs[0] if len(inputs) == 1 else inputs
    try:
        p = plan(model, example, eval_fn=eval_fn, budget=args.budget, formats=args.formats,
                 densities=tuple(args.densities), progress=not args.no_progress)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"pysparse plan: {e}", file=sys.stderr)
        return 2
    print(p)
    if args.json:
        p.to_json(args.json)
        print(f"saved {args.json}")
    if args.measure:
        r = p.measure()
        line = f"measured speedup {r['measured_speedup']:.3f}x (predicted {r['predicted_speedup']:.3f}x)"
        if r["metric_before"] is not None:
            line += f"; metric {r['metric_before']:.4f} -> {r['metric_after']:.4f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
