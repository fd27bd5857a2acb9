"""Results documents (the dicts run_kernels / run_model return) as tables, JSON and CSV.

Tables are built from the document alone (rows plus the family metadata recorded in it), so
``pysparse bench report`` renders a JSON written months ago the same way the run printed it.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional


@dataclass
class Table:
    """A titled table of strings, rendered as aligned text or as markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def fmt_ms(v: Optional[float]) -> str:
    """A time in ms with about three significant digits ("-" for none)."""
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_x(v: Optional[float]) -> str:
    """A ratio as "1.23x" ("-" for none)."""
    return "-" if v is None or v != v else f"{v:.2f}x"


def fmt_pct(v: Optional[float]) -> str:
    """A fraction as a percentage with two or three significant digits ("-" for none)."""
    if v is None or v != v:
        return "-"
    p = 100 * v
    return f"{p:.0f}%" if p >= 10 else f"{p:.1f}%" if p >= 0.1 else f"{p:.2f}%"


def _peak_columns(names: list[str], rows: list[dict]) -> dict[str, list[str]]:
    """The contenders whose rows carry a fraction of peak (results written before the peaks
    were measured have none), each with the peak instructions its rows used, in order."""
    out: dict[str, list[str]] = {}
    for n in names:
        instrs = [r["peak_instruction"] for r in rows if r["contender"] == n and r.get("of_peak") is not None]
        if instrs:
            out[n] = list(dict.fromkeys(instrs))
    return out


def _case_key(r: dict) -> tuple:
    return (r["M"], r["N"], r["K"], r.get("density", 1.0))


def reference_of(meta: dict, name: str) -> Optional[str]:
    """The contender ``name`` is compared with: its own entry in meta["references"], else
    meta["reference"]; None means the fastest peer."""
    return (meta.get("references") or {}).get(name) or meta.get("reference")


def speedups(meta: dict, rows: list[dict]) -> dict[str, tuple[Optional[float], Optional[str]]]:
    """For one case's rows: each of meta["speedup_for"] -> (speedup, over whom), against its
    reference (reference_of) or, when it has none, the fastest row with role "peer"."""
    by = {r["contender"]: r for r in rows}
    peers = [r for r in rows if r["role"] == "peer"]
    fastest = min(peers, key=lambda r: r["median_ms"]) if peers else None
    out: dict[str, tuple[Optional[float], Optional[str]]] = {}
    for name in meta["speedup_for"]:
        r = by.get(name)
        if r is None:
            continue
        refname = reference_of(meta, name)
        ref = by.get(refname) if refname else fastest
        out[name] = (ref["median_ms"] / r["median_ms"], ref["contender"]) if ref else (None, None)
    return out


