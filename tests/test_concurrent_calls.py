"""Calls on one model from several threads take turns and are never wrong (RELIABILITY.md, "Interrupts and
threads"): 8 threads mix text, streamed, speculative and tensor calls, and one stream is left unfinished."""
import threading
from collections import Counter

import pytest
import torch

import offload

QUESTIONS = ["What is 23+58?", "What is 7*8?", "Sort 31 7 19 4", "What is 91-37?", "Is 45 bigger than 54?",
             "How many words are in 'the cat sat on the mat'?", "What is 12+35?", "What is 6*9?"]
TOKENS, ROUNDS = 24, 5


def ask(model, i: int) -> str:
    """Thread i's call: each thread uses another form of generate on its own question."""
    messages = [{"role": "user", "content": QUESTIONS[i]}]
    kind = i % 4
    if kind == 0:
        return model.generate(messages, max_new_tokens=TOKENS)
    if kind == 1:
        return "".join(model.generate(messages, max_new_tokens=TOKENS, stream=True))
    if kind == 2:
        return model.generate(messages, max_new_tokens=TOKENS, speculative="mtp", draft_tokens=2)
    return str(model.generate(model.prompt_ids(messages), max_new_tokens=TOKENS).tolist())


@pytest.mark.parametrize("placement", ["inclusive", "exclusive"])
def test_eight_threads_share_one_model(placement):
    model = offload.load("demo", cache_experts=4, prefetch=1, placement=placement)
    expected = [ask(model, i) for i in range(len(QUESTIONS))]
    assert len(set(expected)) == len(expected)
    unfinished = model.generate([{"role": "user", "content": QUESTIONS[0]}], max_new_tokens=TOKENS, stream=True)
    first = next(unfinished)  # a live stream holds nothing between its pieces: the threads below must not wait
    threads_before = torch.get_num_threads()
    failures, start = [], threading.Barrier(len(QUESTIONS))

    def worker(i: int) -> None:
        start.wait()
        for _ in range(ROUNDS):
            try:
                got = ask(model, i)
            except Exception as e:  # noqa: BLE001 - collected, reported below
                failures.append((type(e).__name__, f"thread {i}: {e}"))
                continue
            if got != expected[i]:
                failures.append(("wrong answer", f"thread {i}: {got!r} instead of {expected[i]!r}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "calls blocked"
    kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(kind for kind, _ in failures).items())
    assert not failures, f"{len(failures)} of {ROUNDS * len(QUESTIONS)} calls failed ({kinds}), e.g. {failures[:3]}"
    assert torch.get_num_threads() == threads_before
    assert first + "".join(unfinished) == expected[0]  # and it finishes right after all that


def test_copier_thread_writes_slots_made_in_inference_mode(monkeypatch):
    """A model loaded inside torch.inference_mode() has inference-tensor slots; the copier thread, outside
    that per-thread mode, could not write them (every threaded copy failed with an OffloadError)."""
    monkeypatch.setattr("offload.engine.copier.INLINE_COPY_BYTES", 0)  # the demo's small copies would run inline
    expected = offload.load("demo").generate("What is 23+58?", max_new_tokens=8)
    with torch.inference_mode():
        model = offload.load("demo", cache_experts=4, prefetch=1, placement="exclusive")
    assert model.generate("What is 23+58?", max_new_tokens=8) == expected


def test_host_compute_waits_for_the_write_back(monkeypatch):
    """Exclusive placement computing misses where they live (miss_policy="cpu"): an expert evicted by a
    prefetch is read from its new host blob only once the copier thread has written it back. Write-backs are
    slowed and their blobs start as garbage, so reading one early gives a wrong answer."""
    import time

    from offload.engine.copier import ThreadCopier
    from offload.engine.store import HostStore

    monkeypatch.setattr("offload.engine.copier.INLINE_COPY_BYTES", 0)
    homes, copy, new_blob = set(), ThreadCopier._copy, HostStore.new_blob

    def garbage_blob(self):
        blob = new_blob(self).fill_(0xFF)
        homes.add(blob.data_ptr())
        return blob

    def slow_write_back(self, dst, src):
        if dst.data_ptr() in homes:
            time.sleep(0.005)
        copy(self, dst, src)

    monkeypatch.setattr(HostStore, "new_blob", garbage_blob)
    monkeypatch.setattr(ThreadCopier, "_copy", slow_write_back)
    resident = offload.load("demo")
    model = offload.load("demo", cache_experts=4, prefetch=2, placement="exclusive", miss_policy="cpu")
    for question in QUESTIONS[:4]:
        messages = [{"role": "user", "content": question}]
        assert model.generate(messages, max_new_tokens=16) == resident.generate(messages, max_new_tokens=16)
    assert homes
