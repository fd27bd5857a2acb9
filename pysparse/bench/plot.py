"""The kernel grid as a PNG: one panel per family, speedup against the family's x axis."""
from __future__ import annotations

import os

from .results import reference_of, speedups


def plot_kernels(doc: dict, path: str) -> str:
    """Draw each family of a ``bench kernels`` document into ``path`` (PNG); returns path.

    x_axis "M": speedup of ours over the fastest peer against M (log scale), a line per
    (N, K). x_axis "density": each sparse contender's speedup over dense against density, a
    line per (contender, M), with the ideal 1/density dashed. 1x is the break-even line.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on the benchmark machines
    import matplotlib.pyplot as plt

    fams = [(f, m) for f, m in doc.get("families", {}).items() if any(r["family"] == f for r in doc["results"])]
    fig, axes = plt.subplots(1, max(1, len(fams)), figsize=(6 * max(1, len(fams)), 4.5), squeeze=False)
    for ax, (fam, meta) in zip(axes[0], fams):
        rows = [r for r in doc["results"] if r["family"] == fam]
        cases: dict[tuple, list[dict]] = {}
        for r in rows:
            cases.setdefault((r["M"], r["N"], r["K"], r.get("density", 1.0)), []).append(r)
        lines: dict[str, list[tuple[float, float]]] = {}
        by_density = meta.get("x_axis") == "density"
        refs = {reference_of(meta, n) for n in meta["speedup_for"]}
        for (M, N, K, d), rs in cases.items():
            for name, (v, who) in speedups(meta, rs).items():
                if v is None:
                    continue
                # Name the reference in the legend when the contenders do not share one.
                shown = f"{name} vs {who}" if len(refs) > 1 else name
                label = f"{shown} M={M}" if by_density else f"{shown} N={N} K={K}"
                lines.setdefault(label, []).append((d if by_density else M, v))
        for label, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if by_density:
            ds = sorted({k[3] for k in cases})
            if meta.get("ideal") and ds:
                ax.plot(ds, [1 / d for d in ds], "k--", label="ideal 1/density")
            ax.set_xlabel("density (fraction of blocks kept)")
            ax.set_ylabel(f"speedup over {next(iter(refs))}" if len(refs) == 1 else "speedup over its reference")
            ax.set_yscale("log")
        else:
            ax.set_xscale("log", base=2)
            ms = sorted({k[0] for k in cases})
            ax.set_xticks(ms, [str(m) for m in ms])
            ax.set_xlabel("M (rows of the activation)")
            ax.set_ylabel(f"speedup over {next(iter(refs)) or 'the fastest peer'}" if len(refs) == 1
                          else "speedup over its reference")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(meta["title"], fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    m = doc.get("machine", {})
    fig.suptitle(f"pysparse bench kernels — {m.get('cpu_model', '')}, {doc.get('threads')} threads, "
                 f"{doc.get('date', '')}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