def kernel_tables(doc: dict) -> list[Table]:
    """One table per kernel family: a row per case, each contender's median ms, the
    bandwidth bound where the family asks for it, and the speedups."""
    tables = []
    bw = (doc.get("bandwidth") or {}).get("read_GBps")
    peaks = (doc.get("peaks") or {}).get("instructions") or {}
    for fam, meta in doc.get("families", {}).items():
        rows = [r for r in doc["results"] if r["family"] == fam]
        if not rows:
            continue
        names = [n for n in meta["contenders"] if any(r["contender"] == n for r in rows)]
        cases: dict[tuple, list[dict]] = {}
        for r in rows:
            cases.setdefault(_case_key(r), []).append(r)
        sparse = meta.get("x_axis") == "density"
        of_peak = _peak_columns(names, rows)
        headers = ["M", "N", "K"] + (["density"] if sparse else [])
        for n in names:
            headers += [n] + ([f"{n} of peak"] if n in of_peak else [])
        if meta.get("bandwidth_column") and bw:
            headers.append("int8 W @ BW")
        sp_names = [n for n in meta["speedup_for"] if n in names]
        headers += [f"{n} vs {reference_of(meta, n) or 'best peer'}" for n in sp_names]
        if meta.get("ideal"):
            headers.append("ideal")
        body = []
        for (M, N, K, d), rs in cases.items():
            by = {r["contender"]: r for r in rs}
            line = [str(M), str(N), str(K)] + ([f"{d:g}"] if sparse else [])
            for n in names:
                r = by.get(n)
                flag = "!" if r is not None and r.get("check_ok") is False else ""
                line.append(fmt_ms(r["median_ms"]) + flag if r else "-")
                if n in of_peak:
                    v = r.get("of_peak") if r else None
                    mixed = len(of_peak[n]) > 1 and v is not None  # e.g. AMX at large M, VNNI at small
                    line.append(fmt_pct(v) + (f" {r['peak_instruction']}" if mixed else ""))
            if meta.get("bandwidth_column") and bw:
                line.append(fmt_ms(N * K / (bw * 1e6)))
            sp = speedups(meta, rs)
            for n in sp_names:
                v, who = sp.get(n, (None, None))
                line.append(fmt_x(v) + (f" ({who})" if who and not reference_of(meta, n) else ""))
            if meta.get("ideal"):
                line.append(fmt_x(1.0 / d))
            body.append(line)
        notes = ["median ms of single calls; \"!\" marks a result off the float64 reference"]
        if meta.get("bandwidth_column") and bw:
            notes.append(f"int8 W @ BW: the int8 weight bytes (N x K) at the measured {bw:.1f} GB/s read bandwidth,"
                         " the floor for small M")
        if of_peak:
            used = "; ".join(f"{n}: " + ", ".join(peaks.get(i, {}).get("instruction", i) for i in ins)
                             for n, ins in of_peak.items())
            threads = (doc.get("peaks") or {}).get("threads", doc.get("threads"))
            notes.append(f"of peak: the kernel's MAC rate over the register-only peak of the instruction its path "
                         f"used ({used}), measured on {threads} thread(s) at once in this run; MACs: dense "
                         "M x N x K, block-sparse M x stored blocks x block size (only the stored blocks' MACs)")
        if any(not reference_of(meta, n) for n in sp_names):
            notes.append("speedup: the fastest peer's median over ours (torch._int_mm is a bare GEMM bound, "
                         "not a peer)")
        tables.append(Table(f"{fam}: {meta['title']}", headers, body, notes))
    return tables


