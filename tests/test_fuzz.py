"""Property-based fuzzing of the parsers of files users hand us (offload.bench.fuzz), a bounded number of cases
per target: each damaged safetensors header, shard index or packed checkpoint must load with exactly the
undamaged weights or fail with a one-line OffloadError naming the file, within 10 s. `offload-bench fuzz` runs
the same targets for as many cases as asked (RELIABILITY.md)."""
import pytest

from offload.bench.fuzz import fuzz

CASES = {"safetensors": 400, "index": 800, "packed": 400}  # ~35 s in all on 2 cores


@pytest.mark.parametrize("target", sorted(CASES))
def test_damaged_files_load_right_or_fail_cleanly(target):
    report = fuzz(target, CASES[target], seed=0)
    assert report.cases == CASES[target]
    assert not report.failures, "\n".join(f"{failure}\n    case: {case}" for case, failure in report.failures[:10])
