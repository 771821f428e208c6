"""Benchmark targets read paired intervals over the runs' per-user sidecars (benchmarks/paired.py):
the verdicts of every harness, seeds without sidecars, the markdown."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from recbole_cmr import stats

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    """The module ``benchmarks/<name>.py`` (the harnesses import each other from that folder)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shared(name):
    """The module ``benchmarks/<name>.py`` the harnesses import (``sys.modules``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def paired():
    return _shared("paired")


@pytest.fixture(autouse=True)
def _fewer_resamples(monkeypatch):
    """999 resamples: the verdicts here are far from their thresholds."""
    monkeypatch.setattr(_shared("paired"), "N_RESAMPLES", 999)


@pytest.fixture(scope="module")
def write_record():
    return _shared("per_user").write_record


def _ndcg(n, mean, seed):
    """``n`` skewed per-user NDCG values (most users 0) with exactly the mean ``mean``."""
    rng = np.random.default_rng(seed)
    values = rng.exponential(1.0, n) * (rng.random(n) < 0.5)
    return values * mean / values.mean()


def _ranking(write_record, folder, name, seed, markets, shift=0.0, protocol="full"):
    """Write ``<name>-seed<seed>.json`` and its sidecar: per market ``(n_users, mean)`` users
    ``m-u<i>`` with NDCG ``_ndcg + shift`` (noise of the run's own), the record holding the means.
    ``shift`` may be a dict per market."""
    record, per_user = {"name": name, "seed": seed, "per_market": {}}, {}
    for i, (market, (n, mean)) in enumerate(markets.items()):
        up = shift.get(market, 0.0) if isinstance(shift, dict) else shift
        noise = np.random.default_rng([seed, i, len(name)]).normal(0, 0.02, n)
        values = _ndcg(n, mean, seed=i) + up + noise
        record["per_market"][market] = {"test": {protocol: {"ndcg@10": float(values.mean())}}}
        per_user[market] = {"final": {protocol: {"user": [f"{market}-u{k}" for k in range(n)],
                                                 "ndcg@10": values, "hit@10": values > 0}}}
    write_record(record, folder / f"{name}-seed{seed}.json", per_user)
    return record


MARKETS = {"a": (400, 0.2), "b": (150, 0.1)}



def _with_stage(write_record, folder, name, seed, final_shift, stage_shift):
    """A federated run: its fine-tuned models (``final``) and its federated stage, each with
    per-user values shifted from the same base, in the record and the sidecar."""
    record = _ranking(write_record, folder, name, seed, MARKETS, shift=final_shift)
    stage = _ranking(write_record, folder, f"{name}-stage", seed, MARKETS, shift=stage_shift)
    read = _shared("per_user").read_per_user
    per_user = read(folder / f"{name}-seed{seed}.json")
    for market, values in read(folder / f"{name}-stage-seed{seed}.json").items():
        per_user[market]["federated"] = values["final"]
        record["per_market"][market]["federated"] = stage["per_market"][market]
    (folder / f"{name}-stage-seed{seed}.json").unlink()
    write_record(record, folder / f"{name}-seed{seed}.json", per_user)
    return record

def test_compare_reads_met_level_and_missed_from_the_paired_interval(paired, write_record, tmp_path):
    for seed in (2020, 2021):
        _ranking(write_record, tmp_path, "B", seed, MARKETS)
        _ranking(write_record, tmp_path, "Up", seed, MARKETS, shift=0.03)
        _ranking(write_record, tmp_path, "Same", seed, MARKETS, shift=0.0)
    up = paired.compare(tmp_path, "Up", "B", [2020, 2021], protocol="full")
    assert up["verdict"] == "met" and up["seeds"] == [2020, 2021] and up["n"] == 550
    assert up["diff"] == pytest.approx(0.03, abs=0.005) and up["ci_low"] > 0
    assert paired.compare(tmp_path, "B", "Up", [2020, 2021], protocol="full")["verdict"] == "missed"
    same = paired.compare(tmp_path, "Same", "B", [2020, 2021], protocol="full")
    assert same["verdict"] == "level" and same["ci_low"] < 0 < same["ci_high"]
    # "at least level": level reads met, a loss still misses
    assert paired.compare(tmp_path, "Same", "B", [2020, 2021], protocol="full",
                          relation="at_least")["verdict"] == "met"
    assert paired.compare(tmp_path, "B", "Up", [2020, 2021], protocol="full",
                          relation="at_least")["verdict"] == "missed"
    # a ratio against its threshold: about 1.2x, far below 1.5x
    ratio = paired.compare(tmp_path, "Up", "B", [2020, 2021], protocol="full", contrast="ratio",
                           threshold=1.5)
    assert ratio["diff"] == pytest.approx(0.1775 / 0.1475, abs=0.03) and ratio["verdict"] == "missed"
    assert paired.interval_text(ratio).endswith("]") and "×" in paired.interval_text(ratio)


def test_the_interval_is_the_macro_bootstrap_of_the_sidecars_values(paired, write_record, tmp_path):
    runs = {s: (_ranking(write_record, tmp_path, "A", s, MARKETS, shift=0.01),
                _ranking(write_record, tmp_path, "B", s, MARKETS)) for s in (2020, 2021)}
    ours = paired.compare(tmp_path, "A", "B", [2020, 2021], protocol="full")
    read = _shared("per_user").read_per_user
    strata = {m: tuple(np.stack([read(tmp_path / f"{name}-seed{s}.json")[m]["final"]["full"]["ndcg@10"]
                                 for s in runs]) for name in "AB") for m in MARKETS}
    expected = stats.macro_paired_difference(strata, n_resamples=paired.N_RESAMPLES)
    assert (ours["diff"], ours["ci_low"], ours["ci_high"]) == pytest.approx(
        (expected.diff, expected.ci_low, expected.ci_high))
    macro = np.mean([[runs[s][0]["per_market"][m]["test"]["full"]["ndcg@10"]
                      - runs[s][1]["per_market"][m]["test"]["full"]["ndcg@10"] for m in MARKETS]
                     for s in runs])
    assert ours["diff"] == pytest.approx(macro, abs=1e-6)  # the records' macro difference


def test_runs_without_per_user_values_are_named_and_left_out(paired, write_record, tmp_path):
    for seed in (2020, 2021):
        _ranking(write_record, tmp_path, "A", seed, MARKETS, shift=0.05)
    _ranking(write_record, tmp_path, "B", 2021, MARKETS)
    write_record({"name": "B", "seed": 2020}, tmp_path / "B-seed2020.json")  # an older record
    row = paired.compare(tmp_path, "A", "B", [2020, 2021], protocol="full")
    assert row["seeds"] == [2021] and row["verdict"] == "met"
    assert row["without_per_user"] == ["B-seed2020"] and row["note"].startswith("seeds left out: 1 run")
    none = paired.compare(tmp_path, "A", "B", [2020], protocol="full")
    assert none == {"seeds": [], "verdict": None, "without_per_user": ["B-seed2020"],
                    "note": none["note"]} and none["note"].startswith("no interval: 1 run")
    older = paired.compare(tmp_path, "A", "B", [2021], protocol="uni99")  # a stage it lacks
    assert older["verdict"] is None and older["without_per_user"] == [
        "A-seed2021 (final/uni99)", "B-seed2021 (final/uni99)"]


def test_no_market_below_names_the_market_whose_interval_is_below_zero(paired, write_record, tmp_path):
    for seed in (2020, 2021):
        _ranking(write_record, tmp_path, "Local", seed, MARKETS)
        _ranking(write_record, tmp_path, "FeCoSR", seed, MARKETS, shift={"a": 0.05, "b": -0.05})
    row = paired.no_market_below(tmp_path, "FeCoSR", "Local", [2020, 2021], protocol="full")
    assert row["verdict"] == "missed" and row["paired"] == "significantly below in b"
    assert set(row["markets"]) == {"a", "b"} and row["markets"]["b"]["ci_high"] < 0
    fine = paired.no_market_below(tmp_path, "Local", "Local", [2020, 2021], protocol="full")
    assert fine["verdict"] == "met" and fine["paired"].startswith("no market significantly below")


def test_cross_market_targets_give_verdicts_and_the_markdown_shows_intervals(write_record, tmp_path):
    harness = _load("cross_market")
    runs = []
    for seed in (2020, 2021):
        runs.append(_ranking(write_record, tmp_path, "Local", seed, MARKETS))
        runs.append(_ranking(write_record, tmp_path, "FeCoSR", seed, MARKETS, shift=0.04))
        runs.append(_ranking(write_record, tmp_path, "Pooled", seed, MARKETS, shift=0.04))
    runs.append(_ranking(write_record, tmp_path, "FedAvg-SASRec", 2020, MARKETS, shift=0.1))
    rows = {r["target"]: r for r in harness.target_checks(runs, "full", tmp_path)}
    ratio = rows["FeCoSR ≥ 1.10 × Local"]  # 0.1875 / 0.1475: about 1.27x
    assert ratio["verdict"] == "met" and ratio["ci_low"] > 1.10 and ratio["contrast"] == "ratio"
    assert rows["FeCoSR above FedAvg-SASRec"]["verdict"] == "missed"
    assert rows["FeCoSR above FedAvg-SASRec"]["seeds"] == [2020]
    assert rows["FeCoSR at least level with Pooled (goal)"]["verdict"] == "met"
    assert rows["no market where FeCoSR is significantly below Local"]["verdict"] == "met"
    assert rows["FeCoSR above PretrainFinetune"]["verdict"] is None  # not run
    text = "\n".join(harness._targets_markdown(list(rows.values())))
    line = next(t for t in text.splitlines() if t.startswith("| FeCoSR above FedAvg-SASRec"))
    assert line.endswith("| **missed** |") and "[-0.0" in line


def _rows(write_record, folder, name, seed, scenarios, tasks, quality, users=False):
    """Write a CTR record with sidecar rows: per scenario 300 rows (60 users) whose scores
    separate the labels with ``quality`` (a larger value, a better model; the same rows, users
    and labels in every run)."""
    per_user = {}
    for i, scenario in enumerate(scenarios):
        rng = np.random.default_rng([i, 7])
        values = {"user": [f"{scenario}-u{k // 5}" for k in range(300)]}
        for t, task in enumerate(tasks):
            labels = (rng.random(300) < 0.35).astype(np.float32)
            noise = np.random.default_rng([seed, i, t, len(name)]).normal(0, 1, 300)
            suffix = f"_{task}" if task else ""
            values[f"label{suffix}"], values[f"score{suffix}"] = labels, quality * labels + noise
        per_user[scenario] = {"final": {"labeled": values}}
    means = {"auc": 0.8, "ctrgauc": 0.8, **{f"auc_{task}": 0.8 for task in tasks if task}}
    record = {"name": name, "seed": seed, "per_market": {s: {"test": means} for s in scenarios}}
    write_record(record, folder / f"{name}-seed{seed}.json", per_user)
    return record


def test_multi_scenario_targets_average_tasks_and_scenarios(write_record, tmp_path):
    harness = _load("multi_scenario")
    scenarios, tasks = ["young", "old"], harness.TASKS
    runs = [_rows(write_record, tmp_path, name, 2020, scenarios, tasks, quality)
            for name, quality in (("PF-MSMTrec", 2.0), ("FedAvg-MMoE", 0.5),
                                  ("PF-MSMTrec-noCA", 2.0), ("Local-MMoE", 0.5))]
    rows = {r["target"]: r for r in harness.target_checks(runs, tmp_path)}
    assert rows["PF-MSMTrec macro AUC at least level with FedAvg-MMoE"]["verdict"] == "met"
    assert rows["PF-MSMTrec macro AUC at least level with Pooled-MMoE"]["verdict"] is None
    assert rows["no scenario where PF-MSMTrec is significantly below Local-MMoE (auc_click)"][
        "verdict"] == "met"
    assert rows["PF-MSMTrec above its ablation PF-MSMTrec-noCA (macro AUC)"]["verdict"] != "met"
    fedavg = rows["PF-MSMTrec macro AUC at least level with FedAvg-MMoE"]
    read = _shared("per_user").read_per_user
    values = {n: read(tmp_path / f"{n}-seed2020.json") for n in ("PF-MSMTrec", "FedAvg-MMoE")}
    from sklearn.metrics import roc_auc_score

    def macro(name):
        return np.mean([roc_auc_score(v[f"label_{t}"], v[f"score_{t}"]) for s in scenarios
                        for t in tasks for v in [values[name][s]["final"]["labeled"]]])

    assert fedavg["diff"] == pytest.approx(macro("PF-MSMTrec") - macro("FedAvg-MMoE"))


def test_multi_entity_targets_compare_the_target_entitys_auc_and_group_auc(write_record, tmp_path):
    harness = _load("multi_entity")
    runs = [_rows(write_record, tmp_path, name, 2020, ["source", "target"], [None], quality)
            for name, quality in (("MKT", 2.0), ("PLE", 0.3), ("MKT-noGates", 2.0))]
    rows = {r["target"]: r for r in harness.target_checks(runs, tmp_path)}
    assert rows["MKT above PLE (target auc)"]["verdict"] == "met"
    gauc = rows["MKT above PLE (target ctrgauc)"]
    assert gauc["verdict"] == "met" and gauc["n"] < 60  # users with both classes only
    from recbole_cmr.evaluator import ctr_gauc

    read = _shared("per_user").read_per_user
    target = {n: read(tmp_path / f"{n}-seed2020.json")["target"]["final"]["labeled"] for n in ("MKT", "PLE")}
    expected = np.subtract(*[ctr_gauc(v["score"], v["label"], v["user"]) for v in target.values()])
    assert gauc["diff"] == pytest.approx(expected)
    assert rows["MKT above its ablation MKT-noGates (target auc)"]["verdict"] == "level"
    assert rows["MKT above Finetune (target auc)"]["measured"] == "not run yet"


def test_ant_targets_compare_each_metric_on_the_target(write_record, tmp_path):
    harness = _load("transfer_ant")
    market = {harness.MARKET: (300, 0.05)}
    runs = [_ranking(write_record, tmp_path, "ANT-relearn@scientific-mm", 2020, market, shift=0.03),
            _ranking(write_record, tmp_path, "ANT-finetune@scientific-mm", 2020, market)]
    for run in runs:
        run["per_market"][harness.MARKET]["test"] = {"ndcg@10": 0.05, "recall@10": 0.1}
    rows = {r["target"]: r for r in harness.target_checks(runs, tmp_path)}
    assert rows["ANT-relearn above ANT-finetune on scientific-mm (ndcg@10)"]["verdict"] == "met"
    assert rows["ANT-relearn above UniSRec-FT on scientific-mm (ndcg@10)"]["measured"] == "not run yet"


def test_ant_premise_reads_negative_transfer_as_scratch_significantly_above_fine_tuning(
        write_record, tmp_path):
    harness = _load("transfer_ant")
    market = {harness.MARKET: (300, 0.05)}
    runs = [_ranking(write_record, tmp_path, "SASRec-scratch@scientific-full", 2020, market, shift=0.03),
            _ranking(write_record, tmp_path, "UniSRec-FT@scientific-full", 2020, market),
            _ranking(write_record, tmp_path, "ANT-finetune@scientific-full", 2020, market, shift=0.06)]
    for run in runs:
        run["per_market"][harness.MARKET]["test"] = {"ndcg@10": 0.05, "recall@10": 0.1}
    rows = {r["target"]: r for r in harness.target_checks(runs, tmp_path)}
    premise = "premise: SASRec-scratch above {} on scientific-full (negative transfer; ndcg@10)"
    assert rows[premise.format("UniSRec-FT")]["verdict"] == "met"
    assert rows[premise.format("UniSRec-FT")]["diff"] > 0
    assert rows[premise.format("ANT-finetune")]["verdict"] == "missed"


def test_ant_controls_swap_freeze_encoder_and_compare_at_the_same_trainable_parts(write_record,
                                                                                   tmp_path):
    harness = _load("transfer_ant")
    settings = {name: harness.run_settings(f"{name}@scientific-mm", 2020)[2] for name in
                ("ANT-relearn", "ANT-finetune", "ANT-finetune-frozen", "ANT-relearn-trainEncoder")}
    # the controls differ from their partner only in adaptation (re-learn or keep)
    for mine, theirs in (("ANT-relearn", "ANT-finetune-frozen"),
                         ("ANT-relearn-trainEncoder", "ANT-finetune")):
        a, b = (dict(settings[n]) for n in (mine, theirs))
        assert a.pop("adaptation", "relearn") == "relearn" and b.pop("adaptation") == "finetune"
        assert a.get("freeze_encoder", True) == b["freeze_encoder"]
        a.pop("freeze_encoder", None), b.pop("freeze_encoder")
        assert a == b
    assert "ANT-finetune-frozen@scientific-full" not in harness.MODELS
    market = {harness.MARKET: (300, 0.05)}
    runs = [_ranking(write_record, tmp_path, "ANT-relearn-trainEncoder@scientific-mm", 2020, market,
                     shift=0.03),
            _ranking(write_record, tmp_path, "ANT-finetune@scientific-mm", 2020, market)]
    for run in runs:
        run["per_market"][harness.MARKET]["test"] = {"ndcg@10": 0.05, "recall@10": 0.1}
    rows = {r["target"]: r for r in harness.target_checks(runs, tmp_path)}
    row = rows["ANT-relearn-trainEncoder above ANT-finetune on scientific-mm (encoder trained; ndcg@10)"]
    assert row["verdict"] == "met"


def test_cross_market_checks_s2ce_on_the_federated_stage_as_well_as_after_fine_tuning(
        write_record, tmp_path):
    """The paper's central claim is about federated training: S²CE against plain CE is also
    judged on the two runs' federated stages (their "w/o fine-tuning" rows), which here point the
    other way from the fine-tuned models."""
    harness = _load("cross_market")
    runs = []
    for seed in (2020, 2021):
        runs.append(_with_stage(write_record, tmp_path, "FeCoSR", seed, 0.0, 0.04))
        runs.append(_with_stage(write_record, tmp_path, "FeCoSR-noS2CE", seed, 0.04, 0.0))
    rows = {r["target"]: r for r in harness.target_checks(harness.with_stage_runs(runs), "full",
                                                           tmp_path)}
    assert rows["FeCoSR (S²CE) above FeCoSR-noS2CE (plain CE)"]["verdict"] == "missed"
    stage = rows["federated stage: S²CE above plain CE (FeCoSR vs FeCoSR-noS2CE, w/o fine-tuning)"]
    assert stage["verdict"] == "met" and stage["seeds"] == [2020, 2021]
    assert stage["diff"] == pytest.approx(0.04, abs=0.005)
    means = [float(v) for v in stage["measured"].split(" vs ")]  # the w/o fine-tuning rows' means
    assert means[0] - means[1] == pytest.approx(0.04, abs=0.005)
