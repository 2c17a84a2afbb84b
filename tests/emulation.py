"""The Python that tests start in subprocesses. `make test-cpus` runs tests under an emulated CPU
(qemu-x86_64 -cpu ...); a child started with plain sys.executable would run on the real CPU, so it names the
emulated interpreter in MOE_OFFLOAD_TEST_PYTHON and its children run on the same CPU as their parent."""
import os
import shlex
import sys

PYTHON: list[str] = shlex.split(os.environ.get("MOE_OFFLOAD_TEST_PYTHON", "")) or [sys.executable]
