"""Where the modules of `offload.kernels`, `offload.quant` and `offload.cli` live.

Their folders sit at the top of the repository (kernels/, quant/, cli/) WITHOUT an __init__.py: a Python
started in a checkout has the checkout on sys.path, and a folder there that is a regular package would
shadow the installed distributions of the same names (Hugging Face's `kernels`, which transformers
imports). A folder without __init__.py is at most a namespace portion, and any regular package wins over
it. Each package's own code is a stub module (offload/kernels.py, ...) whose `__path__` makes it the
package over its folder: beside the stub in an installed wheel (pyproject's package-dir copies the folder
there), at the top of the repository in a checkout.
"""
from __future__ import annotations

from pathlib import Path


def package_path(stub_file: str, folder: str) -> list[str]:
    """`__path__` for the stub module at `stub_file` of the package whose modules are in `folder`."""
    here = Path(stub_file).resolve().parent
    installed, checkout = here / folder, here.parent / folder
    if installed.is_dir():
        return [str(installed)]
    if (here.parent / "pyproject.toml").is_file() and checkout.is_dir():
        return [str(checkout)]
    raise ImportError(f"offload.{folder}: its modules are missing (neither {installed} nor {checkout}); "
                      "reinstall moe-offload")
