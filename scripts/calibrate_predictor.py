#!/usr/bin/env python
"""Fit a model's prefetch predictors (offload/model/predictor.py) and write predictor.safetensors next to its
weights. Calibration prompts are generated demo tasks with the held-out split removed, so the routing
benchmark (`offload-bench routing`, held-out prompts) measures the predictors on prompts they never saw.

    .venv/bin/python scripts/calibrate_predictor.py                     # the shipped demo predictors (~2 min)
    .venv/bin/python scripts/calibrate_predictor.py --model DIR --out DIR
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

import offload
from offload.demo import tasks
from offload.model import predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="model directory, or 'demo'")
    parser.add_argument("--out", type=Path, default=Path(offload.demo.__file__).parent, help="where to write")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--ridge", type=float, default=10.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = offload.load(args.model, device="cpu")
    rng = random.Random(args.seed)
    questions = [q for _, q, _ in tasks.make_tasks(rng, 2 * args.prompts) if not tasks.is_heldout(q)][: args.prompts]
    prompts = [model.prompt_ids([{"role": "user", "content": q}]) for q in questions]
    fitted = predictor.calibrate(model, prompts, ridge=args.ridge)
    print(f"wrote {predictor.save(fitted, args.out)}: layers {sorted(fitted)}, {len(prompts)} prompts")


if __name__ == "__main__":
    main()
