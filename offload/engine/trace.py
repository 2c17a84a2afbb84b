"""Expert-routing traces: the JSONL format of ../shared/traces, read and written.

One JSON object per line, sorted by (seq, token, layer):
    {"seq": 0, "token": 12, "layer": 7, "experts": [6, 5], "probs": [0.69, 0.31]}
A key may repeat: successive rows with one (seq, token, layer) are successive router
decisions of that step (the real humaneval-2 trace logs its whole prompt at token 0).
Traces let cache and prefetch policies be judged offline on real routing.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

_KEYS = ("seq", "token", "layer", "experts", "probs")


@dataclass(frozen=True, slots=True)
class TraceRow:
    """Router decision of one layer at one decode step: selected experts, best first."""

    seq: int
    token: int
    layer: int
    experts: tuple[int, ...]
    probs: tuple[float, ...]

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.seq, self.token, self.layer)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(obj: Any) -> TraceRow:
    """Validate one decoded line; raise ValueError with the reason only."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    for k in ("seq", "token", "layer"):
        if not _is_index(obj[k]):
            raise ValueError(f"{k!r} must be a non-negative integer, got {obj[k]!r}")
    experts, probs = obj["experts"], obj["probs"]
    if not isinstance(experts, list) or not experts or not all(map(_is_index, experts)):
        raise ValueError(f"'experts' must be a non-empty list of non-negative integers, got {experts!r}")
    if len(set(experts)) != len(experts):
        raise ValueError(f"'experts' has duplicates: {experts!r}")
    if not isinstance(probs, list) or not all(map(_is_number, probs)):
        raise ValueError(f"'probs' must be a list of finite numbers, got {probs!r}")
    if len(probs) != len(experts):
        raise ValueError(f"'experts' has {len(experts)} entries but 'probs' has {len(probs)}")
    return TraceRow(obj["seq"], obj["token"], obj["layer"], tuple(experts), tuple(map(float, probs)))


def read_trace(path: str | os.PathLike[str]) -> list[TraceRow]:
    """Read and validate a whole trace, in file order; blank lines are skipped.

    Raises ValueError("FILE:LINE: reason") on the first malformed or out-of-order line,
    so a bad trace fails loudly instead of skewing a benchmark.
    """
    rows: list[TraceRow] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = _check(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            if rows and row.key < rows[-1].key:
                raise ValueError(
                    f"{path}:{lineno}: (seq, token, layer) {row.key} comes after {rows[-1].key};"
                    " rows must be sorted"
                )
            rows.append(row)
    return rows


def _line(row: TraceRow) -> str:
    return json.dumps(
        {"seq": row.seq, "token": row.token, "layer": row.layer,
         "experts": list(row.experts), "probs": [round(p, 6) for p in row.probs]},
        separators=(",", ":"),
    ) + "\n"


def _to_list(values: Any) -> list[Any]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


class TraceWriter:
    """Records router decisions as the runtime makes them.

    Writes to a temporary file beside `path` and renames it on a clean close, so a crash
    never leaves a half-written trace. Rows may arrive in any order (batched decoding
    interleaves sequences); they are sorted on close only if they arrived unsorted, with a
stable sort so rows sharing a key keep their arrival order.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")
        self._f = open(self._tmp, "x", encoding="utf-8")
        self._last: tuple[int, int, int] | None = None
        self._sorted = True

    def write(self, seq: int, token: int, layer: int,
              experts: Sequence[int] | Any, probs: Sequence[float] | Any) -> None:
        """Record one (seq, token, layer); experts/probs may be lists or tensors."""
        row = _check({"seq": seq, "token": token, "layer": layer,
                      "experts": [int(e) for e in _to_list(experts)],
                      "probs": [float(p) for p in _to_list(probs)]})
        if self._last is not None and row.key < self._last:
            self._sorted = False
        self._last = row.key
        self._f.write(_line(row))

    def close(self) -> None:
        """Finish the file (sorting it if needed) and move it into place."""
        self._f.close()
        try:
            if not self._sorted:
                self._sort_tmp()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        """Drop everything written so far; the target path is left untouched."""
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def _sort_tmp(self) -> None:
        with open(self._tmp, encoding="utf-8") as f:
            rows = sorted((_check(json.loads(line)) for line in f), key=lambda r: r.key)
        with open(self._tmp, "w", encoding="utf-8") as f:
            f.writelines(map(_line, rows))

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
