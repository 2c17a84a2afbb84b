"""Loading a model for a console script: offload.load behind a progress display that appears once a load has
taken a second (on a terminal only)."""
from __future__ import annotations

import threading

from .common import interrupts_deferred

SHOW_AFTER_S = 1.0  # a quicker load draws nothing (no flash of a bar for the demo model)


def load_model(model: str, **options):
    """offload.load(model, **options) with the display on stderr, gone once loaded: the imports take a second
    or two, and a first quantized load of a large model minutes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    stderr = Console(stderr=True)
    if not stderr.is_terminal:  # a pipe or a file gets no display (rich would still write a newline)
        return _load(model, None, options)
    display = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=stderr, transient=True)
    task = display.add_task(f"loading {model}", total=None)
    lock, loaded = threading.Lock(), threading.Event()

    def show() -> None:
        with lock:
            if not loaded.is_set():
                display.start()

    timer = threading.Timer(SHOW_AFTER_S, show)
    timer.daemon = True
    timer.start()
    try:
        return _load(model, lambda stage, done, total: display.update(task, description=stage, completed=done,
                                                                      total=total), options)
    finally:
        timer.cancel()
        with lock:
            loaded.set()
            display.stop()


def _load(model: str, progress, options: dict):
    import_native_libraries()
    import offload

    return offload.load(model, progress=progress, **options)


def import_native_libraries() -> None:
    """torch and the Rust-backed tokenizer and safetensors libraries, imported with Ctrl-C held until they are
    (common.interrupts_deferred)."""
    with interrupts_deferred():
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
