"""What a new user meets in a fresh checkout: Python started in the repository root imports the installed
packages, never our top-level folders (kernels/, quant/, cli/ would shadow Hugging Face's `kernels` that
transformers imports); and a local model causes no network attempt and nothing on stderr but our output."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FOLDERS = ("kernels", "quant", "cli")  # our top-level folders that share a name with PyPI distributions

PROBE = """
import importlib, json, sys
out = {"path0": sys.path[0]}
for name in ("kernels", "quant", "cli"):
    out[name] = getattr(importlib.import_module(name), "ORIGIN", "not the installed one")
import offload, offload.kernels, offload.quant, offload.cli.chat
out["ours"] = [offload.kernels.qmatmul.__module__, offload.quant.quantize.__module__]
print("PROBE=" + json.dumps(out))
"""
TRANSFORMERS_PROBE = """
import json
import transformers.integrations.hub_kernels
from transformers.utils.import_utils import is_kernels_available
import offload.kernels
print("PROBE=" + json.dumps({"transformers_sees_kernels": is_kernels_available()}))
"""


@pytest.fixture
def installed_namesakes(tmp_path) -> Path:
    """A site folder with regular packages named like our folders: what a user may have installed."""
    site = tmp_path / "site"
    for name in FOLDERS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("ORIGIN = 'installed'\n")
    (site / "probe.py").write_text(PROBE)
    return site


def _probe(command: list[str], site: Path) -> dict:
    env = os.environ | {"PYTHONPATH": str(site)}  # after sys.path[0], the repository root
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE=")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE="):])


@pytest.mark.parametrize("how", ["python -c", "python -m"])
def test_repository_root_shadows_no_installed_package(installed_namesakes, how):
    command = [sys.executable, "-c", PROBE] if how == "python -c" else [sys.executable, "-m", "probe"]
    out = _probe(command, installed_namesakes)
    assert Path(out["path0"] or ".").resolve() == REPO or out["path0"] == "", out["path0"]
    assert {name: out[name] for name in FOLDERS} == {name: "installed" for name in FOLDERS}
    assert out["ours"] == ["offload.kernels.dispatch", "offload.quant"]


def test_transformers_kernels_integration_from_the_root(tmp_path):
    """transformers sees Hugging Face's `kernels` exactly when that distribution is installed."""
    out = _probe([sys.executable, "-c", TRANSFORMERS_PROBE], tmp_path)
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    assert out["transformers_sees_kernels"] is installed


def test_notebook_kernel_started_in_the_root(installed_namesakes):
    """A notebook kernel has its directory ('') on sys.path before site-packages: the namesakes go right after."""
    cell = (f"import sys\nsys.path.insert(sys.path.index('') + 1, {str(installed_namesakes)!r})\n"
            "import kernels, quant, cli\nprint(kernels.ORIGIN, quant.ORIGIN, cli.ORIGIN)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = nb.cells[0].outputs
    assert [o.output_type for o in outputs] == ["stream"], outputs
    assert outputs[0].text.split() == ["installed"] * 3, outputs[0].text


# Records (and refuses) every internet connection and name lookup the process makes.
SOCKET_GUARD = """
import os, socket
_log, _real_connect = os.environ["NETWORK_LOG"], socket.socket.connect
def _record(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")
    raise OSError("network disabled by the test: " + what)
def _connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record(f"connect {address}")
    return _real_connect(self, address)
socket.socket.connect = _connect
socket.socket.connect_ex = lambda self, address: _connect(self, address) or 0
socket.create_connection = lambda address, *a, **k: _record(f"create_connection {address}")
socket.getaddrinfo = lambda host, *a, **k: _record(f"getaddrinfo {host}")
"""


@pytest.fixture
def offline_guard(tmp_path) -> tuple[dict, Path]:
    """An environment whose Python processes log every network attempt to the returned file (none allowed),
    with the hub's offline switches removed: staying offline must not depend on them."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SOCKET_GUARD)
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return env | {"PYTHONPATH": str(guard), "NETWORK_LOG": str(log)}, log


def _attempts(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_the_guard_sees_an_attempt(offline_guard, tmp_path):
    env, log = offline_guard
    code = "import urllib.request\ntry: urllib.request.urlopen('http://example.invalid')\nexcept OSError: pass"
    subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, timeout=60, check=True)
    assert _attempts(log), "the socket guard recorded nothing: the offline tests below would prove nothing"


def test_chat_on_the_demo_is_offline_and_quiet(offline_guard, tmp_path):
    env, log = offline_guard
    result = subprocess.run([str(BIN / "offload-chat"), "-p", "What is 12+35?"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("47"), result.stdout
    assert _attempts(log) == []
    assert result.stderr == ""


def test_nf4_load_of_a_local_dir_is_offline_and_quiet(offline_guard, tmp_path):
    """bitsandbytes (nf4) reaches for a hub kernel at import on some CPUs; we must not let it."""
    env, log = offline_guard
    local = tmp_path / "model"
    shutil.copytree(REPO / "offload" / "demo", local)
    code = (f"import offload\nm = offload.load({str(local)!r}, quant='nf4')\n"
            "print(len(m.generate('What is 12+35?', max_new_tokens=8)) > 0)")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert _attempts(log) == []
    assert result.stderr == ""
