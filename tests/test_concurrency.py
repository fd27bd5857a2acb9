"""Many Python threads calling one compressed model: the same answers as one thread, and
real parallelism (the kernels run under at::parallel_for and torch.ops releases the GIL
while a kernel runs, so two threads on two cores overlap).

The model mixes every CPU kernel family: Int8Conv2d, CompactConv2d, BsrLinear (fp32
blocks), BsrInt8Linear and Int8Linear."""
import math
import os
import threading
import time

import pytest
import torch
from torch import nn

from pysparse.nn import BlockSparseLinear, BsrInt8Linear, BsrLinear, CompactConv2d, Int8Conv2d, Int8Linear
from pysparse import formats
from pysparse.bench.machine import cpu_busy_fraction


def _block_pruned(lin, block, keep=0.5):
    n, k = lin.weight.shape
    mask = torch.rand(-(-n // block[0]), -(-k // block[1])) < keep
    with torch.no_grad():
        lin.weight.mul_(formats.expand_block_mask(mask, n, k, *block))
    return lin


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = Int8Conv2d.from_float(nn.Conv2d(3, 16, 3, padding=1), x_scale=None, activation="relu")
        in_mask = torch.ones(16, dtype=torch.bool)
        out_mask = torch.rand(32) < 0.6
        self.conv2 = CompactConv2d.from_masked(nn.Conv2d(16, 32, 3, padding=1), in_mask, out_mask, relu=True)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = BlockSparseLinear.from_dense(_block_pruned(nn.Linear(512, 256), (64, 32)), block=(64, 32),
                                                dispatch="sparse")
        self.fc2 = BlockSparseLinear.from_dense(_block_pruned(nn.Linear(256, 256), (64, 64)), dtype=torch.int8,
                                                dispatch="sparse")
        self.fc3 = Int8Linear.from_float(nn.Linear(256, 10))
        assert type(self.fc1) is BsrLinear and type(self.fc2) is BsrInt8Linear

    def forward(self, x):
        x = self.pool(self.conv2(self.conv1(x))).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def model():
    return Mixed().eval()


def test_eight_threads_get_the_single_thread_answers(model):
    xs = [torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        want = [model(x) for x in xs]
    bad, errors = [], []
    start = threading.Barrier(8)

    def work(i):
        try:
            start.wait()
            with torch.no_grad():  # grad mode is per thread
                for _ in range(25):
                    if not torch.equal(model(xs[i]), want[i]):
                        bad.append(i)
        except Exception as e:  # reported below: a thread's exception is otherwise lost
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not bad, f"threads {sorted(set(bad))} got answers that differ from one thread's"


class Heavy(nn.Module):
    """Enough work per call (~10 ms on one core) that thread start-up does not count."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = Int8Linear.from_float(nn.Linear(1024, 1024))
        self.b = BlockSparseLinear.from_dense(_block_pruned(nn.Linear(1024, 1024), (64, 64)), dtype=torch.int8,
                                              dispatch="sparse")

    def forward(self, x):
        return self.b(self.a(x))


def _call_ms(f, x):
    with torch.no_grad():
        f(x)
        t0 = time.perf_counter()
        f(x)
    return (time.perf_counter() - t0) * 1e3


def _max_gap_ms(f, x, calls=3):
    """Run ``calls`` calls of f in a thread while this one spins in Python: the longest this
    thread waited between two of its iterations (a call holding the GIL stalls it whole)."""
    done = threading.Event()

    def run():
        torch.set_num_threads(1)
        with torch.no_grad():
            for _ in range(calls):
                f(x)
        done.set()

    th = threading.Thread(target=run)
    gap, last = 0.0, time.perf_counter()
    th.start()
    while not done.is_set():
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    th.join()
    return gap * 1e3


def _heavy(op):
    """One layer of the op's family and an input (~100 ms on one core of a loaded machine)."""
    torch.manual_seed(2)
    if op == "int8_linear":
        return Int8Linear.from_float(nn.Linear(2048, 2048)), torch.randn(256, 2048)
    if op == "bsr_int8_linear":
        lin = _block_pruned(nn.Linear(1024, 1024), (64, 64), 0.7)
        return BlockSparseLinear.from_dense(lin, dtype=torch.int8, dispatch="sparse"), torch.randn(192, 1024)
    if op == "bsr_linear":
        lin = _block_pruned(nn.Linear(1024, 1024), (64, 32), 0.7)
        return BlockSparseLinear.from_dense(lin, block=(64, 32), dispatch="sparse"), torch.randn(1536, 1024)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(16, 64, 48, 48).contiguous(memory_format=torch.channels_last)
    if op == "int8_conv2d":
        return Int8Conv2d.from_float(conv, x_scale=None), x
    return CompactConv2d.from_masked(conv, torch.ones(64, dtype=torch.bool), torch.rand(64) < 0.8), x


@pytest.mark.parametrize("op", ["int8_linear", "bsr_int8_linear", "bsr_linear", "int8_conv2d", "compact_conv2d"])
def test_every_kernel_releases_the_gil(op):
    # A kernel that held the GIL would stall this thread for a whole call; releasing it, the
    # longest stall is the OS scheduler's (tens of ms on a loaded machine). Best of 3 tries.
    layer, x = _heavy(op)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        call = _call_ms(layer, x)
        if call < 150:  # a quiet machine runs the call faster: grow the batch to ~150 ms per call
            x = torch.cat([x] * min(64, math.ceil(150 / max(call, 1e-3))))
            call = _call_ms(layer, x)
        gap = min(_max_gap_ms(layer, x) for _ in range(3))
    finally:
        torch.set_num_threads(before)
    assert call > 60, f"{op}: a call takes {call:.1f} ms, too short to tell"
    assert gap < 0.5 * call, f"{op}: a Python thread stalled {gap:.0f} ms during {call:.0f} ms calls (GIL held?)"


def _job(m, x, calls):
    torch.set_num_threads(1)  # per thread: one core each, so two threads can use two
    with torch.no_grad():
        for _ in range(calls):
            m(x)


def _ratio(m, x, calls):
    t0 = time.perf_counter()
    _job(m, x, 2 * calls)  # one thread does both jobs
    one = time.perf_counter() - t0
    threads = [threading.Thread(target=_job, args=(m, x, calls)) for _ in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    two = time.perf_counter() - t0
    return one / two


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_two_threads_on_two_cores_run_faster_than_one():
    # This machine is shared: another process may hold the second core at any moment. So:
    # best of up to 5 tries, a modest 1.2x bar (2x is the ideal), and if even the best try misses
    # it while other processes hold the CPUs (/proc/stat, our own time excluded), skip (say
    # why) rather than fail. Measured on a quiet moment of this 2-core machine: 1.5x-2.0x.
    m = Heavy().eval()
    x = torch.randn(64, 1024)
    before = torch.get_num_threads()
    try:
        _job(m, x, 2)  # warm up (packing caches, thread pools)
        best = 0.0
        for _ in range(5):
            best = max(best, _ratio(m, x, 8))
            if best >= 1.2:
                break
    finally:
        torch.set_num_threads(before)
    if best < 1.2:
        busy = max(cpu_busy_fraction(0.5) or 0.0 for _ in range(2))  # other processes' share of the CPUs
        if busy > 0.2:
            pytest.skip(f"two threads were only {best:.2f}x one, but other processes held {busy:.0%} of the CPUs")
    assert best >= 1.2, f"two threads on two cores ran only {best:.2f}x as fast as one (the GIL held?)"
