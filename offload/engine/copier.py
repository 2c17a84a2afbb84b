"""Asynchronous host->device copies, in submission order, on one background lane.

CUDA: a dedicated copy stream; each copy records an event and the compute stream waits only on the
event of the slot it uses. CPU: one background thread (torch releases the GIL while copying), which
serves the same interface so the tests exercise ordering, overlap and slot reuse.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch


# Handing a copy to the thread and waiting for it costs ~50-100 us of locks and wake-ups; a copy smaller than
# this (~10-20 GB/s of memcpy) is done sooner inline, when no threaded copy is ahead of it.
INLINE_COPY_BYTES = 1 << 20


class ThreadCopier:
    """The CPU lane: copies run on one worker thread in FIFO order; `wait` blocks on one copy. Small copies
    run inline while the thread is idle (nothing queued that they could overtake)."""

    def __init__(self, inline_bytes: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-copier")
        self.inline_bytes = INLINE_COPY_BYTES if inline_bytes is None else inline_bytes
        self._last: Future | None = None  # the newest threaded copy
        self.busy_seconds = 0.0

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        start = time.perf_counter()
        with torch.inference_mode():  # slots or blobs made in inference mode (a model loaded in it) are
            dst.copy_(src)            # inference tensors: outside the mode, which is per thread, they are read-only
        self.busy_seconds += time.perf_counter() - start

    def submit(self, dst: torch.Tensor, src: torch.Tensor) -> Future:
        if src.nbytes <= self.inline_bytes and (self._last is None or self._last.done()):
            done: Future = Future()
            try:
                self._copy(dst, src)
                done.set_result(None)
            except Exception as e:  # surfaces at wait(), as a threaded copy's would
                done.set_exception(e)
            return done
        self._last = self._pool.submit(self._copy, dst, src)
        return self._last

    def writeback(self, dst: torch.Tensor, src: torch.Tensor) -> Future:
        """Device->host copy of an evicted expert; FIFO with `submit`, so a later load into the same slot
        starts only after it."""
        return self.submit(dst, src)

    def wait(self, handle: Future) -> None:
        handle.result()  # re-raises the copy's exception in the caller

    finish = wait  # the host waits for the copy: the same thing here

    def drain(self) -> None:
        """Return once every copy submitted so far has ended (a no-op queued behind them)."""
        self._pool.submit(int).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class CudaCopier:
    """The GPU lane: a copy stream; non-blocking copies from pinned memory; one event per copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.back_stream = torch.cuda.Stream(device)  # PCIe is full duplex: write-backs overlap loads
        self.busy_seconds = 0.0  # not measured per copy: that would need a host sync

    def writeback(self, dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event:
        self.back_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.back_stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.back_stream)
        return event

    def submit(self, dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event:
        # the slot may still be read by kernels queued on the compute stream, or be written back: copy after
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.stream.wait_stream(self.back_stream)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def wait(self, handle: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(handle)  # no host sync

    def finish(self, handle: torch.cuda.Event) -> None:
        """Block the host until the copy is done (a write-back the host is about to read)."""
        handle.synchronize()

    def drain(self) -> None:
        """Return once every copy submitted so far has ended."""
        self.stream.synchronize()
        self.back_stream.synchronize()

    def close(self) -> None:
        self.stream.synchronize()


def make_copier(device: torch.device) -> ThreadCopier | CudaCopier:
    return CudaCopier(device) if device.type == "cuda" else ThreadCopier()
