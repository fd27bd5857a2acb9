"""Issue 8, mixed residual masks: ResNet-50-shaped net (pysparse.bench.models.resnet50), every
single-producer group 50% filter-masked (one set), every residual sum's member convs masked
with DIFFERENT random 50% sets. Contenders (1 thread, batch 1, interleaved medians):
unpruned folded (compact of the unmasked model: BN folded, channels_last), union-dense
(compact(..., compact_conv2d=False)), compact-conv2d (compact(...)). Also the residual member
layers alone (CompactConv2d fused vs dense conv over the union + add + relu)."""
import dataclasses
import os
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: the repo root
import torch
import torch.nn.functional as F
from torch import nn

from pysparse.bench.models import resnet50
from pysparse.bench.timing import Timed, TimingConfig, time_interleaved
from pysparse._depgraph import channel_groups
from pysparse.compact import compact
from pysparse.nn import CompactConv2d
from tests import zoo
from tests.test_compact import mask_channels
from tests.test_compact_mixed import mask_members


def main() -> None:
    """Mask, compact three ways, time interleaved, print the table (python bench/bench_compact_mixed.py [--quick])."""
    quick = "--quick" in sys.argv
    torch.set_num_threads(1)
    hw = 64 if quick else 224
    x = torch.randn(1, 3, hw, hw)
    torch.manual_seed(0)
    base = zoo.randomize_bn(resnet50(3)).eval()
    model = zoo.randomize_bn(resnet50(3)).eval()
    t = time.time()
    groups = channel_groups(model, x)
    single = [g if len(g.producers) == 1 else dataclasses.replace(g, prunable=False) for g in groups]
    mask_channels(model, single, 0.5, seed=0)
    n_members = mask_members(model, x, 0.5, seed=1)
    print(f"masked: {n_members} residual member convs with their own sets; {time.time()-t:.1f}s", flush=True)
    t = time.time()
    dense = compact(base, x)
    union = compact(model, x, compact_conv2d=False)
    cc = compact(model, x)
    print(f"compacted in {time.time()-t:.1f}s", flush=True)
    with torch.no_grad():
        ref = model(x)
        for name, m in (("union", union), ("cc", cc)):
            err = float((m(x) - ref).abs().max() / ref.abs().max())
            print(name, "rel err", err)
            assert err <= 1e-4


    def macs(m):
        tot = [0]
        def hook(mod, args, out):
            if isinstance(mod, CompactConv2d):
                kh, kw = mod.kernel_size
                tot[0] += out[:, :1].numel() * mod.out_idx.numel() * mod.in_idx.numel() * kh * kw
            elif isinstance(mod, nn.Conv2d):
                tot[0] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            elif isinstance(mod, nn.Linear):
                tot[0] += out.numel() * mod.in_features
        hs = [q.register_forward_hook(hook) for q in m.modules()]
        with torch.no_grad():
            m(x)
        for h in hs:
            h.remove()
        return tot[0]


    def stored(m):
        return sum(p.numel() for p in m.parameters()) + sum(
            b.numel() for n, b in m.named_buffers() if n.rsplit(".", 1)[-1] in ("weight", "bias"))


    # the member layers alone: inputs captured from one forward of each model
    ccmods = {n: m for n, m in cc.named_modules() if isinstance(m, CompactConv2d)}
    cap_cc, cap_un = {}, {}
    hs = [m.register_forward_pre_hook(lambda mod, a, n=n: cap_cc.__setitem__(n, a)) for n, m in ccmods.items()]
    um = dict(union.named_modules())
    hs += [um[n].register_forward_pre_hook(lambda mod, a, n=n: cap_un.__setitem__(n, a)) for n in ccmods]
    with torch.no_grad():
        cc(x); union(x)
    for h in hs:
        h.remove()
    # in the union model the add operand is what CompactConv2d got as residual (same values)
    layers_cc = [(ccmods[n], cap_cc[n]) for n in ccmods]
    layers_un = [(um[n], cap_un[n][0], cap_cc[n][1] if len(cap_cc[n]) > 1 else None, ccmods[n].relu) for n in ccmods]


    def run_cc():
        for m, a in layers_cc:
            m(*a)


    def run_un():
        for m, xi, r, relu in layers_un:
            y = m(xi)
            if r is not None:
                y = y + r
                if relu:
                    y = F.relu(y)


    cfg = TimingConfig.quick() if quick else TimingConfig()
    items = []
    for name, m in (("unpruned-folded", dense), ("union-dense", union), ("compact-conv2d", cc)):
        items.append(Timed(name, (lambda m=m: m(x))))
    items += [Timed("members: dense over union (+add+relu)", run_un), Timed("members: CompactConv2d fused", run_cc)]
    with torch.inference_mode():
        stats = time_interleaved(items, cfg)
    rows = []
    for name, m in (("unpruned-folded", dense), ("union-dense", union), ("compact-conv2d", cc)):
        rows.append((name, stats[name].median_ms, stats[name].q1_ms, stats[name].q3_ms, macs(m) / 1e9, stored(m) / 1e6))
    d = stats["unpruned-folded"].median_ms
    print(f"\nResNet-50-shaped, {hw}x{hw}, batch 1, 1 thread, torch {torch.__version__}; {len(ccmods)} CompactConv2d "
          f"({sum(1 for m in ccmods.values() if m.relu)} with add+ReLU fused)")
    print(f"{'model':<18}{'median ms':>10}{'q1-q3':>16}{'GMACs':>8}{'M values':>10}{'speedup':>9}{'MAC red.':>9}")
    m0 = rows[0][4]
    for name, med, q1, q3, g, v in rows:
        print(f"{name:<18}{med:>10.2f}{f'{q1:.2f}-{q3:.2f}':>16}{g:>8.3f}{v:>10.2f}{d / med:>9.2f}{m0 / g:>9.2f}")
    for name in ("members: dense over union (+add+relu)", "members: CompactConv2d fused"):
        s = stats[name]
        print(f"{name:<40} median {s.median_ms:.2f} ms (q1 {s.q1_ms:.2f}, q3 {s.q3_ms:.2f}, n={s.samples})")


if __name__ == "__main__":
    main()
