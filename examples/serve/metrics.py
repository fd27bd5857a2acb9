"""Prometheus text-format metrics for the example server: requests by status code, a batch
size histogram, request latency quantiles (over the last 10 000 requests) and queue depth.
Kept dependency-free (no prometheus_client): a few counters behind one lock."""
from __future__ import annotations

import bisect
import threading
from collections import Counter, deque

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
QUANTILES = (0.5, 0.9, 0.99)


class Metrics:
    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # status code -> count
        self.batches = [0] * (len(BATCH_BUCKETS) + 1)  # per bucket (last: +Inf), not cumulative
        self.batch_sum = 0
        self.batch_count = 0
        self.latency = deque(maxlen=window)  # seconds, successful requests
        self.latency_sum = 0.0
        self.latency_count = 0
        self.queue_depth = 0

    def request(self, code: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[code] += 1
            if seconds is not None:
                self.latency.append(seconds)
                self.latency_sum += seconds
                self.latency_count += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches[bisect.bisect_left(BATCH_BUCKETS, size)] += 1
            self.batch_sum += size
            self.batch_count += 1

    def quantiles(self) -> dict[float, float]:
        with self._lock:
            xs = sorted(self.latency)
        if not xs:
            return {q: float("nan") for q in QUANTILES}
        return {q: xs[min(len(xs) - 1, int(q * len(xs)))] for q in QUANTILES}

    def render(self) -> str:
        q = self.quantiles()
        with self._lock:
            lines = ["# HELP pysparse_requests_total Inference requests answered, by HTTP status code.",
                     "# TYPE pysparse_requests_total counter"]
            lines += [f'pysparse_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.requests.items())]
            lines += ["# HELP pysparse_batch_size Items per model call (dynamic batching).",
                      "# TYPE pysparse_batch_size histogram"]
            cum = 0
            for b, n in zip(BATCH_BUCKETS, self.batches):
                cum += n
                lines.append(f'pysparse_batch_size_bucket{{le="{b}"}} {cum}')
            lines.append(f'pysparse_batch_size_bucket{{le="+Inf"}} {cum + self.batches[-1]}')
            lines += [f"pysparse_batch_size_sum {self.batch_sum}", f"pysparse_batch_size_count {self.batch_count}",
                      "# HELP pysparse_request_latency_seconds Time from request to answer (successful requests).",
                      "# TYPE pysparse_request_latency_seconds summary"]
            lines += [f'pysparse_request_latency_seconds{{quantile="{k}"}} {v:.6f}' for k, v in q.items()]
            lines += [f"pysparse_request_latency_seconds_sum {self.latency_sum:.6f}",
                      f"pysparse_request_latency_seconds_count {self.latency_count}",
                      "# HELP pysparse_queue_depth Items waiting for a batch.", "# TYPE pysparse_queue_depth gauge",
                      f"pysparse_queue_depth {self.queue_depth}"]
        return "\n".join(lines) + "\n"
