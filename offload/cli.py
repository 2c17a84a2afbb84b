"""Command-line apps: offload-chat, offload-convert, offload-bench (typer)."""
from offload._folders import package_path

__path__ = package_path(__file__, "cli")  # a package over the top-level cli/ folder (offload/_folders.py)
