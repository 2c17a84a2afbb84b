"""A real (non-editable) `pip install .` into a fresh venv: every module of the installed `offload` package
imports, nothing is installed under the top-level names `kernels`, `quant` or `cli`, and the console scripts
resolve. The editable install of the development venv hides a package missing from pyproject's hand-written
`packages` list; this install does not.

No network: the fresh venv sees the outer venv's site-packages through a plain path line in a .pth file (the
outer .pth files, among them the editable finder of `offload`, are not processed), and pip runs with
--no-index --no-build-isolation --no-deps, taking pip and setuptools from the outer venv.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
# Source folder -> installed package, as pyproject's package-dir maps them.
MAPPED = {"offload": "offload", "kernels": "offload.kernels", "quant": "offload.quant", "cli": "offload.cli"}
FORBIDDEN_TOP_LEVEL = ("kernels", "quant", "cli")

PROBE = r"""
import importlib, importlib.metadata as md, json, pkgutil, sys, traceback
out = {"sys_path": sys.path, "meta_path": [type(f).__name__ + ":" + getattr(f, "__module__", "") for f in sys.meta_path]}
errors = {}
for name in ("offload", "offload.kernels", "offload.quant", "offload.cli"):
    try:
        importlib.import_module(name)
    except BaseException as e:
        errors[name] = f"{type(e).__name__}: {e}"
import offload
out["offload_file"] = offload.__file__
out["offload_path"] = list(offload.__path__)
modules = []
def walk(package):  # pkgutil.walk_packages would not descend into a stub module with a __path__
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        modules.append(info.name)
        try:
            module = importlib.import_module(info.name)
        except BaseException as e:
            errors[info.name] = f"{type(e).__name__}: {e}"
            continue
        if hasattr(module, "__path__"):
            walk(module)
