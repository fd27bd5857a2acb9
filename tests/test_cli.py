"""The ``pysparse`` command line: argument errors, and tiny runs of every subcommand.

Kept fast (well under a minute): kernels run on a hidden tiny --shapes grid, models on tiny
input shapes, everything with --quick and --threads 1 (on a shared 2-core machine a
2-thread call waits whenever another process holds the other core).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pysparse.__main__ import main
from pysparse.bench import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model() -> nn.Module:
    """A user model for ``--model tests.test_cli:make_model``."""
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def not_a_model() -> int:
    return 3


def run(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured; torch's thread count restored after."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv, words", [
    (["bench", "model", "--builtin", "nope"], "invalid choice"),
    (["bench", "model", "--builtin", "mlp", "--input-shape", "8,abc"], "positive integers"),
    (["bench", "model", "--builtin", "mlp", "--input-shape", "0,8"], "positive integers"),
    (["bench", "model", "--builtin", "resnet50", "--input-shape", "8,512"], "BATCH,CHANNELS,H,W"),
    (["bench", "model", "--builtin", "mlp", "--model", "x:y"], "not allowed with"),
    (["bench", "model", "--model", "no_such_module_pysparse:make", "--input-shape", "2,32"], "cannot import"),
    (["bench", "model", "--model", "tests.test_cli:missing", "--input-shape", "2,32"], "no attribute"),
    (["bench", "model", "--model", "tests.test_cli:not_a_model", "--input-shape", "2,32"], "not an nn.Module"),
    (["bench", "model", "--model", "tests.test_cli", "--input-shape", "2,32"], "module:factory"),
    (["bench", "model", "--model", "tests.test_cli:make_model"], "needs --input-shape"),
    (["bench", "model", "--model", "tests.test_cli:make_model", "--input-shape", "2,31"], "forward failed"),
    (["bench", "kernels", "--threads", "0"], "positive integer"),
    (["bench", "kernels", "--shapes", "8x64"], "MxNxK"),
    (["bench", "kernels", "--family", "nope"], "invalid choice"),
    (["bench", "kernels", "--plot", "out.svg"], ".png"),
    (["bench", "report", "--json", "/nonexistent/pysparse.json", "--out", "/tmp/x.md"], "No such file"),
    (["bench"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_argument_is_one_line_and_exit_2(argv, words):
    code, out, err = run(argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert words in lines[0] and "Traceback" not in err


def test_python_dash_m_entry_point():
    # The real process: `python -m pysparse` exits 2 with one line and no traceback.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pysparse", "bench", "model", "--builtin", "nope"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_gpu_mode_skips_cleanly_without_cuda():
    code, out, err = run(["bench", "kernels", "--device", "cuda"])
    assert code == 0 and out == ""
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def kernels_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    paths = {k: str(d / f"k.{k}") for k in ("json", "csv", "png")}
    # --device cpu: this run means the CPU grid (with "auto" a CUDA machine runs the GPU grid,
    # which has no sparse families, and the families assertion below fails there)
    code, out, err = run(["bench", "kernels", "--quick", "--shapes", "8x64x64,32x64x64", "--threads", "1",
                          "--device", "cpu", "--no-progress", "--json", paths["json"], "--csv", paths["csv"],
                          "--plot", paths["png"]])
    assert code == 0, err
    return out, paths


def test_kernels_json_has_every_contender(kernels_run):
    out, paths = kernels_run
    doc = json.load(open(paths["json"]))
    assert doc["kind"] == "kernels" and doc["threads"] == 1
    assert doc["machine"]["cpu_model"] and doc["machine"]["pysparse_cpu"]["best_isa"]
    assert doc["versions"]["torch"] == torch.__version__ and "torchao" in doc["versions"]
    assert doc["command"].startswith("pysparse bench kernels") and doc["date"]
    assert doc["bandwidth"]["read_GBps"] > 0
    assert set(doc["families"]) == set(FAMILIES)
    skipped = {s["contender"] for s in doc["skipped"] if "contender" in s}
    for fam in FAMILIES.values():
        timed = {r["contender"] for r in doc["results"] if r["family"] == fam.name}
        for c in fam.contenders("cpu"):
            assert c.name in timed or c.name in skipped, (fam.name, c.name)
            assert c.name in timed or c.available(), f"{c.name} skipped though available"
    for r in doc["results"]:
        assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["samples"] >= 3
        assert r["check_ok"] is not False, r
    intmm = [r["M"] for r in doc["results"] if r["contender"] == "torch._int_mm"]
    assert intmm == [32]  # M > 16 only
    assert any(r["weight_sets"] > 1 for r in doc["results"] if r["M"] == 8)  # small M rotates weights
    rows = open(paths["csv"]).read().strip().splitlines()
    assert len(rows) == 1 + len(doc["results"])
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert doc["plot"] == os.path.abspath(paths["png"])
    assert "pysparse-" in out and "vs best peer" in out and "ideal" in out


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "m.json")
    code, out, err = run(["bench", "model", "--builtin", "mlp", "--quick", "--input-shape", "2,32", "--threads", "1",
                          "--no-progress", "--json", path])
    assert code == 0, err
    return out, path


def test_model_builtin_prints_table(mlp_run):
    out, path = mlp_run
    for word in ("fp32", "pysparse-int8", "quantize_dynamic", "vs fp32", "per-layer profile", "blocks.0.0"):
        assert word in out
    doc = json.load(open(path))
    assert len(doc["layers"]) == 8  # 4 blocks x (up, down)
    assert all(x["predicted_model_speedup"] > 0 for x in doc["layers"])


def test_model_by_import_path():
    code, out, err = run(["bench", "model", "--model", "tests.test_cli:make_model", "--input-shape", "4,32",
                          "--quick", "--threads", "1", "--no-progress"])
    assert code == 0, err
    assert "tests.test_cli:make_model" in out and "pysparse-int8" in out


def test_conv_model_says_convs_stay_fp32():
    code, out, err = run(["bench", "model", "--builtin", "mobilenetv2", "--input-shape", "1,3,32,32", "--quick",
                          "--threads", "1", "--no-progress"])
    assert code == 0, err
    assert "not converted yet" in out


def test_report_renders_markdown(kernels_run, mlp_run, tmp_path):
    _, kpaths = kernels_run
    _, mpath = mlp_run
    md = tmp_path / "BENCHMARKS.md"
    code, _, err = run(["bench", "report", "--json", kpaths["json"], "--json", mpath, "--out", str(md)])
    assert code == 0, err
    text = md.read_text()
    assert text.startswith("# pysparse benchmarks")
    assert "pysparse bench kernels --quick" in text and "pysparse bench model --builtin mlp" in text
    assert "| M | N | K |" in text and "torch-bsr" in text and "per-layer profile" in text
    assert f"]({os.path.relpath(kpaths['png'], tmp_path)})" in text
