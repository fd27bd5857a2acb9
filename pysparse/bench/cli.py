"""The ``pysparse`` command line: ``pysparse bench kernels | model | report``.

A bad argument ends the run with one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from .models import BUILTINS, BenchError, parse_shape


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before its error; one line is easier to read in
    # a CI log, and --help still shows the usage.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message} (see --help)")


def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shapes_arg(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        try:
            dims = tuple(int(v) for v in item.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) <= 0:
            raise argparse.ArgumentTypeError(f"expected MxNxK[,MxNxK...] like 8x64x64, got {text!r}")
        out.append(dims)
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a smaller grid and fewer repeats (about a minute)")
    p.add_argument("--json", metavar="PATH", help="write the results, machine and versions as JSON")
    p.add_argument("--csv", metavar="PATH", help="write one CSV row per (shape, contender)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch.set_num_threads(N) for every contender (default: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pysparse`` command."""
    from .kernels import FAMILIES

    top = _Parser(prog="pysparse", description="pysparse tools")
    sub = top.add_subparsers(dest="command", required=True, metavar="{bench,compress,plan}")
    # compress and plan have their own parsers (pysparse/__main__.py routes to them); listed here for --help
    sub.add_parser("compress", help="run a compression recipe on a model: pysparse compress --help", add_help=False)
    sub.add_parser("plan", help="measure a per-layer format plan for a model: pysparse plan --help", add_help=False)
    bench = sub.add_parser("bench", help="benchmark pysparse against its peers")
    bsub = bench.add_subparsers(dest="what", required=True, metavar="{kernels,model,compact,report}")

    k = bsub.add_parser(
        "kernels", help="the int8 / sparse linear grids, side by side with the peers",
        description="Time pysparse's int8 linear (each CPU ISA path) against fp32 / bf16 F.linear, "
                    "quantize_dynamic, torchao and torch._int_mm at K=N=4096 and 4096->11008, M in 1, 16, 128, "
                    "512; and block-sparse linear against dense and torch BSR / CSR at densities 0.1, 0.25, 0.5. "
                    "Contenders are interleaved; medians and IQR of single calls; at M <= 16 weights are "
                    "rotated past the L3. With CUDA present the GPU grid runs instead (triton do_bench).")
    _common(k)
    k.add_argument("--plot", metavar="PATH.png", help="write speedup plots (PNG)")
    k.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when CUDA is present, else the CPU")
    k.add_argument("--family", action="append", choices=sorted(FAMILIES), metavar="NAME",
                   help=f"run only this kernel family (repeatable): {', '.join(FAMILIES)}")
    k.add_argument("--shapes", type=_shapes_arg, help=argparse.SUPPRESS)  # tests: tiny MxNxK grids

    m = bsub.add_parser(
        "model", help="a whole model, fp32 vs int8, and a per-layer profile",
        description="Time a model (on the CPU) in fp32, bf16, quantize_dynamic, torchao and after "
                    "pysparse.quantize_int8, each on a copy; then each nn.Linear alone in fp32 and as Int8Linear, "
                    "with the whole-model speedup that compressing it predicts. Convolutions are not converted yet.")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--builtin", choices=sorted(BUILTINS), help="a built-in model")
    src.add_argument("--model", metavar="MODULE:FACTORY", help="import MODULE and call FACTORY() for the model")
    m.add_argument("--input-shape", type=_shape_arg, metavar="8,512",
                   help="input tensor shape (built-ins have defaults; their widths follow it)")
    _common(m)

    from .cnn_bench import main_args

    c = bsub.add_parser(
        "compact", help="a filter-pruned CNN: pysparse's compacted model against Torch-Pruning and ONNX Runtime",
        description="Prune 50%% of the channels of every prunable layer of a ResNet-50-shaped network (random "
                    "weights), compact it with pysparse, and time it against the unpruned model (as is, and with "
                    "BatchNorm folded + channels_last), Torch-Pruning on the same ratio, pysparse int8 and ONNX "
                    "Runtime static int8, interleaved, at batch 1 and 8.")
    main_args(c)
    _common(c)

    r = bsub.add_parser("report", help="regenerate BENCHMARKS.md from results JSON files")
    r.add_argument("--json", action="append", required=True, metavar="PATH", help="a results file (repeatable)")
    r.add_argument("--out", required=True, metavar="PATH", help="the markdown file to write")
    r.add_argument("--notes", metavar="PATH", help="a markdown file to put first (targets vs results, GPU runs)")
    return top


