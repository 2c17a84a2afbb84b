"""Routing on a real trained model (the demo by default): record a trace while answering held-out tasks
with the engine offloading, report next-layer prediction recall/precision (as many experts predicted as
the router's top-k), then replay the trace through every cache policy (Belady as the ceiling)."""
from __future__ import annotations

from pathlib import Path

import torch


def run(model: str = "demo", prompts: int = 50, capacity: int = 4, max_new_tokens: int = 48,
        trace: Path = Path("demo-routing.jsonl"), json_out: bool = False) -> dict:
    import offload
    from offload.bench.cache_sim import run as replay
    from offload.demo import tasks

    lm = offload.load(model, device="cpu", cache_experts=capacity, prefetch=1, record_trace=trace)
    for _, question, _ in tasks.heldout(prompts):
        lm.generate(lm.prompt_ids([{"role": "user", "content": question}]), max_new_tokens=max_new_tokens)
    stats = lm.stats()
    prediction = {"recall": stats["prediction_recall"], "precision": stats["prediction_precision"],
                  "predicted_per_layer": lm.decoder.prefetch_count, "engine_hit_rate": stats["hit_rate"]}
    if not json_out:
        print(f"next-layer prediction ({prediction['predicted_per_layer']} experts/layer): recall "
              f"{prediction['recall']:.3f}, precision {prediction['precision']:.3f}; engine hit rate "
              f"{prediction['engine_hit_rate']:.3f} with {capacity} slots/layer and prefetch")
    with torch.inference_mode():
        policies = replay([str(trace)], "all", capacity, json_out)
    return {"prediction": prediction, "policies": policies}
