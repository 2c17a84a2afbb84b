"""Ctrl-C at any point of a call leaves an offloaded model exactly as good as a fresh one (RELIABILITY.md,
"Interrupts and threads"). A KeyboardInterrupt is injected at every copy the engine starts, at a sweep of line
events inside offload/engine (sys.settrace, the main thread only, as a real Ctrl-C), inside the rollback itself,
and by abandoning streams; after each, the slots hold exactly their experts' bytes, no slot is lost, exclusive
placement keeps every expert in exactly one place, and the next generate equals a fresh model's."""
import gc
import sys
from pathlib import Path

import pytest
import torch

import offload
from offload.engine.offloaded import OffloadedExperts
from offload.engine.store import HostStore

PROMPT = [{"role": "user", "content": "What is 23+58?"}]
TOKENS, SLOTS = 8, 4
ENGINE = str(Path(offload.__file__).parent / "engine")
CONFIGS = [(placement, speculative) for placement in ("inclusive", "exclusive") for speculative in (None, "mtp")]


@pytest.fixture(scope="module")
def demo():
    """One offloaded demo model (its engine is replaced per trial), its prompt, the untouched expert blobs, and
    what a fresh model returns: logits of the prompt, answers with and without MTP."""
    model = offload.load("demo", cache_experts=SLOTS, prefetch=1)
    blobs = dict(model.decoder.experts.store.blobs)
    ids = model.prompt_ids(PROMPT)
    fresh = {speculative: model.generate(ids, max_new_tokens=TOKENS, speculative=speculative)
             for speculative in (None, "mtp")} | {"logits": model.forward(ids)}
    return model, ids, blobs, fresh


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The checks' own tensor compares on one thread: on a shared 2-core machine a split one stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_engine(model, blobs: dict, placement: str) -> OffloadedExperts:
    """A cold engine over the original blobs (a dict of its own: exclusive placement moves blobs in and out),
    and a cold MTP draft-length chooser (its choices, and so the copies of a run, then repeat)."""
    spec = model.spec
    engine = OffloadedExperts(HostStore(dict(blobs)), spec.moe_layers, SLOTS, model.device, placement=placement,
                              top_k=spec.router.top_k)
    model.decoder.experts, model._draft_length = engine, None
    return engine


def assert_consistent(engine: OffloadedExperts, blobs: dict) -> None:
    """Every slot free or holding exactly its expert's bytes; exclusive: every expert in one place, intact."""
    for layer, slots in engine.slots.items():
        assert sorted([*slots.slot_of.values(), *slots.free]) == list(range(slots.capacity)), (layer, "slots lost")
        for expert, slot in slots.slot_of.items():
            original = blobs[layer, expert]
            assert torch.equal(engine.memory[layer][slot, : original.numel()], original), (layer, expert, slot)
        if engine.exclusive:
            for expert in sorted(e for (l, e) in blobs if l == layer):
                on_device, on_host = expert in slots.slot_of, (layer, expert) in engine.store.blobs
                assert on_device != on_host, (layer, expert, "on device" if on_device else "nowhere")
                if on_host:
                    original = blobs[layer, expert]
                    assert torch.equal(engine.store.blobs[layer, expert][: original.numel()], original)


def assert_recovered(model, ids, blobs: dict, fresh: dict, speculative: str | None, generate: bool = True) -> None:
    """Consistent right after the interrupted call, and the next call returns what a fresh model does: the
    whole answer, or (cheaper, as strict for the expert bytes) the prompt's logits."""
    assert_consistent(model.decoder.experts, blobs)
    if generate:
        assert torch.equal(model.generate(ids, max_new_tokens=TOKENS, speculative=speculative), fresh[speculative])
    else:
        assert torch.equal(model.forward(ids), fresh["logits"])


class InterruptAtCopy:
    """The n-th copy the engine starts (load or write-back) raises KeyboardInterrupt: before it is queued
    (`after=False`) or just after (`after=True`, the engine has not recorded it yet)."""

    def __init__(self, engine: OffloadedExperts, n: int, after: bool) -> None:
        self.n, self.after, self.calls, self.inside = n, after, 0, False
        copier = engine.copier
        copier.submit, copier.writeback = self._wrap(copier.submit), self._wrap(copier.writeback)

    def _wrap(self, copy):
        def copy_or_interrupt(dst, src):
            if self.inside:  # the CPU lane queues a write-back through its own submit: one copy
                return copy(dst, src)
            self.calls += 1
            if self.calls == self.n and not self.after:
                raise KeyboardInterrupt
            self.inside = True
            try:
                handle = copy(dst, src)
            finally:
                self.inside = False
            if self.calls == self.n:
                raise KeyboardInterrupt
            return handle
        return copy_or_interrupt


