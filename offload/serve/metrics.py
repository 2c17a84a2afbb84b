"""What /metrics reports, in Prometheus' text format: requests by outcome, tokens, generation time and the
last reply's tok/s, the queue, and the expert engine's hits, misses and bytes copied (MoEModel.stats)."""
from __future__ import annotations

import threading
from collections.abc import Mapping

OUTCOMES = ("completed", "cancelled", "failed")


class Metrics:
    """Counters the worker thread updates and /metrics reads (from another thread): guarded by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = self.completion_tokens = 0
        self.seconds = 0.0
        self.last_tokens_per_second = 0.0

    def finished(self, outcome: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """One generation ended: `outcome` is one of OUTCOMES."""
        with self._lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.seconds += seconds
            if completion_tokens and seconds > 0:
                self.last_tokens_per_second = completion_tokens / seconds

    def render(self, queued: int, running: int, engine: Mapping) -> str:
        """The exposition text; `engine` is MoEModel.stats() (no hit counts when every expert is resident)."""
        with self._lock:
            samples = [
                ("offload_requests_total", "counter", "Generations ended, by outcome (cancelled: the client "
                 "went away or the server stopped).", [(f'{{outcome="{o}"}}', n) for o, n in self.requests.items()]),
                ("offload_prompt_tokens_total", "counter", "Prompt tokens of the generations.",
                 [("", self.prompt_tokens)]),
                ("offload_completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)]),
                ("offload_generation_seconds_total", "counter", "Time spent generating.", [("", self.seconds)]),
                ("offload_tokens_per_second", "gauge", "Tokens per second of the last generation (prefill "
                 "included).", [("", self.last_tokens_per_second)]),
            ]
        samples += [
            ("offload_queue_length", "gauge", "Requests waiting for the model.", [("", queued)]),
            ("offload_running_requests", "gauge", "Requests generating now (0 or 1).", [("", running)]),
            ("offload_expert_hits_total", "counter", "Routed experts found in a device slot.",
             [("", engine.get("hits", 0))]),
            ("offload_expert_misses_total", "counter", "Routed experts that were not in a slot.",
             [("", engine.get("misses", 0))]),
            ("offload_expert_bytes_copied_total", "counter", "Expert bytes copied from the host tier.",
             [("", engine.get("bytes_copied", 0))]),
        ]
        lines = []
        for name, kind, help_text, values in samples:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {value}" for labels, value in values]
        return "\n".join(lines) + "\n"