def _setup(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _print_tables(doc: dict) -> None:
    from .results import render_text, tables_for

    m = doc["machine"]
    cpu = m["pysparse_cpu"]
    bw = doc.get("bandwidth")
    head = f"{m['cpu_model']}; {doc['threads']} threads; pysparse CPU path {cpu['selected_isa']}"
    if bw:
        head += f"; memory {bw['read_GBps']:.1f} GB/s read"
    print(head)
    from .peak import summary

    peaks = summary(doc.get("peaks"))
    if peaks:
        print(f"register-only peak: {peaks}")
    for t in tables_for(doc):
        print()
        print(render_text(t))
    if doc.get("kind") not in ("model", "cnn"):  # their notes are in their tables
        for n in doc.get("notes", []):
            print(f"note: {n}")
    seen = set()
    for s in doc.get("skipped", []):
        text = f"skipped {s.get('contender', s.get('family'))}: {s['reason']}"
        if text not in seen:
            seen.add(text)
            print(text)
    sys.stdout.flush()  # the table before the "wrote ..." lines on stderr


def _write_outputs(doc: dict, args: argparse.Namespace) -> None:
    from .results import write_csv, write_json

    if args.csv:
        write_csv(doc["results"], args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.json:
        write_json(doc, args.json)
        print(f"wrote {args.json}", file=sys.stderr)


def _kernels(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import os

    from .kernels import KernelRun, run_kernels
    from .plot import plot_kernels
    from .timing import TimingConfig

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("pysparse bench kernels: CUDA is not available here; the GPU grid is skipped", file=sys.stderr)
        return 0
    if args.plot and not args.plot.lower().endswith(".png"):
        raise BenchError(f"--plot writes a PNG: give a path ending in .png, got {args.plot!r}")
    run = KernelRun(quick=args.quick, families=tuple(args.family or ()), shapes=args.shapes, device=device,
                    timing=TimingConfig.quick() if args.quick else TimingConfig.full(),
                    # a tiny --shapes grid (tests) needs no 1 GiB bandwidth pass, nor 30 ms peak loops
                    bandwidth_bytes=(64 << 20) if args.shapes else (1 << 30),
                    peak_ms=5.0 if args.shapes else 30.0, progress=not args.no_progress)
    doc = run_kernels(run, argv)
    if args.plot:
        doc["plot"] = os.path.abspath(plot_kernels(doc, args.plot))
        print(f"wrote {args.plot}", file=sys.stderr)
    _print_tables(doc)
    _write_outputs(doc, args)
    return 0


def _model(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .model_bench import ModelRun, run_model
    from .models import build_builtin, load_model
    from .timing import TimingConfig

    if args.builtin:
        model, shape = build_builtin(args.builtin, args.input_shape)
        name = args.builtin
    else:
        if not args.input_shape:
            raise BenchError("--model needs --input-shape (e.g. --input-shape 8,512)")
        model, shape, name = load_model(args.model), args.input_shape, args.model
    run = ModelRun(name=name, model=model, input_shape=shape,
                   timing=TimingConfig.quick() if args.quick else TimingConfig.full(), progress=not args.no_progress)
    doc = run_model(run, argv)
    _print_tables(doc)
    _write_outputs(doc, args)
    return 0


def _compact(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .cnn_bench import from_args, run_cnn

    if args.builtin not in BUILTINS:
        raise BenchError(f"--builtin must be one of {sorted(BUILTINS)}, got {args.builtin!r}")
    doc = run_cnn(from_args(args), argv)
    _print_tables(doc)
    _write_outputs(doc, args)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    try:
        write_report(args.json, args.out, args.notes)
    except (OSError, ValueError) as e:  # a missing or foreign JSON file is a bad argument
        raise BenchError(str(e)) from None
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``pysparse`` command with ``argv`` (default: sys.argv[1:]); returns the exit
    status: 0 on success, 2 for a bad argument (one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        _setup(args)
        if args.what == "kernels":
            return _kernels(args, argv)
        if args.what == "model":
            return _model(args, argv)
        if args.what == "compact":
            return _compact(args, argv)
        return _report(args)
    except _UsageError as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        return 2
    except BenchError as e:
        print("pysparse bench: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
