"""config.json mutations (hypothesis, a fixed seed) on tiny checkpoints of every architecture: each load ends in
a clean one-line error or in transformers' logits (offload.bench.config_fuzz; `offload-bench fuzz --target
config` runs many more)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from offload.bench.config_fuzz import cases, prepare
from offload.bench.fuzz import TARGETS, check_case

CASES = 120


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("config_fuzz"))


def test_config_mutations_load_right_or_fail_cleanly(ctx):
    failures = []

    @seed(20260501)
    @settings(max_examples=CASES, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases(ctx))
    def one(case):
        failure = check_case(TARGETS["config"], ctx, case, limit=20.0)
        if failure:
            failures.append(f"{case}: {failure}")

    one()
    outcomes = ctx.extra["outcomes"]
    assert not failures, f"{len(failures)} of {CASES} cases went wrong, e.g.\n" + "\n".join(failures[:10])
    assert outcomes.get("loaded", 0) >= CASES // 5 and outcomes.get("refused", 0) >= CASES // 5, outcomes
