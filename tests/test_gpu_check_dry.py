"""The GPU check's rehearsal (`make gpu-check-dry`): scripts/gpu_check.py --dry runs every
section on CPU tensors (interpreted Triton kernels, tiny shapes, a fake timer), so its
control flow, guards, tables, JSON and summary are tested here, not first on the one GPU
run a task may get. Also: an injected failure in one section leaves the others' tables
and JSON; a sticky CUDA error is reported once; the budget stops a run cleanly; the
sm_90a AOT compile of the kernels (where Triton's CUDA backend and ptxas are installed).
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _gc():
    spec = importlib.util.spec_from_file_location("_gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)  # stdlib imports only at the top: cheap
    return mod


def _run(tmp_path, *args, timeout=240):
    env = dict(os.environ)
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself, before triton is imported
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(tmp_path), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return p, report


def test_dry_rehearsal_whole_script(tmp_path):
    p, r = _run(tmp_path)
    out = p.stdout
    assert p.returncode == 0, out[-4000:] + p.stderr[-2000:]
    gc = _gc()
    names = [n for n, _, _ in gc.SECTIONS]
    assert list(r["sections"]) == names  # every section, in order of value
    assert names[:4] == ["int8_correctness", "bsr_correctness", "int8_timing", "bsr_timing"]
    for n in ("int8_correctness", "bsr_correctness"):
        checks = r["sections"][n]["checks"]
        assert checks and all(c["status"] == "ok" or c["status"].startswith("not run") for c in checks), checks
    for n in ("int8_timing", "bsr_timing", "resnet50", "semi24"):
        s = r["sections"][n]
        assert s["status"] == "done" and s["tables"] and s["rows"], (n, s["status"], s["detail"])
        assert all(row["status"] == "ok" for row in s["rows"]), s["rows"]
    # compact conv / int8 conv: run against the op, or "not run: no GPU kernel" until one lands
    for n, module in (("compact_conv", "compact_conv2d"), ("int8_conv", "int8_conv2d")):
        st = r["sections"][n]["status"]
        if (ROOT / "kernels" / f"{module}.py").is_file():
            assert st == "done", (n, st, r["sections"][n]["detail"])
        else:
            assert st == "not run: no GPU kernel"
    # the files that come back from a device: JSON, the whole log, the tables
    log = (tmp_path / "gpu_check.log").read_text()
    assert "## 4. block-sparse timings" in log and "## summary" in log
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| M | density |" in md and "| batch |" in md
    # the summary is printed last, one line per check
    tail = out.strip().splitlines()
    assert tail[-1].startswith("all passed")
    assert any(line.strip().startswith("[ok] int8_mm_triton exact") for line in tail[-60:])
    # the compile count of a full run, and every kernel variant launched here is counted
    est = r["compile_estimate"]
    assert 0 < est["compiles"] <= 130 and est["total_s"] < 480, est
    assert r["launches"]["count"] > 0 and r["launches"]["variants_not_in_estimate"] == []


def test_injected_failure_keeps_other_sections(tmp_path):
    # int8_timing raises at its start; a check of bsr_correctness fails: the sections after
    # still run, print their tables and land in the JSON; the exit status says FAIL.
    p, r = _run(tmp_path, "--only", "int8_timing,resnet50,semi24", "--inject", "int8_timing:raise",
                "--inject", "resnet50:check")
    assert p.returncode == 1
    s = r["sections"]
    assert s["int8_timing"]["status"] == "FAIL" and "injected section failure" in s["int8_timing"]["detail"]
    assert s["resnet50"]["status"] == "done, with failures"
    assert s["semi24"]["status"] == "done" and s["semi24"]["tables"] and s["semi24"]["rows"]
    assert "| M | cuBLAS bf16 ms |" in (tmp_path / "gpu_check.md").read_text()
    assert "FAILURES" in p.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- the run's machinery, in-process
class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_budget_stops_cleanly_and_marks_the_rest(tmp_path):
    gc = _gc()
    clock = _Clock()
    run = gc.Run(tmp_path, budget_s=10, clock=clock)

    def slow(s):
        for i in range(5):
            s.row(f"row {i}", lambda: {"v": 1})
            clock.t += 4  # each row takes 4 s: the third one is past the budget
    gc.run_section(run, "a", "A", slow)
    gc.run_section(run, "b", "B", lambda s: s.check("never", lambda: "ran"))
    a, b = run.sections
    assert a.status == "skipped: budget" and [r["status"] for r in a.rows] == ["ok", "ok", "ok", "skipped: budget"]
    assert b.status == "skipped: budget" and b.checks == []
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["sections"]["b"]["status"] == "skipped: budget"
    assert "skipped: budget" in gc.summary(run)


def test_sticky_cuda_error_reported_once(tmp_path, capsys):
    gc = _gc()
    run = gc.Run(tmp_path, budget_s=100)
    run.inject["a"] = "sticky"
    gc.run_section(run, "a", "A", lambda s: None)
    gc.run_section(run, "b", "B", lambda s: s.check("x", lambda: "ran"))
    assert run.dead and "illegal memory access" in run.dead
    assert run.sections[1].status.startswith("not run: CUDA error")
    assert capsys.readouterr().out.count("!! sticky CUDA error") == 1
    assert run.status() == 1


def test_cell_never_raises_on_missing_values():
    gc = _gc()
    assert gc.cell(None, None) == "n/a" and gc.cell(1.5, None) == "1.5000" and gc.cell(1.0, 2.0) == "1.0000 (2.00x)"
    assert gc.speedup(None, 1.0) is None and gc.speedup(2.0, None) is None and gc.speedup(2.0, 1.0) == 2.0
    assert gc.ratio(None) == "-"
    table = gc.bsr_table([{"label": "M=1 d=0.5", "status": "ok", "M": 1, "density": 0.5, "bf16_ms": None}])
    assert "n/a" in table


# ---------------------------------------------------------------- ahead-of-time compile for sm_90a
def test_aot_compile_sm90a(tmp_path):
    # A few configurations, the new K-major int8 block kernel among them, compiled for sm_90a
    # without a GPU (scripts/aot_compile_check.py compiles them all); and the reason int8
    # blocks need bk >= 32 there: an int8 block kernel with bk = 16 does not compile.
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # no races with other compiles, no stale hits
    code = f"""
import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r})
import aot_compile_check as a
why = a.why_unavailable()
if why:
    print("skipped:", why); sys.exit(0)
jobs = a.jobs(quick=True)
pick = [j for j in jobs if j["kernel"] == "int8_gemm"][:1] + [j for j in jobs if j["kernel"] == "bsr" and j["consts"]["INT8"]][:1]
for j in pick:
    a.compile_one(j)
bad = dict(pick[-1]); bad["consts"] = dict(bad["consts"], BK=16)
try:
    a.compile_one(bad)
    print("bk16 compiled")
except Exception as e:
    print("bk16 fails:", type(e).__name__)
print("compiled", len(pick))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    if p.stdout.startswith("skipped:"):
        pytest.skip(p.stdout.strip())
    assert "compiled 2" in p.stdout and "bk16 fails" in p.stdout, p.stdout
