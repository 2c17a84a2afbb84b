"""Record routing decisions of decode steps as a trace file (the ../shared/traces JSONL schema).

One `seq` per batch row of each generate call, `token` = decode step. The file is rewritten atomically
(TraceWriter: temp name, then rename) after every generate call, so it is always complete.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..model.hooks import DecoderHook, Predictions
from ..model.kv_cache import KVCache
from .trace import TraceWriter


class RoutingRecorder(DecoderHook):
    def __init__(self, path: str | Path) -> None:
        """Fails now, with a one-line ValueError, if the trace could not be written at the end of a generate."""
        self.path = Path(path)
        try:
            if self.path.is_dir():
                raise IsADirectoryError(21, "it is a directory")
            with tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".probe"):
                pass  # TraceWriter writes a temporary file there, then renames it
        except OSError as e:
            raise ValueError(f"record_trace={str(path)!r} cannot be written ({e.strerror or e}); give a file path "
                             "in an existing, writable directory") from None
        self.rows: list[tuple[int, int, int, list[int], list[float]]] = []
        self.next_seq = 0
        self.first_seq = 0
        self.token = -1

        self.decoding = False

    def begin(self, batch: int) -> None:
        self.first_seq, self.next_seq, self.token = self.next_seq, self.next_seq + batch, -1

    def start(self, tokens: int) -> None:
        self.decoding = tokens == 1  # decode steps only
        self.token += self.decoding

    def routed(self, layer: int, h: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               cache: KVCache) -> Predictions:
        """ids, weights [B, k] of one decode step (one token per row); experts stored best first."""
        if self.decoding:
            order = weights.argsort(dim=-1, descending=True)
            experts, probs = ids.gather(1, order).tolist(), weights.gather(1, order).tolist()
            for b, (row_experts, row_probs) in enumerate(zip(experts, probs)):
                self.rows.append((self.first_seq + b, self.token, layer, row_experts, row_probs))
        return []

    def end(self) -> None:
        with TraceWriter(self.path) as writer:
            for row in sorted(self.rows, key=lambda r: r[:3]):
                writer.write(*row)
