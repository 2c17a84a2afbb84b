"""Routing-trace reader/writer: round trip, ordering, atomic writes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.engine.trace import TraceRow, TraceWriter, read_trace

rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 3), st.integers(0, 50), st.integers(0, 5),
        st.lists(st.integers(0, 15), min_size=1, max_size=4, unique=True),
    ),
    max_size=30,
).map(lambda rs: [TraceRow(s, t, l, tuple(e), tuple(round(1.0 / len(e), 6) for _ in e)) for s, t, l, e in rs])


@settings(max_examples=40, deadline=None)
@given(rows=rows_strategy)
def test_round_trip_sorts_stably(tmp_path_factory: pytest.TempPathFactory, rows: list[TraceRow]) -> None:
    path = tmp_path_factory.mktemp("t") / "trace.jsonl"
    with TraceWriter(path) as w:
        for r in rows:
            w.write(r.seq, r.token, r.layer, list(r.experts), list(r.probs))
    got = read_trace(path)
    assert got == sorted(rows, key=lambda r: r.key)  # stable: equal keys keep arrival order
    assert [p.name for p in path.parent.iterdir()] == ["trace.jsonl"]


def test_writer_takes_tensors_and_matches_schema(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as w:
        w.write(0, 12, 7, torch.tensor([6, 5]), torch.tensor([0.69, 0.31]))
    line = json.loads(path.read_text())
    assert line == {"seq": 0, "token": 12, "layer": 7, "experts": [6, 5], "probs": [0.69, 0.31]}
    assert read_trace(path) == [TraceRow(0, 12, 7, (6, 5), (0.69, 0.31))]


def test_exception_leaves_nothing_behind(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    with pytest.raises(RuntimeError):
        with TraceWriter(path) as w:
            w.write(0, 0, 0, [1, 2], [0.5, 0.5])
            raise RuntimeError("crash mid-generation")
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_previous_trace(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with TraceWriter(path) as w:
            w.write(0, 0, 0, [1], [1.0])
            raise RuntimeError
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def test_writer_rejects_bad_rows(tmp_path) -> None:
    with TraceWriter(tmp_path / "t.jsonl") as w:
        with pytest.raises(ValueError, match="'probs' has 1"):
            w.write(0, 0, 0, [1, 2], [1.0])
        with pytest.raises(ValueError, match="duplicates"):
            w.write(0, 0, 0, [1, 1], [0.5, 0.5])


GOOD = '{"seq":0,"token":0,"layer":0,"experts":[1,2],"probs":[0.6,0.4]}'


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"seq":0,"token":0,"layer":0,"experts":[1]}', "missing key"),
        ('{"seq":0,"token":0,"layer":-1,"experts":[1],"probs":[1]}', "'layer' must be"),
        ('{"seq":true,"token":0,"layer":0,"experts":[1],"probs":[1]}', "'seq' must be"),
        ('{"seq":0,"token":0,"layer":0,"experts":[],"probs":[]}', "'experts' must be"),
        ('{"seq":0,"token":0,"layer":0,"experts":[1,"2"],"probs":[1,0]}', "'experts' must be"),
        ('{"seq":0,"token":0,"layer":0,"experts":[1,2],"probs":[1]}', "'probs' has 1"),
        ('{"seq":0,"token":0,"layer":0,"experts":[1],"probs":[NaN]}', "'probs' must be"),
        ('{"seq":0,"token":0,"layer":0,"experts":[3,3],"probs":[0.5,0.5]}', "duplicates"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n")
    with pytest.raises(ValueError, match=reason) as err:
        read_trace(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: ") and "\n" not in msg


def test_out_of_order_rejected_repeated_key_allowed(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    later = GOOD.replace('"token":0', '"token":1')
    path.write_text(f"{later}\n{GOOD}\n")
    with pytest.raises(ValueError, match=r":2: .*must be sorted"):
        read_trace(path)
    path.write_text(f"{GOOD}\n{GOOD}\n{later}\n")  # a prefill logs many decisions at one key
    assert len(read_trace(path)) == 3
