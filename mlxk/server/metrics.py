"""Prometheus text exposition, written by hand: a few counters and two histograms do not need a dependency.

The api counts what it sees (requests by endpoint and status, tokens from each `done` event, time to first
token as the client sees it, decode speed as the worker measured it); the worker's live state (requests running
and waiting, models loaded and their memory) is read from its status reply at scrape time.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPS_BUCKETS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass
class Histogram:
    buckets: tuple
    counts: list = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)            # (endpoint, status code) -> count
        self.in_flight = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tps = Histogram(TPS_BUCKETS)

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.in_flight -= 1
            self.requests[(endpoint, status)] += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def done(self, event: dict) -> None:
        usage = event.get("usage") or {}
        timings = event.get("timings") or {}
        with self._lock:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.generation_tokens += int(usage.get("completion_tokens") or 0)
            self.cached_prompt_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            if timings.get("decode_tokens_per_s"):
                self.tps.observe(float(timings["decode_tokens_per_s"]))

    def render(self, worker: dict | None, supervisor_state: dict) -> str:
        worker = worker or {}
        models = worker.get("models") or []
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        def scalar(name: str, kind: str, help_text: str, value) -> None:
            metric(name, kind, help_text, [f"{name} {value}"])

        def histogram(name: str, help_text: str, values: Histogram) -> None:
            metric(name, "histogram", help_text, values.lines(name))

        with self._lock:
            scalar("mlxk_worker_up", "gauge", "1 when the inference worker answers.",
                   1 if supervisor_state.get("state") == "ready" else 0)
            scalar("mlxk_worker_restarts_total", "counter", "Inference worker restarts by the api.",
                   supervisor_state.get("restarts", 0))
            scalar("mlxk_http_requests_in_flight", "gauge", "Generation requests the api is serving.", self.in_flight)
            scalar("mlxk_requests_running", "gauge", "Requests decoding in the inference worker.",
                   int(worker.get("running") or 0))
            scalar("mlxk_requests_waiting", "gauge", "Requests queued in the inference worker.",
                   int(worker.get("waiting") or 0))
            metric("mlxk_requests_total", "counter", "Generation requests by endpoint and HTTP status.",
                   [f'mlxk_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())])
            scalar("mlxk_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens)
            scalar("mlxk_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prompt cache.",
                   self.cached_prompt_tokens)
            scalar("mlxk_generation_tokens_total", "counter", "Completion tokens generated.", self.generation_tokens)
            histogram("mlxk_time_to_first_token_seconds", "Time from request to first streamed token.", self.ttft)
            histogram("mlxk_generation_tokens_per_second", "Decode speed of each finished request.", self.tps)
        scalar("mlxk_models_loaded", "gauge", "Models resident in the inference worker.", len(models))
        metric("mlxk_model_memory_bytes", "gauge", "Memory of each loaded model.",
               [f'mlxk_model_memory_bytes{{model="{_escape(m.get("key", ""))}"}} {int(m.get("memory_bytes") or 0)}'
                for m in models])
        if worker.get("peak_memory_bytes") is not None:
            scalar("mlxk_peak_memory_bytes", "gauge", "Peak MLX memory of the inference worker.",
                   int(worker["peak_memory_bytes"]))
        prefix = worker.get("prefix_cache")
        if prefix:
            counters = worker.get("counters") or {}
            prompt = int(counters.get("prompt_tokens_total") or 0)
            scalar("mlxk_prefix_cache_hit_ratio", "gauge",
                   "Share of the worker's prompt tokens served from a prompt cache (memory or disk).",
                   round(int(counters.get("cached_prompt_tokens_total") or 0) / prompt, 4) if prompt else 0)
            scalar("mlxk_prefix_cache_disk_bytes", "gauge", "Bytes of prompt-prefix KV blocks on disk.",
                   int(prefix.get("bytes") or 0))
            scalar("mlxk_prefix_cache_disk_max_bytes", "gauge", "MLXK_PREFIX_CACHE_BYTES (0: the disk tier is off).",
                   int(prefix.get("max_bytes") or 0) if prefix.get("enabled") else 0)
            scalar("mlxk_prefix_cache_disk_hit_ratio", "gauge",
                   "Disk hits over disk lookups (prompts the memory cache could not serve whole).",
                   prefix.get("hit_ratio") or 0)
            for name, key, help_text in (
                    ("lookups", "lookups", "Prompts that looked for a longer prefix on disk."),
                    ("hits", "hits", "Disk lookups that restored a prefix."),
                    ("restored_tokens", "restored_tokens", "Prompt tokens restored from disk instead of prefilled."),
                    ("evictions", "evictions", "Blocks evicted to stay within MLXK_PREFIX_CACHE_BYTES."),
                    ("corrupt", "corrupt", "Torn or altered blocks found, skipped and deleted.")):
                scalar(f"mlxk_prefix_cache_disk_{name}_total", "counter", help_text, int(prefix.get(key) or 0))
        if worker.get("embed_batches_total") is not None:
            scalar("mlxk_embed_batches_total", "counter", "Forward passes that computed embeddings.",
                   int(worker["embed_batches_total"]))
            scalar("mlxk_embed_peak_batch_inputs", "gauge",
                   "Most inputs embedded in one forward pass (requests that arrive together share one).",
                   int(worker.get("embed_peak_batch_inputs") or 0))
            scalar("mlxk_embed_waiting", "gauge", "Embedding requests waiting for the next batch.",
                   int(worker.get("embed_waiting") or 0))
            scalar("mlxk_embed_cancelled_total", "counter",
                   "Embedding requests dropped before their batch because the client hung up.",
                   int(worker.get("embed_cancelled_total") or 0))
        return "\n".join(lines) + "\n"
