"""BatchNorm recalibration: running statistics recomputed for the weights as they are now."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from ._batches import call, split_batch, to_device

_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Iterable[Any], batches: Optional[int] = None, *,
                          device: Optional[torch.device] = None, progress: bool = False) -> nn.Module:
    """Recompute every BatchNorm's running_mean / running_var from ``data``, in place.

    After fine-tuning (pruning, compaction, quantization-aware training) the running
    statistics lag behind the weights; this sets them to the exact mean and (unbiased)
    variance of each BatchNorm's input over the first ``batches`` batches of ``data``
    (None: all), as torch.optim.swa_utils.update_bn does, but with exact sums over all
    samples rather than an average of per-batch statistics. The forward runs with the
    BatchNorms in training mode (normalizing by batch statistics, as in training) and every
    other module in eval mode (no dropout). Under torch.distributed (initialised) the sums
    are all-reduced, so every process gets the statistics of all processes' batches.

    data: batches as recover takes them ((inputs, target), (inputs,), a tensor or a dict).
    Returns the model (its training flags restored). A model without BatchNorm is returned
    untouched. ValueError if ``data`` gives no batch.
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ValueError(f"batches must be None (all) or an int >= 1, got {batches!r}")
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    sums: dict[int, list] = {}

    def hook(mod, args):
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1] if x.dim() > 1 else x.shape[0]
        s = sums.setdefault(id(mod), [0.0, 0.0, 0])
        s[0] = s[0] + x.sum(dim=dims)
        s[1] = s[1] + (x * x).sum(dim=dims)
        s[2] += n

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        model.eval()
        for m in bns:
            m.train()
        it = data
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(data, desc="pysparse recalibrate BatchNorm", leave=False, total=batches)
        n = 0
        for i, batch in enumerate(it):
            if batches is not None and i >= batches:
                break
            inputs, _ = split_batch(batch, i)
            call(model, to_device(inputs, device))
            n += 1
        if n == 0:
            raise ValueError("recalibrate_batchnorm: data gave no batches")
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    for m in bns:
        s = sums.get(id(m))
        if dist:
            c = m.num_features
            packed = torch.zeros(2 * c + 1, dtype=torch.float64, device=m.running_mean.device)
            if s is not None:
                packed[:c], packed[c:2 * c], packed[-1] = s[0], s[1], s[2]
            torch.distributed.all_reduce(packed)
            s = None if packed[-1] == 0 else [packed[:c], packed[c:2 * c], int(packed[-1].item())]
        if s is None:
            continue  # the data never reached it (a branch not taken): statistics kept
        total = s[2]
        mean = s[0] / total
        var = (s[1] - total * mean * mean) / max(total - 1, 1)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.clamp(min=0).to(m.running_var.dtype))
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(n)
    return model
