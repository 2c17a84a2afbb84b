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

    prediction = {}
    for predict_from in ("attention", "output"):
        lm = offload.load(model, device="cpu", cache_experts=capacity, prefetch=1, predict_from=predict_from,
                          record_trace=trace if predict_from == "attention" else None)
        for _, question, _ in tasks.heldout(prompts):
            lm.generate(lm.prompt_ids([{"role": "user", "content": question}]), max_new_tokens=max_new_tokens)
        stats = lm.stats()
        prediction[predict_from] = {"recall": stats["prediction_recall"], "precision": stats["prediction_precision"],
                                    "engine_hit_rate": stats["hit_rate"]}
        if not json_out:
            print(f"next-layer prediction from the {predict_from} state ({lm.decoder.prefetch_count} experts per "
                  f"layer): recall {stats['prediction_recall']:.3f}, precision {stats['prediction_precision']:.3f};"
                  f" engine hit rate {stats['hit_rate']:.3f} with {capacity} slots/layer")
    with torch.inference_mode():
        policies = replay([str(trace)], "all", capacity, json_out)
    return {"prediction": prediction, "policies": policies}
