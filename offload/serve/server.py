"""uvicorn serving the app, stopped gracefully by SIGINT or SIGTERM: the worker cancels the generation in
progress and refuses the queued ones (each request gets its answer: a 503, or an error event that ends its
stream), uvicorn lets the responses finish, and the process exits 0."""
from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn

from .app import Limits, create_app
from .worker import Worker

GRACE_SECONDS = 10  # after a stop is asked, the longest responses may take to end before they are cut


class Server(uvicorn.Server):
    """uvicorn's server; a stop signal also closes the worker, and is not raised again once it has stopped
    (uvicorn re-raises it so that the process dies of it: a stop asked for is a normal exit here)."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self.worker = worker
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self._loop is not None:  # on the loop, not in the handler: the worker's lock may be held here
            self._loop.call_soon_threadsafe(self.worker.close)
        super().handle_exit(sig, frame)


def serve(lm, model_name: str, host: str = "127.0.0.1", port: int = 8080, limits: Limits = Limits(),
          speculative: bool = False) -> None:
    """Serve `lm` until SIGINT/SIGTERM (create_app says what); a RuntimeError when the address cannot be bound."""
    app = create_app(lm, model_name, limits, speculative)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=GRACE_SECONDS)
    server = Server(config, app.state.worker)
    try:
        server.run()
    except SystemExit:  # uvicorn's way to fail at start-up (it has logged why)
        server.started = False
    if not server.started:
        raise RuntimeError(f"could not serve on http://{host}:{port} (the ERROR line above says why)")