def render_text(t: Table) -> str:
    """The table as aligned plain text with its title and notes."""
    widths = [max(len(h), *(len(r[i]) for r in t.rows)) if t.rows else len(h) for i, h in enumerate(t.headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [t.title, line(t.headers), line(["-" * w for w in widths])] + [line(r) for r in t.rows]
    return "\n".join(out + [f"  {n}" for n in t.notes])


def render_markdown(t: Table, level: int = 3) -> str:
    """The table as a GitHub markdown table under a heading, notes as a list below it."""
    out = [f"{'#' * level} {t.title}", "", "| " + " | ".join(t.headers) + " |",
           "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(t.headers))) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in t.rows]
    if t.notes:
        out += [""] + [f"- {n}" for n in t.notes]
    return "\n".join(out)


def write_json(doc: dict, path: str) -> None:
    """Write the results document as indented JSON (parent directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")


def write_csv(rows: Iterable[dict[str, Any]], path: str) -> None:
    """Write one CSV row per result dict (the union of their keys as the header)."""
    rows = list(rows)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def load_json(path: str) -> dict:
    """Read a results document; ValueError with the path if it is not one."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("schema") != "pysparse-bench/1":
        raise ValueError(f"{path}: not a pysparse bench results file (no schema 'pysparse-bench/1')")
    return doc


MAX_LAYER_ROWS = 30  # a big model's profile table shows its 30 costliest layers (the JSON has all)


def model_tables(doc: dict) -> list[Table]:
    """The whole-model table (each contender's median, spread, speedup over fp32, error) and
    the per-layer profile of a ``bench model`` document."""
    m = doc["model"]
    shape = ",".join(map(str, m["input_shape"]))
    rows = [r for r in doc["results"] if r.get("scope") == "model"]
    fp32 = next((r["median_ms"] for r in rows if r["contender"] == "fp32"), None)
    body = [[r["contender"], fmt_ms(r["median_ms"]), fmt_ms(r["iqr_ms"]),
             fmt_x(fp32 / r["median_ms"]) if fp32 else "-",
             "-" if r.get("rel_err_vs_fp32") is None else f"{r['rel_err_vs_fp32']:.1e}"] for r in rows]
    whole = Table(f"model {m['name']}, input {shape}: {m['params'] / 1e6:.2f} M parameters, "
                  f"{m['linear_layers']} Linear and {m['conv_layers']} conv layers",
                  ["contender", "median ms", "IQR ms", "vs fp32", "rel. error vs fp32"], body,
                  list(doc.get("notes", [])))
    tables = [whole]
    layers = doc.get("layers", [])
    if layers:
        shown = layers
        if len(layers) > MAX_LAYER_ROWS:
            keep = {id(x) for x in sorted(layers, key=lambda x: -x["share"])[:MAX_LAYER_ROWS]}
            shown = [x for x in layers if id(x) in keep]
        lbody = [[x["layer"], str(x["M"]), str(x["N"]), str(x["K"]), str(x["calls"]), fmt_ms(x["fp32_ms"]),
                  fmt_ms(x["int8_ms"]), fmt_x(x["speedup"]), f"{x['share']:.1%}", fmt_x(x["predicted_model_speedup"])]
                 for x in shown]
        p = doc.get("prediction", {})
        notes = [f"every Linear as Int8Linear: predicted {fmt_x(p.get('all_linear_predicted'))} for the whole "
                 f"model, measured {fmt_x(p.get('measured'))} (pysparse-int8 vs fp32 above)",
                 "share: the layer's fp32 time over the fp32 model's; model speedup: predicted for "
                 "compressing this layer alone (Amdahl)"]
        if len(shown) < len(layers):
            notes.append(f"showing the {len(shown)} costliest of {len(layers)} Linear layers; the JSON has all")
        tables.append(Table("per-layer profile (nn.Linear, each alone: fp32 F.linear vs Int8Linear)",
                            ["layer", "M", "N", "K", "calls", "fp32 ms", "int8 ms", "speedup", "share",
                             "model speedup"], lbody, notes))
    return tables


def cnn_tables(doc: dict) -> list[Table]:
    """One table per batch of a ``bench compact`` document: each contender's median, speedup over
    the dense model given the same inference treatment, MACs and the fraction of the MAC reduction."""
    m = doc["model"]
    tables = []
    for B in sorted({r["batch"] for r in doc["results"]}):
        rows = [r for r in doc["results"] if r["batch"] == B]
        body = [[r["contender"], fmt_ms(r["median_ms"]), fmt_ms(r["iqr_ms"]), fmt_x(r["speedup_vs_dense_folded"]),
                 "-" if r["macs"] is None else f"{r['macs'] / 1e9:.2f}", fmt_x(r["mac_reduction"]),
                 "-" if r["fraction_of_mac_reduction"] is None else f"{r['fraction_of_mac_reduction']:.2f}",
                 "-" if r.get("fraction_of_mac_reduction_like_for_like") is None
                 else f"{r['fraction_of_mac_reduction_like_for_like']:.2f}",
                 "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"] for r in rows]
        shape = ",".join(map(str, m["input_shape"]))
        tables.append(Table(f"{m['name']} ({shape}), {m['amount']:.0%} of channels pruned, batch {B}",
                            ["contender", "median ms", "IQR ms", "vs dense-folded", "GMACs", "MAC reduction",
                             "of MAC reduction", "like for like", "rel. error"], body, list(doc.get("notes", [])) if B == 1 else []))
    return tables


def tables_for(doc: dict) -> list[Table]:
    """The tables of any results document, by its kind."""
    kind = doc.get("kind")
    return model_tables(doc) if kind == "model" else cnn_tables(doc) if kind == "cnn" else kernel_tables(doc)