walk(offload)
out["modules"] = sorted(set(modules))
out["files"] = {m: getattr(sys.modules.get(m), "__file__", None) for m in sorted(modules)}
out["paths"] = {m: list(getattr(sys.modules.get(m), "__path__", [])) for m in ("offload.kernels", "offload.quant", "offload.cli")}
out["errors"] = errors
dist = md.distribution("moe-offload")
out["dist_files"] = [str(f) for f in dist.files or []]
out["dist_location"] = str(dist.locate_file(""))
scripts = {}
for ep in dist.entry_points:
    if ep.group == "console_scripts":
        try:
            ep.load()
            scripts[ep.name] = "ok"
        except BaseException as e:
            scripts[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
out["scripts"] = scripts
print("PROBE=" + json.dumps(out))
"""


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(probe result, fresh site-packages, fresh venv, source copy) after `pip install <copy>` into a new venv."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "*.pyc"))
    venv = root / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env |= {"PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     root, env).stdout.strip())
    assert site.is_dir() and site.is_relative_to(venv), site
    outer = sysconfig.get_paths()["purelib"]
    (site / "_outer_venv.pth").write_text(outer + "\n")  # a plain path line: outer .pth files stay unprocessed
    before = sorted(p.name for p in site.iterdir())
    # -I: never touch (uninstall) the outer venv's editable moe-offload that pip can see through the .pth.
    pip = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                "--no-cache-dir", "--ignore-installed", str(src)], root, env, timeout=400)
    assert pip.returncode == 0, (pip.stdout + pip.stderr)[-4000:]
    work = root / "cwd"  # an empty cwd: nothing importable by accident
    work.mkdir()
    probe = _run([str(python), "-c", PROBE], work, env)
    lines = [line for line in probe.stdout.splitlines() if line.startswith("PROBE=")]
    assert probe.returncode == 0 and lines, (probe.stdout + probe.stderr)[-4000:]
    result = json.loads(lines[-1][len("PROBE="):])
    result["site_before"] = before
    return result, site, venv, src


def _expected_modules(src: Path) -> set[str]:
    """Every module the source tree holds, named as installed (kernels/x.py -> offload.kernels.x)."""
    names = set()
    for folder, package in MAPPED.items():
        for file in (src / folder).rglob("*.py"):
            rel = file.relative_to(src / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if all(p.isidentifier() for p in parts):
                names.add(".".join([package, *parts]))
    return names - {"offload"}


def test_installed_copy_is_the_one_imported(installed):
    result, site, venv, _ = installed
    assert Path(result["offload_file"]).resolve().is_relative_to(site.resolve()), result["offload_file"]
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in result["offload_path"]), result
    assert not any("editable" in f.lower() for f in result["meta_path"]), result["meta_path"]
    assert str(REPO) not in result["sys_path"], "the development tree leaked onto sys.path"
    assert Path(result["dist_location"]).resolve() == site.resolve()


def test_subpackages_import(installed):
    """Each is its stub module in offload/ (offload/_folders.py), a package over its folder in the install."""
    result, site, *_ = installed
    for name in ("offload.kernels", "offload.quant", "offload.cli"):
        assert name not in result["errors"], result["errors"][name]
        short = name.split(".")[1]
        assert Path(result["files"][name]).resolve() == (site / "offload" / f"{short}.py").resolve()
        assert [Path(p).resolve() for p in result["paths"][name]] == [(site / "offload" / short).resolve()]


def test_every_module_installed_and_importable(installed):
    """A subpackage missing from pyproject's `packages` is absent from the install: compare with the source."""
    result, _, _, src = installed
    assert not result["errors"], "modules failing to import from the installed package:\n" + "\n".join(
        f"  {k}: {v}" for k, v in sorted(result["errors"].items()))
    missing = sorted(_expected_modules(src) - set(result["modules"]))
    assert not missing, (f"not installed (add the package to [tool.setuptools] packages in pyproject.toml): "
                         f"{missing}")
    assert len(result["modules"]) >= 40


def test_no_top_level_kernels_quant_cli(installed):
    result, site, _, _ = installed
    for name in FORBIDDEN_TOP_LEVEL:
        assert not (site / name).exists() and not (site / f"{name}.py").exists(), f"top-level {name} installed"
    new = sorted(set(p.name for p in site.iterdir()) - set(result["site_before"]))
    assert "offload" in new and any(n.startswith("moe_offload-") and n.endswith(".dist-info") for n in new), new
    assert not [n for n in new if n not in ("offload", "__pycache__") and not n.endswith(".dist-info")], new
    tops = {Path(f).parts[0] for f in result["dist_files"] if not f.startswith("..")}  # ../ = bin scripts
    assert not [t for t in tops if t != "offload" and not t.endswith(".dist-info")], tops
    top_level = site.glob("moe_offload-*.dist-info/top_level.txt")
    for file in top_level:
        assert set(file.read_text().split()) <= {"offload"}, file.read_text()


def test_package_data_installed(installed):
    """Files matched by [tool.setuptools.package-data] in the source are in the install too."""
    _, site, _, src = installed
    for pattern in ("demo/*.json", "demo/*.safetensors", "demo/*.jinja"):
        for file in (src / "offload").glob(pattern):
            assert (site / "offload" / file.relative_to(src / "offload")).is_file(), f"{file.name} not installed"


def test_console_scripts_resolve(installed):
    """Every [project.scripts] entry is installed in the venv's bin/ and its module:function imports."""
    result, _, venv, src = installed
    declared = tomllib.loads((src / "pyproject.toml").read_text())["project"].get("scripts", {})
    assert "offload-chat" in declared
    SCRIPTS = tuple(declared)
    for script in SCRIPTS:
        assert (venv / "bin" / script).is_file(), f"{script} not installed"
    assert set(SCRIPTS) <= set(result["scripts"]), result["scripts"]
    broken = {k: v for k, v in result["scripts"].items() if v != "ok"}
    assert not broken, f"console scripts whose target does not import: {broken}"
