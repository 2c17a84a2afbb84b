"""The options of a command that loads a model, as offload-chat defines them, as Annotated types, so every
such command (offload-serve; offload-chat can adopt them) offers the same ones with the same help."""
from __future__ import annotations

from typing import Annotated

import typer

Model = Annotated[str, typer.Option("--model", "-m", help="Model directory, hub repo id, or 'demo'.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, or auto (cuda when available).")]
Quant = Annotated[str | None, typer.Option(help="Quantization preset: a4e2, a4e3, a4e4, nf4 or none.")]
CacheExperts = Annotated[str | None, typer.Option(
    "--cache-experts", help="Expert slots per MoE layer, or 'auto' (the planner); default: every expert resident.")]
Prefetch = Annotated[int, typer.Option(min=0, help="Later MoE layers whose experts are prefetched.")]
Speculative = Annotated[bool, typer.Option("--mtp", help="MTP speculative decoding (MiMo-V2-Flash).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
