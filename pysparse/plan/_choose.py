"""Per-layer choice under a global accuracy budget: a multiple-choice knapsack.

Each layer takes exactly one of its options (format, time saved, predicted loss); the
predicted losses add up (the additive model a per-layer sensitivity table implies), their sum
must stay within the budget, and the time saved is maximized. Solved exactly on losses
rounded *up* to 1/UNITS of the budget, so the rounded plan never exceeds the real budget.
"""
from __future__ import annotations

import math
from typing import Optional

# 400 units of budget: a layer's loss is over-counted by at most budget/400 (0.0025 points of
# accuracy at budget 0.01), and the table is layers x options x 400 (< 0.5 s for 100 layers).
UNITS = 400


def choose(options: dict[str, list[tuple[str, float, Optional[float]]]], budget: Optional[float]) -> dict[str, str]:
    """{layer: format}. options[layer]: (format, saved_ms, loss) tuples; "dense" (0 saved,
    0 loss) is always allowed. loss None with budget None: no accuracy model (every option
    allowed: the user listed these formats). A negative loss (the metric rose: noise) counts
    as 0, never as credit for another layer. Only options that save time are taken."""
    layers = list(options)
    opts: dict[str, list[tuple[str, float, int]]] = {}
    for n in layers:
        keep = []
        for fmt, saved, loss in options[n]:
            if fmt == "dense" or saved <= 0:
                continue
            if budget is None:
                cost = 0
            else:
                if loss is None or not math.isfinite(loss):
                    continue
                loss = max(loss, 0.0)
                if loss > budget:
                    continue
                cost = 0 if loss == 0 else (math.ceil(loss / budget * UNITS - 1e-9) if budget > 0 else UNITS + 1)
                if cost > UNITS:
                    continue
            keep.append((fmt, saved, cost))
        opts[n] = keep
    cap = 0 if budget is None else UNITS
    NEG = float("-inf")
    best = [0.0] + [NEG] * cap  # best[c]: most time saved at total cost exactly c
    back: list[list[Optional[tuple[int, int]]]] = []  # per layer, per cost: (option index, previous cost)
    for n in layers:
        new = best[:]
        choice: list[Optional[tuple[int, int]]] = [None] * (cap + 1)
        for i, (_, saved, cost) in enumerate(opts[n]):
            for c in range(cost, cap + 1):
                prev = best[c - cost]
                if prev != NEG and prev + saved > new[c]:
                    new[c] = prev + saved
                    choice[c] = (i, c - cost)
        back.append(choice)
        best = new
    c = max(range(cap + 1), key=lambda k: best[k])
    out = {}
    for li in range(len(layers) - 1, -1, -1):
        n = layers[li]
        ch = back[li][c]
        if ch is None:
            out[n] = "dense"
        else:
            out[n] = opts[n][ch[0]][0]
            c = ch[1]
    return {n: out[n] for n in layers}
