"""The real task of issue 8: a small CNN trained on the bundled digits, 50% of its filters pruned,
fine-tuned with the masks held and compacted, loses at most 1 accuracy point; int8 on top at most
0.3 more. Also: the compacted model really is smaller and equals the masked one it came from."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pysparse
from pysparse.cnn_digits import accuracy, prune_compact_finetune, train_digits_cnn


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return train_digits_cnn()


def _values(m: nn.Module) -> int:
    return sum(t.numel() for t in m.state_dict().values() if t.is_floating_point() or t.dtype == torch.int8)


def test_prune_compact_finetune_int8_accuracy(trained):
    model, data = trained
    xte, yte = data[2], data[3]
    base = accuracy(model, xte, yte)
    assert base > 95.0, base  # the task is learnt at all
    compacted, q = prune_compact_finetune(model, data, amount=0.5, epochs=4, int8=True)
    acc = accuracy(compacted, xte, yte)
    acc8 = accuracy(q, xte, yte)
    # 540 test images: one point is 5.4 images
    assert acc >= base - 1.0, (base, acc)
    assert acc8 >= acc - 0.3, (acc, acc8)
    assert _values(compacted) <= 0.6 * _values(model)
    convs = [m for m in compacted.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.out_channels <= 64 for c in convs)  # 128 -> 64: channels are gone
    n_int8 = sum(type(m).__name__ == "Int8Conv2d" for m in q.modules())
    assert n_int8 >= 3, "quantize_int8 converted the convolutions"


def test_masked_equals_compacted(trained):
    import copy

    model, data = trained
    masked = copy.deepcopy(model)
    pysparse.prune.filters(masked, 0.5, criterion="l2", example_inputs=(data[0][:2],))
    compacted = pysparse.compact(masked, (data[0][:2],))
    x = data[2][:64]
    with torch.no_grad():
        ym, yc = masked.eval()(x), compacted(x)
    # compaction is exact up to the BatchNorm folding's float rounding (1e-4 of the output's max)
    assert (ym - yc).abs().max() <= 1e-4 * ym.abs().max()
