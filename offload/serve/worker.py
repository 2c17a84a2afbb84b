"""One model, one generation at a time: requests wait in a queue and a single worker thread runs them in
order, so two requests never interleave on the model. Pieces travel to the request's asyncio task through
an asyncio.Queue; a request that is cancelled (its client went away, or the server stops) is closed between
tokens (MoEModel.generate's Reply.close: the model is whole there) or, still waiting, never started."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from ..errors import CheckpointError
from ..generate import Reply
from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("offload.serve")
SHUTTING_DOWN = APIError(503, "the server is shutting down", code="shutting_down")
CLIENT_GONE = APIError(499, "the client went away", code="client_disconnected")  # a reason; never sent


class Job:
    """One generation request: its prompt and generate() options, and the way back to its asyncio task."""

    def __init__(self, prompt: str | list[dict[str, str]], options: dict[str, Any]) -> None:
        self.prompt, self.options = prompt, options
        self.reply: Reply | None = None  # set once the generation ended (the usage counts)
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[str | Reply | APIError] = asyncio.Queue()
        self._cancelled: APIError | None = None  # why; read by the worker thread between tokens

    def cancel(self, reason: APIError) -> None:
        """Stop the generation at its next token (or before it starts); a finished one is left as it is."""
        if self._cancelled is None:
            self._cancelled = reason

    @property
    def cancelled(self) -> APIError | None:
        """Why the job was cancelled, or None."""
        return self._cancelled

    def send(self, event: str | Reply | APIError) -> None:
        """From the worker thread: hand an event to the request's task (dropped when its loop has closed)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is waiting
            pass

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text pieces; afterwards `reply` holds its usage. Raises the APIError that ended it.
        A task cancelled while it waits here (its client disconnected) cancels the generation."""
        try:
            while True:
                event = await self._events.get()
                if isinstance(event, APIError):
                    raise event
                if isinstance(event, Reply):
                    self.reply = event
                    return
                yield event
        finally:  # a no-op when the generation has ended
            self.cancel(CLIENT_GONE)


class Worker:
    """The queue and the thread that serves it; `metrics` counts every generation it ends."""

    def __init__(self, lm, metrics: Metrics, max_queue: int) -> None:
        self.lm, self.metrics, self.max_queue = lm, metrics, max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: list[Job] = []
        self._running: Job | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="offload-serve-worker", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return int(self._running is not None)

    def submit(self, job: Job) -> None:
        """Queue `job`, or an APIError (503) when the server is stopping or the queue is full."""
        with self._lock:
            if self._closing:
                raise SHUTTING_DOWN
            if len(self._waiting) >= self.max_queue:
                raise APIError(503, f"{self.max_queue} requests are already waiting; try again later "
                               "(offload-serve --max-queue)", code="queue_full")
            self._waiting.append(job)
        self._jobs.put(job)

    def close(self) -> None:
        """Refuse new jobs, cancel the running and the waiting ones (each is answered 503), and let the thread
        end once it has. Returns at once; `join` waits for the thread."""
        with self._lock:
            self._closing = True
            for job in [*self._waiting, *([self._running] if self._running else [])]:
                job.cancel(SHUTTING_DOWN)
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting.remove(job)
                self._running = job
            final = self._generate(job)
            with self._lock:
                self._running = None
            job.send(final)  # last: once it arrives, the metrics count this job as ended

    def _generate(self, job: Job) -> Reply | APIError:
        """Run one job, sending its pieces; count it in the metrics; return its Reply or an APIError."""
        start, reply = time.perf_counter(), None
        try:
            if job.cancelled is None:
                reply = self.lm.generate(job.prompt, stream=True, **job.options)
                for piece in reply:
                    job.send(piece)
                    if job.cancelled:
                        break
            outcome, final = ("cancelled", job.cancelled) if job.cancelled else ("completed", reply)
        except CheckpointError as e:  # the model's files failed under us: the server's fault, not the request's
            log.error("generation failed: %s", e)
            outcome, final = "failed", APIError(500, str(e))
        except ValueError as e:  # the request asked what the model cannot do (a prompt past its context, ...)
            outcome, final = "failed", APIError(400, str(e))
        except Exception as e:  # noqa: BLE001 - one request's failure must not end the worker
            log.exception("generation failed")
            outcome, final = "failed", APIError(500, f"{type(e).__name__}: {e}")
        finally:
            if reply is not None:
                reply.close()
        self.metrics.finished(outcome, reply.prompt_tokens if reply else 0, reply.completion_tokens if reply else 0,
                              time.perf_counter() - start)
        return final