class InterruptAtLine:
    """sys.settrace: KeyboardInterrupt at the n-th line event in files under `root` (this thread only, as a real
    Ctrl-C, which Python delivers to the main thread between bytecodes). `count` is the events seen."""

    def __init__(self, n: int, root: str = ENGINE) -> None:
        self.n, self.root, self.count = n, root, 0

    def __enter__(self) -> "InterruptAtLine":
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)

    def _call(self, frame, event, arg):
        return self._line if frame.f_code.co_filename.startswith(self.root) else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.n:
                raise KeyboardInterrupt  # Python then stops tracing this thread
        return self._line


def interrupted_run(model, ids, speculative) -> bool:
    """Run one generate; True if it was interrupted."""
    try:
        model.generate(ids, max_new_tokens=TOKENS, speculative=speculative)
    except KeyboardInterrupt:
        return True
    return False


def copies_in_a_cold_run(model, ids, blobs, placement, speculative) -> int:
    counter = InterruptAtCopy(fresh_engine(model, blobs, placement), 0, after=False)
    model.generate(ids, max_new_tokens=TOKENS, speculative=speculative)
    return counter.calls


@pytest.mark.parametrize("placement,speculative", CONFIGS)
def test_interrupt_at_every_copy(demo, placement, speculative):
    """Each copy of a cold run interrupted once (alternately before and after it is queued); the next call
    is a whole generate after every 4th, a forward after the others."""
    model, ids, blobs, fresh = demo
    total = copies_in_a_cold_run(model, ids, blobs, placement, speculative)
    assert total > 100
    for n in range(1, total + 1):
        engine = fresh_engine(model, blobs, placement)
        InterruptAtCopy(engine, n, after=n % 2 == 0)
        assert interrupted_run(model, ids, speculative), n
        assert_recovered(model, ids, blobs, fresh, speculative, generate=n % 4 == 0)


def line_events(model, ids, blobs, placement, speculative) -> int:
    fresh_engine(model, blobs, placement)
    with InterruptAtLine(0) as counter:
        model.generate(ids, max_new_tokens=TOKENS, speculative=speculative)
    return counter.count


@pytest.mark.parametrize("placement,speculative", CONFIGS)
def test_interrupt_at_engine_lines(demo, placement, speculative):
    """A sweep of line events inside offload/engine: 60 points across a cold run, offset per config."""
    model, ids, blobs, fresh = demo
    total = line_events(model, ids, blobs, placement, speculative)
    points = sorted({1 + (i * total) // 60 + CONFIGS.index((placement, speculative)) for i in range(60)})
    for n in points:
        fresh_engine(model, blobs, placement)
        with InterruptAtLine(n):
            assert interrupted_run(model, ids, speculative), n
        assert_recovered(model, ids, blobs, fresh, speculative)


@pytest.mark.parametrize("placement", ["inclusive", "exclusive"])
def test_interrupt_during_the_rollback(demo, placement):
    """A second Ctrl-C while the first one's rollback runs (at every 7th of its line events, which walks
    through its per-layer and per-slot loops): the next call still finds the engine consistent and answers right."""
    model, ids, blobs, fresh = demo
    n = copies_in_a_cold_run(model, ids, blobs, placement, None) // 2
    j = 0
    while True:
        j += 7
        engine = fresh_engine(model, blobs, placement)
        InterruptAtCopy(engine, n, after=True)
        second = InterruptAtLine(j)
        arm, recover = second.__enter__, engine.recover
        engine.recover = lambda: (arm(), recover())  # count lines from the rollback's start
        try:
            assert interrupted_run(model, ids, None)
        finally:
            second.__exit__()
            del engine.recover
        if second.count < j:  # the rollback finished before the j-th line: every line was hit
            break
        assert torch.equal(model.generate(ids, max_new_tokens=TOKENS), fresh[None])
        assert_consistent(engine, blobs)
    assert j > 200


@pytest.mark.parametrize("placement", ["inclusive", "exclusive"])
def test_abandoned_streams(demo, placement):
    """A stream dropped after each of its pieces, closed or left alive, blocks nothing and changes nothing;
    between pieces the caller's code runs in its own torch mode, not in the stream's inference mode."""
    model, ids, blobs, fresh = demo
    expected = model.tokenizer.decode(fresh[None][0, ids.shape[1]:], skip_special_tokens=True)
    fresh_engine(model, blobs, placement)
    pieces = list(model.generate(PROMPT, max_new_tokens=TOKENS, stream=True))
    assert "".join(pieces) == expected
    kept = []
    for taken in range(len(pieces)):
        stream = model.generate(PROMPT, max_new_tokens=TOKENS, stream=True, speculative="mtp")
        assert [next(stream) for _ in range(taken)] == pieces[:taken]
        assert not torch.is_inference_mode_enabled()
        if taken % 2:
            stream.close()
        else:
            kept.append(stream)  # never finished, never closed
        assert model.generate(PROMPT, max_new_tokens=TOKENS) == expected
        assert_consistent(model.decoder.experts, blobs)
    del kept
    gc.collect()
    assert torch.equal(model.generate(ids, max_new_tokens=TOKENS), fresh[None])
