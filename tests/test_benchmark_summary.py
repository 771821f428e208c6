"""The benchmark harness's summaries: means, sample std over seeds, the macro average, the table."""

import importlib.util
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "cross_market.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("cross_market", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, seed, ndcg, wall_s=60.0):
    """A run record as ``run_one`` writes it, with the given test NDCG@10 per market (both protocols)."""
    def res(v):
        return {"hit@10": 2 * v, "ndcg@10": v, "mrr@10": v / 2}

    return {"name": name, "seed": seed, "wall_s": wall_s,
            "per_market": {m: {"valid": res(v), "test": {"full": res(v), "uni99": res(5 * v)}}
                           for m, v in ndcg.items()}}


def test_summary_means_sample_std_and_macro(harness):
    runs = [_run("Local", 2020, {"a": 0.10, "b": 0.20}, 60.0),
            _run("Local", 2021, {"a": 0.20, "b": 0.40}, 120.0),
            _run("FeCoSR", 2020, {"a": 0.30, "b": 0.50})]
    full = harness.summarise_protocol(runs, "full")
    assert full["seeds"] == [2020, 2021]
    local = full["models"]["Local"]
    assert local["runs"] == 2 and local["wall_s"] == pytest.approx(90.0)
    assert local["per_market"]["a"]["ndcg@10"] == pytest.approx(0.15)
    # sample std (ddof 1) of 0.1 and 0.2
    assert local["per_market"]["a"]["ndcg@10_std"] == pytest.approx(0.0707107, rel=1e-5)
    # macro: per seed the mean over markets (0.15, 0.30), then mean and std over seeds
    assert local["macro"]["ndcg@10"] == pytest.approx(0.225)
    assert local["macro"]["ndcg@10_std"] == pytest.approx(0.1060660, rel=1e-5)
    one = full["models"]["FeCoSR"]
    assert one["runs"] == 1 and one["macro"]["ndcg@10"] == pytest.approx(0.40)
    assert one["macro"]["ndcg@10_std"] is None  # undefined for a single seed, not 0
    uni = harness.summarise_protocol(runs, "uni99")
    assert uni["models"]["Local"]["macro"]["ndcg@10"] == pytest.approx(5 * 0.225)


def test_markdown_shows_std_only_where_there_are_seeds_to_spread(harness):
    runs = [_run("Local", 2020, {"a": 0.10}), _run("Local", 2021, {"a": 0.20}),
            _run("FeCoSR", 2020, {"a": 0.30})]
    text = harness.markdown("toy", [harness.summarise_protocol(runs, "full")])
    local = next(line for line in text.splitlines() if line.startswith("| Local"))
    fecosr = next(line for line in text.splitlines() if line.startswith("| FeCoSR"))
    assert "(n=2)" in local and "0.1500 ± 0.0707" in local
    assert "(n=1)" in fecosr and "0.3000 |" in fecosr and "±" not in fecosr
