"""Server metrics in the Prometheus text exposition format (prometheus_client), names as operators of
vLLM-style servers expect them: request counts by finish reason, token counters, KV-cache occupancy,
queue lengths, preemptions, speculative draft / accepted tokens, and the two latency histograms of serving benchmarks -- time to first
token (arrival to first generated token) and time per output token ((last - first) / (n - 1)).

Each server owns its registry, so several servers in one process (tests) never share counters.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                 1.0, 2.5, 5.0)


class Metrics:
    """The server's metrics; the engine thread updates them, `/metrics` renders them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("tinyinfer_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("tinyinfer_num_requests_waiting", "Requests waiting to be scheduled",
                             registry=r)
        self.kv_blocks_used = Gauge("tinyinfer_kv_blocks_used", "KV-cache blocks held by requests",
                                    registry=r)
        self.kv_blocks_total = Gauge("tinyinfer_kv_blocks_total", "KV-cache blocks in the pool",
                                     registry=r)
        # prometheus_client appends "_total" to counter names.
        self.prompt_tokens = Counter("tinyinfer_prompt_tokens", "Prompt tokens of accepted requests",
                                     registry=r)
        self.generation_tokens = Counter("tinyinfer_generation_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter("tinyinfer_preemptions", "Requests preempted (recomputed later)",
                                   registry=r)
        self.requests = Counter("tinyinfer_requests", "Finished requests", ["finish_reason"], registry=r)
        self.ttft = Histogram("tinyinfer_time_to_first_token_seconds",
                              "Arrival to first generated token", buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("tinyinfer_time_per_output_token_seconds",
                              "Mean time between output tokens of a finished request",
                              buckets=_TPOT_BUCKETS, registry=r)
        # Speculative decoding (vLLM's spec_decode_num_*_tokens): acceptance = accepted / draft.
        self.spec_draft_tokens = Counter("tinyinfer_spec_decode_num_draft_tokens",
                                         "Draft tokens proposed and verified", registry=r)
        self.spec_accepted_tokens = Counter("tinyinfer_spec_decode_num_accepted_tokens",
                                            "Draft tokens the target accepted", registry=r)
        self.preemptions_seen = 0                   # the engine's preemption count already counted
        self.spec_seen = (0, 0)                     # the engine's (draft, accepted) already counted

    def render(self) -> bytes:
        return generate_latest(self.registry)
