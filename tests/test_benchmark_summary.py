"""The benchmark harness's summaries: means, sample std over seeds, the macro average, the table."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "cross_market.py"


def _load_harness(name):
    """The module ``benchmarks/<name>.py`` (the harnesses import each other from that folder)."""
    import sys

    if str(HARNESS.parent) not in sys.path:
        sys.path.insert(0, str(HARNESS.parent))
    spec = importlib.util.spec_from_file_location(name, HARNESS.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return _load_harness("cross_market")


def _run(name, seed, ndcg, wall_s=60.0):
    """A run record as ``run_one`` writes it, with the given test NDCG@10 per market (both protocols)."""
    def res(v):
        return {"hit@10": 2 * v, "ndcg@10": v, "mrr@10": v / 2}

    return {"name": name, "seed": seed, "wall_s": wall_s,
            "per_market": {m: {"valid": res(v), "test": {"full": res(v), "uni99": res(5 * v)}}
                           for m, v in ndcg.items()}}


def test_summary_means_sample_std_and_macro(harness, tmp_path):
    runs = [_run("Local", 2020, {"a": 0.10, "b": 0.20}, 60.0),
            _run("Local", 2021, {"a": 0.20, "b": 0.40}, 120.0),
            _run("FeCoSR", 2020, {"a": 0.30, "b": 0.50})]
    full = harness.summarise_protocol(runs, "full", tmp_path)
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
    uni = harness.summarise_protocol(runs, "uni99", tmp_path)
    assert uni["models"]["Local"]["macro"]["ndcg@10"] == pytest.approx(5 * 0.225)


def test_markdown_shows_std_only_where_there_are_seeds_to_spread(harness, tmp_path):
    runs = [_run("Local", 2020, {"a": 0.10}), _run("Local", 2021, {"a": 0.20}),
            _run("FeCoSR", 2020, {"a": 0.30})]
    text = harness.markdown("toy", [harness.summarise_protocol(runs, "full", tmp_path)])
    local = next(line for line in text.splitlines() if line.startswith("| Local"))
    fecosr = next(line for line in text.splitlines() if line.startswith("| FeCoSR"))
    assert "(n=2)" in local and "0.1500 ± 0.0707" in local
    assert "(n=1)" in fecosr and "0.3000 |" in fecosr and "±" not in fecosr


def test_targets_without_per_user_values_compare_means_and_give_no_verdict(harness, tmp_path):
    runs = [_run("Local", 2020, {"a": 0.10, "b": 0.10}), _run("Local", 2021, {"a": 0.12, "b": 0.30}),
            _run("FeCoSR", 2020, {"a": 0.12, "b": 0.12}),
            _run("FedAvg-SASRec", 2020, {"a": 0.20, "b": 0.20})]
    rows = {row["target"]: row for row in harness.target_checks(runs, "full", tmp_path)}
    ratio = rows["FeCoSR ≥ 1.10 × Local"]
    # only seed 2020 is shared: 0.12 / 0.10, not Local's two-seed mean
    assert ratio["seeds"] == [2020] and ratio["measured"].startswith("1.20 ×")
    assert ratio["verdict"] is None and "FeCoSR-seed2020, Local-seed2020" in ratio["paired"]
    assert rows["FeCoSR above PretrainFinetune"] == {"target": "FeCoSR above PretrainFinetune",
                                                     "seeds": [], "measured": "not run yet",
                                                     "verdict": None}
    assert harness.target_checks([r for r in runs if r["name"] != "FeCoSR"], "full", tmp_path) == []
    text = harness.markdown("toy", [harness.summarise_protocol(runs, "full", tmp_path)])
    assert "| FeCoSR ≥ 1.10 × Local | [2020] | 1.20 × (0.1200 / 0.1000) | no interval: 2 runs" in text


def test_round_checkpoint_finds_a_finished_stage_past_a_cut_file(harness, tmp_path, monkeypatch):
    """An ablation's shared federated stage: the newest readable round checkpoint whose rounds
    ended, written by a run with a resume_dir (a folder, not a setting of the rounds); a cut file
    and an unfinished stage are passed over."""
    import os

    import torch

    monkeypatch.setattr(harness, "HERE", tmp_path)
    (tmp_path / "saved").mkdir()
    settings = {"seed": 2020, "fed_rounds": 80}
    whole = tmp_path / "saved" / "FeCoSR-xmrec-federated-a.pth"
    torch.save({"kind": "federated", "config": {**settings, "resume_dir": "x"}, "round": 5,
                "stopped": True}, whole)
    running = tmp_path / "saved" / "FeCoSR-xmrec-federated-b.pth"
    torch.save({"kind": "federated", "config": settings, "round": 9, "stopped": False}, running)
    cut = tmp_path / "saved" / "FeCoSR-xmrec-federated-c.pth"
    cut.write_bytes(b"PK\x03\x04 half a zip")
    os.utime(whole, (1, 1))  # the others are newer
    path, state = harness.round_checkpoint("FeCoSR", "xmrec", settings)
    assert path == str(whole) and state["round"] == 5


def test_a_resumable_run_keeps_its_folder_until_it_ends_and_counts_every_attempt(tmp_path, monkeypatch):
    """A killed attempt leaves its state folder; the next counts the earlier attempt's time up to
    its last saved state, and the folder goes once the record is written. State kept under other
    settings is removed before the run starts afresh."""
    import os

    resumable = _load_harness("resumable")
    monkeypatch.setattr(resumable, "RESUME", tmp_path)
    out_file = tmp_path / "records" / "Local-seed2020.json"
    settings = {"seed": 2020, "epochs": 3}

    def killed_attempt(settings):
        with pytest.raises(KeyboardInterrupt):
            with resumable.resumable(out_file, settings) as run:
                folder = Path(run.settings["resume_dir"])
                (folder / "in.pth").write_bytes(b"state")
                raise KeyboardInterrupt
        return folder, run

    folder, run = killed_attempt(settings)
    # a record outside results/ (a test's) keeps its state beside it, not in the repository
    assert folder == tmp_path / "records" / ".resume" / "Local-seed2020"
    assert run.record.keys() == {"wall_s"}
    other_split = resumable.state_folder(resumable.RESULTS / "pf-gender" / "Local-seed2020.json")
    assert other_split == tmp_path / "pf-gender" / "Local-seed2020"  # same name, own folder
    assert (folder / "in.pth").exists()
    started = json.loads((folder / "attempts.json").read_text())["started"]
    os.utime(folder / "in.pth", (started + 100, started + 100))  # saved 100 s into the attempt
    with resumable.resumable(out_file, settings) as run:
        assert run.settings["resume_dir"] == str(folder) and (folder / "in.pth").exists()
        record = run.record
    assert record["attempts"] == 2 and 100 <= record["wall_s"] < 110
    assert not folder.exists()
    killed_attempt(settings)
    with resumable.resumable(out_file, {**settings, "epochs": 4}) as run:  # the harness changed
        assert not (folder / "in.pth").exists() and run.record.keys() == {"wall_s"}


def test_rounds_to_best_and_round_wall_time_of_federated_runs(harness, tmp_path):
    fed = [_run("FedAvg-SASRec", seed, {"a": 0.1}) for seed in (2020, 2021)]
    for run, best, wall in zip(fed, (4, 9), (120.0, 240.0)):
        run["federated_rounds"] = {"best_round": best, "rounds": best + 3, "rounds_wall_s": wall,
                                   "history": []}
    summary = harness.summarise_protocol(fed + [_run("Local", 2020, {"a": 0.1})], "full", tmp_path)
    entry = summary["models"]["FedAvg-SASRec"]
    assert entry["rounds_to_best"] == pytest.approx(7.5)  # rounds 5 and 10 (1-based)
    assert entry["rounds_wall_s"] == pytest.approx(180.0)
    assert "rounds_to_best" not in summary["models"]["Local"]
    row = next(line for line in harness.markdown("toy", [summary]).splitlines()
               if line.startswith("| FedAvg-SASRec"))
    assert row.endswith("| 8 | 3.0 |")


def test_runs_the_round_budget_ended_are_counted_and_marked(harness, tmp_path):
    """A federated stage that ran all ``fed_rounds`` with its best round within the patience of
    the last was ended by the budget, not by early stopping: the server's flag where a record
    has it, else read from the rounds and settings (older records)."""
    runs = [_run("FedAvg-SASRec", seed, {"a": 0.1}) for seed in (2020, 2021, 2022)]
    settings = {"fed_rounds": 50, "stopping_step": 10}
    runs[0]["federated_rounds"] = {"best_round": 42, "rounds": 50, "rounds_wall_s": 1.0}  # budget
    runs[1]["federated_rounds"] = {"best_round": 38, "rounds": 50, "rounds_wall_s": 1.0}  # stopped at 49
    runs[2]["federated_rounds"] = {"best_round": 30, "rounds": 41, "rounds_wall_s": 1.0,
                                   "budget_ended": False}
    for run in runs:
        run["settings"] = settings
    assert [harness.budget_ended(r) for r in runs] == [True, False, False]
    assert harness.budget_ended({"federated_rounds": {"best_round": 1, "rounds": 2, "budget_ended": True}})
    summary = harness.summarise_protocol(runs, "full", tmp_path)
    assert summary["models"]["FedAvg-SASRec"]["ended_by_budget"] == 1
    text = harness.markdown("toy", [summary])
    row = next(line for line in text.splitlines() if line.startswith("| FedAvg-SASRec"))
    assert "| 38 (1 of 3 at budget) |" in row and "at budget: the round budget `fed_rounds`" in text


def test_wall_times_are_kept_apart_per_machine(harness, tmp_path):
    runs = [_run("Local", 2020, {"a": 0.1}, 600.0), _run("Local", 2021, {"a": 0.1}, 60.0),
            _run("Local", 2022, {"a": 0.1}, 120.0)]
    runs[1]["device"] = runs[2]["device"] = "NVIDIA H200"
    entry = harness.summarise_protocol(runs, "full", tmp_path)["models"]["Local"]
    assert entry["wall_s"] == pytest.approx(600.0)  # the CPU machine's, never mixed with the GPU's
    assert entry["wall_s_by_device"] == {"H200": pytest.approx(90.0), "cpu": pytest.approx(600.0)}
    text = harness.markdown("toy", [harness.summarise_protocol(runs, "full", tmp_path)])
    assert "| 1.5 (H200) / 10.0 (cpu) |" in text and "Wall time per machine" in text


def test_a_run_from_an_older_model_revision_is_stale(harness):
    _, settings = harness.run_settings("xmrec", "Local", 2020)
    record = {"name": "Local", "dataset": "xmrec", "seed": 2020, "settings": settings}
    assert harness.stale_keys(record) == ["revision"]  # trained over the shared item table
    assert harness.stale_keys({**record, "revision": harness.REVISIONS["Local"]}) == []
    _, pooled = harness.run_settings("xmrec", "Pooled", 2020)  # no revision yet: 1
    assert harness.stale_keys({"name": "Pooled", "dataset": "xmrec", "seed": 2020,
                               "settings": pooled}) == []


# ---- the multi-scenario CTR harness (benchmarks/multi_scenario.py) --------------------------
@pytest.fixture(scope="module")
def ctr_harness():
    import sys

    sys.path.insert(0, str(HARNESS.parent))  # it imports cross_market's helpers
    return _load_harness("multi_scenario")


def _ctr_run(name, seed, auc, wall_s=60.0):
    """A run record with test AUC ``auc[m] = (click, ctcvr)`` per scenario."""
    def res(click, ctcvr):
        return {"auc": (click + ctcvr) / 2, "auc_click": click, "auc_ctcvr": ctcvr,
                "logloss": 0.5, "logloss_click": 0.6, "logloss_ctcvr": 0.4}

    return {"name": name, "seed": seed, "wall_s": wall_s,
            "per_market": {m: {"valid": res(*v), "test": res(*v)} for m, v in auc.items()}}


def test_ctr_summary_macro_and_targets(ctr_harness, tmp_path):
    runs = [_ctr_run("Local-MMoE", 2020, {"a": (0.70, 0.60), "b": (0.80, 0.70)}),
            _ctr_run("Local-MMoE", 2021, {"a": (0.72, 0.62), "b": (0.82, 0.72)}),
            _ctr_run("FedAvg-MMoE", 2020, {"a": (0.75, 0.65), "b": (0.75, 0.65)}),
            _ctr_run("PF-MSMTrec", 2020, {"a": (0.76, 0.66), "b": (0.79, 0.75)}),
            _ctr_run("PF-MSMTrec-noCA", 2020, {"a": (0.77, 0.70), "b": (0.80, 0.75)})]
    summary = ctr_harness.summarise_runs(runs, tmp_path)
    local = summary["models"]["Local-MMoE"]
    assert local["per_market"]["a"]["auc_click"] == pytest.approx(0.71)
    assert local["macro"]["auc"] == pytest.approx((0.65 + 0.75 + 0.67 + 0.77) / 4)
    assert local["macro"]["auc_std"] == pytest.approx(0.0141421, rel=1e-5)
    assert summary["models"]["PF-MSMTrec"]["macro"]["auc_std"] is None
    rows = {r["target"]: r for r in summary["targets"]}
    fedavg = rows["PF-MSMTrec macro AUC at least level with FedAvg-MMoE"]
    assert fedavg["measured"].startswith("0.7400 vs 0.7000") and fedavg["verdict"] is None
    assert rows["PF-MSMTrec macro AUC at least level with Pooled-MMoE"]["measured"] == "not run yet"
    text = ctr_harness.markdown(summary)
    assert "| PF-MSMTrec | 1 | 0.7400 |" in text


# ---- the multi-entity CTR harness (benchmarks/multi_entity.py) ------------------------------
@pytest.fixture(scope="module")
def entity_harness(ctr_harness):
    return _load_harness("multi_entity")


def _entity_run(name, seed, target_auc, gauc=0.6):
    def res(auc):
        return {"auc": auc, "ctrgauc": gauc, "logloss": 0.5}

    return {"name": name, "seed": seed, "wall_s": 30.0,
            "per_market": {"source": {"valid": res(0.8), "test": res(0.8)},
                           "target": {"valid": res(target_auc), "test": res(target_auc)}}}


def test_entity_summary_headline_is_the_target_entity(entity_harness, tmp_path):
    runs = [_entity_run("DNN-target", 2020, 0.70), _entity_run("DNN-target", 2021, 0.72),
            _entity_run("Finetune", 2020, 0.74, gauc=0.65), _entity_run("MKT", 2020, 0.75),
            _entity_run("MKT-noPDL", 2020, 0.76)]
    summary = entity_harness.summarise_runs(runs, tmp_path)
    assert summary["models"]["DNN-target"]["per_market"]["target"]["auc"] == pytest.approx(0.71)
    rows = {r["target"]: r for r in summary["targets"]}
    assert rows["MKT above DNN-target (target auc)"]["measured"].startswith("0.7500 vs 0.7000")
    assert rows["MKT above Finetune (target ctrgauc)"]["measured"].startswith("0.6000 vs 0.6500")
    assert rows["MKT above PLE (target auc)"]["measured"] == "not run yet"
    text = entity_harness.markdown(summary)
    assert "| MKT | 1 | 0.7500 | 0.6000 | 0.5000 |" in text


# ---- the ANT negative-transfer harness (benchmarks/transfer_ant.py) --------------------------
@pytest.fixture(scope="module")
def ant_harness(ctr_harness):
    return _load_harness("transfer_ant")


def _ant_run(variant, target, seed, ndcg, recall):
    res = {"recall@10": recall, "recall@50": 2 * recall, "ndcg@10": ndcg, "ndcg@50": 1.5 * ndcg}
    return {"name": f"{variant}@{target}", "seed": seed, "wall_s": 60.0,
            "per_market": {"scientific": {"valid": res, "test": res}}}


def test_ant_summary_targets_as_markets_and_negative_transfer(ant_harness, tmp_path):
    runs = [_ant_run("SASRec-scratch", "scientific-mm", 2020, 0.050, 0.10),
            _ant_run("SASRec-scratch", "scientific-mm", 2021, 0.054, 0.10),
            _ant_run("SASRec-scratch", "scientific-full", 2020, 0.040, 0.08),
            _ant_run("ANT-relearn", "scientific-mm", 2020, 0.060, 0.11),
            _ant_run("ANT-relearn", "scientific-full", 2020, 0.041, 0.07),
            _ant_run("ANT-finetune", "scientific-mm", 2020, 0.045, 0.11),
            _ant_run("ANT-relearn-noImage", "scientific-mm", 2020, 0.055, 0.10)]
    summary = ant_harness.summarise_runs(runs, tmp_path)
    scratch = summary["models"]["SASRec-scratch"]
    assert scratch["per_market"]["scientific-mm"]["ndcg@10"] == pytest.approx(0.052)
    assert scratch["per_market"]["scientific-mm"]["ndcg@10_std"] == pytest.approx(0.0028284, rel=1e-4)
    assert scratch["runs"] == {"scientific-mm": 2, "scientific-full": 1}
    assert list(summary["models"]["ANT-relearn-noImage"]["per_market"]) == ["scientific-mm"]
    flagged = {(f["model"], f["target"]): f["metrics"] for f in summary["negative_transfer"]}
    assert flagged == {("ANT-relearn", "scientific-full"): ["recall@10"],
                       ("ANT-finetune", "scientific-mm"): ["ndcg@10"]}
    rows = {r["target"]: r for r in summary["targets"]}
    scratch = rows["ANT-relearn at least level with SASRec-scratch on scientific-mm (ndcg@10)"]
    assert scratch["seeds"] == [2020] and scratch["measured"] == "0.0600 vs 0.0500 (+20.0 %)"
    assert rows["ANT-relearn above UniSRec-FT on scientific-mm (ndcg@10)"]["measured"] == "not run yet"
    text = ant_harness.markdown(summary)
    assert "| ANT-finetune ⚠ | 1 | 0.1100 | 0.2200 | 0.0450 | 0.0675 |" in text


def test_ant_harness_runs_pretrained_variants_from_one_checkpoint_per_seed(ant_harness):
    model, dataset, settings = ant_harness.run_settings("ANT-relearn-noMoE@scientific-mm", 2021)
    assert (model, dataset, settings["moe"]) == ("ANT", "scientific-mm-transfer", False)
    assert settings["pretrained"] == str(ant_harness.pretrained_file(2021))
    model, dataset, settings = ant_harness.run_settings("SASRec-scratch@scientific-full", 2021)
    assert (model, dataset, settings["markets"]) == ("SASRec", "scientific-full-transfer", ["scientific"])
    assert "pretrained" not in settings
    assert "ANT-relearn-noMoE@scientific-full" not in ant_harness.MODELS  # ablations: mm only


def test_ant_records_of_an_older_ant_revision_are_stale(ant_harness):
    def record(name, **extra):
        model, _, settings = ant_harness.run_settings(name, 2020)
        return {"name": name, "model": model, "seed": 2020, "settings": settings, **extra}

    revisions = ant_harness.REVISIONS
    assert all(ant_harness.run_settings(n, 2020)[2]["mask_history_items"] for n in ant_harness.MODELS)
    assert ant_harness.pretrain_settings(2020)["mask_history_items"]  # the protocol everywhere
    assert not ant_harness.is_current(record("ANT-relearn@scientific-mm", revision=2))  # unmasked
    assert ant_harness.is_current(record("ANT-relearn@scientific-mm", revision=revisions["ANT"]))
    assert not ant_harness.is_current(record("SASRec-scratch@scientific-mm"))  # history unmasked
    assert ant_harness.is_current(record("SASRec-scratch@scientific-mm", revision=revisions["SASRec"]))
    changed = record("ANT-relearn@scientific-mm", revision=revisions["ANT"])
    changed["settings"] = {**changed["settings"], "learning_rate": 0.01}
    assert not ant_harness.is_current(changed)


def test_parallel_workers_convert_a_dataset_once(harness, tmp_path, monkeypatch):
    """Two workers asking for the same missing dataset at once: one converts, the other waits."""
    import threading
    import time

    calls = []

    def fake_convert(cmd, check):
        calls.append(cmd)
        time.sleep(0.2)  # the other worker asks while this conversion is under way
        (tmp_path / cmd[cmd.index("--name") + 1]).mkdir()

    monkeypatch.setattr(harness, "DATA", tmp_path)
    monkeypatch.setattr(harness.subprocess, "run", fake_convert)
    workers = [threading.Thread(target=harness.convert_once, args=(["xmrec", "src"], "xm"))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and (tmp_path / "xm").is_dir()


def test_ant_tuning_grid_reads_as_recbole_space_and_a_done_variant_is_skipped(ant_harness, tmp_path,
                                                                              monkeypatch):
    from recbole.trainer import HyperTuning

    tune = _load_harness("tune_ant")
    grid = tmp_path / "grid.hyper"
    grid.write_text(tune.params_text({"learning_rate": [0.001, 0.003], "hidden_dropout_prob": [0.5]}))
    assert set(HyperTuning._build_space_from_file(str(grid))) == {"learning_rate", "hidden_dropout_prob"}
    monkeypatch.setattr(tune, "FOLDER", tmp_path)
    done = tmp_path / "ANT-relearn@scientific-mm-seed2020"
    done.mkdir()
    (done / "ANT-scientific-mm-transfer.best.json").write_text("{}")
    monkeypatch.setattr(tune.ant, "ensure_pretrained", lambda seed: pytest.fail("a done variant ran"))
    with pytest.raises(pytest.fail.Exception, match="a done variant ran"):  # no run.json: older protocol
        tune.tune("ANT-relearn", 2020)
    (done / "run.json").write_text(json.dumps(tune.run_record("ANT-relearn", 2020)))
    assert tune.tune("ANT-relearn", 2020) == done


def test_ant_tuned_variants_run_the_points_the_committed_tuning_chose(ant_harness):
    """``ANT-*-tuned`` are their adaptation at the validation choice of tune_ant.py (the committed
    ``best.json``), so a retuning that changes the choice cannot leave them on the old point."""
    for name, (base, point) in ant_harness.TUNED.items():
        (best,) = (ant_harness.RESULTS / "ant-tuning" / f"{base}@scientific-mm-seed2020").glob("*.best.json")
        assert json.loads(best.read_text())["best_params"] == point, name
        assert ant_harness.VARIANTS[name] == {**ant_harness.VARIANTS[base], **point}
        assert f"{name}@scientific-mm" in ant_harness.MODELS
        assert f"{name}@scientific-full" not in ant_harness.MODELS
    wordings = [row["target"] for row in ant_harness.target_checks([])]
    assert "ANT-relearn-tuned above ANT-finetune-tuned on scientific-mm (ndcg@10)" in wordings


def test_ant_tuning_keeps_each_search_resumable_until_its_folder_is_written(ant_harness, tmp_path,
                                                                           monkeypatch):
    """The search runs with a ``resume_dir`` of its own (hyper_tuning gives each trial a subfolder
    of it); a search cut off leaves it for the next attempt, a finished one removes it."""
    import recbole_cmr.hyper_tuning

    tune = _load_harness("tune_ant")
    monkeypatch.setattr(tune, "FOLDER", tmp_path)
    monkeypatch.setattr(tune.ant, "ensure_pretrained", lambda seed: None)
    seen = []

    def search(model, dataset, params_file, algo, config_dict, output_dir):
        seen.append(config_dict["resume_dir"])
        assert Path(config_dict["resume_dir"]).is_dir()
        if len(seen) == 1:
            raise KeyboardInterrupt  # the session ends mid-search
        Path(output_dir, f"{model}-{dataset}.best.json").write_text("{}")

    monkeypatch.setattr(recbole_cmr.hyper_tuning, "run_hyper", search)
    with pytest.raises(KeyboardInterrupt):
        tune.tune("ANT-finetune", 2020)
    assert Path(seen[0]).is_dir()
    assert tune.tune("ANT-finetune", 2020) == tmp_path / "ANT-finetune@scientific-mm-seed2020"
    assert seen[1] == seen[0] and not Path(seen[0]).exists()
    assert tune.is_done(tmp_path / "ANT-finetune@scientific-mm-seed2020", "ANT-finetune", 2020)


# ---- per-user sidecars of the run records (benchmarks/per_user.py) ---------------------------
@pytest.fixture(scope="module")
def per_user():
    return _load_harness("per_user")


def _values(users, seed=0, fields=("ndcg@10", "hit@10")):
    """One protocol's per-user values as a trainer keeps them: tokens and float32-exact lists."""
    rng = np.random.default_rng(seed)
    return {"user": list(users),
            **{f: rng.random(len(users)).astype(np.float32).tolist() for f in fields}}


def test_per_user_sidecar_round_trips_as_float32(per_user, tmp_path):
    values = {"ca": {"final": {"full": _values(["u1", "u22"], 1), "uni99": _values(["u1", "u22"], 2)},
                     "federated": {"full": _values(["u1", "u22"], 3)}},
              "de": {"final": {"full": _values(["long-user-token-7"], 4)}}}
    record = tmp_path / "Local-seed2020.json"
    held = per_user.write_per_user(values, record)
    assert (tmp_path / "Local-seed2020.per_user.npz").exists()
    assert held["file"] == "Local-seed2020.per_user.npz"
    assert held["markets"] == {"ca": {"final": {"full": 2, "uni99": 2}, "federated": {"full": 2}},
                               "de": {"final": {"full": 1}}}
    back = per_user.read_per_user(record)
    assert back.keys() == values.keys()
    for market, stages in values.items():
        assert back[market].keys() == stages.keys()
        for stage, protocols in stages.items():
            assert back[market][stage].keys() == protocols.keys()
            for protocol, fields in protocols.items():
                got = back[market][stage][protocol]
                assert got.keys() == fields.keys() and got["user"].dtype.kind == "U"
                assert got["user"].tolist() == fields["user"]
                for field in ("ndcg@10", "hit@10"):
                    assert got[field].dtype == np.float32 and got[field].tolist() == fields[field]
    assert per_user.read_per_user(tmp_path / "Pooled-seed2020.json") is None  # no sidecar


def test_per_user_values_shorter_than_their_users_are_refused(per_user, tmp_path):
    bad = {"ca": {"final": {"full": {"user": ["u1", "u2"], "ndcg@10": [0.5]}}}}
    with pytest.raises(ValueError, match="ca/final/full: field 'ndcg@10' has 1 values for 2 users"):
        per_user.write_per_user(bad, tmp_path / "r.json")


def test_the_sidecar_is_written_before_the_record(per_user, tmp_path, monkeypatch):
    """The record marks a finished run: when it exists, its sidecar is complete."""
    import os

    replaced = []

    def replace(src, dst):
        replaced.append(Path(dst).name)
        os.rename(src, dst)

    monkeypatch.setattr(per_user.os, "replace", replace)
    record = tmp_path / "results" / "Local-seed2020.json"
    per_user.write_record({"name": "Local"}, record, {"ca": {"final": {"full": _values(["u1"])}}})
    assert replaced == ["Local-seed2020.per_user.npz", "Local-seed2020.json"]
    assert json.loads(record.read_text())["per_user"]["file"] == "Local-seed2020.per_user.npz"
    assert sorted(p.name for p in record.parent.iterdir()) == [
        "Local-seed2020.json", "Local-seed2020.per_user.npz"]  # no temporary file left


def test_records_with_and_without_a_sidecar_summarise_alike(harness, per_user, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    _, settings = harness.run_settings("xmrec", "Local", 2020)
    for seed, ndcg in ((2020, 0.1), (2021, 0.2)):
        run = {**_run("Local", seed, {"a": ndcg, "b": ndcg}), "dataset": "xmrec",
               "revision": harness.REVISIONS["Local"], "settings": {**settings, "seed": seed}}
        sidecar = {m: {"final": {"full": _values(["u1"])}} for m in "ab"} if seed == 2021 else None
        per_user.write_record(run, tmp_path / "xmrec" / f"Local-seed{seed}.json", sidecar)
    harness.summarise("xmrec")  # the record written before sidecars (2020) still counts
    summary = json.loads((tmp_path / "xmrec.json").read_text())
    assert summary["seeds"] == [2020, 2021]
    assert summary["models"]["Local"]["macro"]["ndcg@10"] == pytest.approx(0.15)
    assert per_user.read_per_user(tmp_path / "xmrec" / "Local-seed2020.json") is None


def _fake_run_result(markets):
    """What ``run_recbole_cmr`` returns for a fine-tuned federated model on ``markets``."""
    def entry(market, stage, seed):
        return {"valid": {"ndcg@10": 0.1}, "test": {"ndcg@10": 0.1, "hit@10": 0.2},
                "per_user": _values([f"{market}-u{i}" for i in range(3)], seed),
                "checkpoint": f"{stage}-{market}.pth"}

    return {"train_mode": "federated",
            "per_market": {m: {**entry(m, "final", i), "federated": entry(m, "federated", 10 + i)}
                           for i, m in enumerate(markets)}}


def test_cross_market_run_one_writes_every_markets_per_user_values(harness, per_user, tmp_path,
                                                                   monkeypatch):
    import recbole_cmr

    markets = ["ca", "de", "fr"]
    result = _fake_run_result(markets)
    uni99 = {}  # checkpoint -> (market, its uni99 per-user values)

    def evaluate_protocol(checkpoints, test_mode):
        tests, values = {}, {}
        for i, checkpoint in enumerate(sorted(set(checkpoints))):
            market = checkpoint.split("-")[1].removesuffix(".pth")
            tests[market] = {"ndcg@10": 0.3, "hit@10": 0.4}
            values[market] = uni99[checkpoint] = _values([f"{market}-u{j}" for j in range(3)], 20 + i)
        return tests, values

    monkeypatch.setattr(recbole_cmr, "run_recbole_cmr", lambda **kwargs: result)
    monkeypatch.setattr(harness, "evaluate_protocol", evaluate_protocol)
    monkeypatch.setattr(harness, "round_checkpoint", lambda *args, **kwargs: (None, None))
    out_file = tmp_path / "xmrec" / "FeCoSR-seed2020.json"
    harness.run_one("xmrec", "FeCoSR", 2020, out_file)
    record = json.loads(out_file.read_text())
    assert record["per_user"]["file"] == "FeCoSR-seed2020.per_user.npz"
    assert record["per_market"]["ca"]["test"]["uni99"]["ndcg@10"] == 0.3  # the numbers as before
    back = per_user.read_per_user(out_file)
    assert sorted(back) == markets
    for market in markets:
        for stage, entry in (("final", result["per_market"][market]),
                             ("federated", result["per_market"][market]["federated"])):
            got = back[market][stage]
            assert sorted(got) == ["full", "uni99"]
            assert {k: v.tolist() for k, v in got["full"].items()} == entry["per_user"]
            expected = uni99[entry["checkpoint"]]
            assert {k: v.tolist() for k, v in got["uni99"].items()} == expected


def test_ctr_write_run_keeps_each_rows_label_and_score(ctr_harness, per_user, tmp_path, monkeypatch):
    import recbole_cmr

    rows = {m: {"user": ["7", "7", "9"], "label_click": [1.0, 0.0, 1.0], "score_click": [0.9, 0.2, 0.6]}
            for m in ("s1", "s2")}
    result = {"per_market": {m: {"valid": {"auc": 0.7}, "test": {"auc": 0.7}, "per_user": v}
                             for m, v in rows.items()}}
    monkeypatch.setattr(recbole_cmr, "run_recbole_cmr", lambda **kwargs: result)
    out_file = tmp_path / "PF-MSMTrec-seed2020.json"
    ctr_harness.write_run("PFMSMTrec", "ml100k-scenarios", {"seed": 2020}, "PF-MSMTrec", 2020, "auc",
                          out_file)
    back = per_user.read_per_user(out_file)
    assert {m: {k: v.tolist() for k, v in back[m]["final"]["labeled"].items()} for m in back} == {
        m: {k: (v if k == "user" else np.float32(v).tolist()) for k, v in r.items()}
        for m, r in rows.items()}
    assert json.loads(out_file.read_text())["per_user"]["markets"]["s2"] == {"final": {"labeled": 3}}


def test_transfer_runs_keep_the_sources_per_user_values_under_each_target(harness, per_user,
                                                                          tmp_path, monkeypatch):
    """PretrainFinetune: the source's test under each target's model goes to the sidecar as
    stage ``after_transfer_<target>``, and the summary's source degradation pairs it with the
    source's own model on the source's users."""
    import recbole_cmr

    users = [f"ca-u{i}" for i in range(200)]
    own = _values(users, 1, ("ndcg@10",))
    worse = {"user": users, "ndcg@10": [v * 0.5 for v in own["ndcg@10"]]}
    result = {"train_mode": "transfer", "per_market": {
        "ca": {"valid": {"ndcg@10": 0.1}, "test": {"ndcg@10": float(np.mean(own["ndcg@10"]))},
               "per_user": own, "checkpoint": "ca.pth",
               "after_transfer": {"de": {"ndcg@10": float(np.mean(worse["ndcg@10"]))}},
               "after_transfer_per_user": {"de": worse}},
        "de": {"valid": {"ndcg@10": 0.1}, "test": {"ndcg@10": 0.2}, "checkpoint": "de.pth",
               "per_user": _values(["de-u1"], 2, ("ndcg@10",))}}}
    monkeypatch.setattr(recbole_cmr, "run_recbole_cmr", lambda **kwargs: result)
    monkeypatch.setattr(harness, "evaluate_protocol", lambda checkpoints, mode: ({}, {}))
    out_file = tmp_path / "PretrainFinetune-seed2020.json"
    harness.run_one("xmrec", "PretrainFinetune", 2020, out_file)
    back = per_user.read_per_user(out_file)["ca"]["after_transfer_de"]["full"]
    assert back["user"].tolist() == users and np.allclose(back["ndcg@10"], worse["ndcg@10"])
    record = json.loads(out_file.read_text())
    for market in record["per_market"].values():  # as summarise_protocol reads them
        market["test"].setdefault("uni99", market["test"]["full"])
    degradation = harness.source_degradation([record], tmp_path)
    row = degradation["targets"]["de"]
    assert degradation["source"] == "ca" and row["change_pct"] == pytest.approx(-50, abs=0.1)
    assert row["verdict"] == "missed" and row["ci_high"] < 0  # after - own: wholly below zero
    text = "\n".join(harness._degradation_markdown(degradation))
    assert "| de | " in text and "-50.0 %" in text


def test_pf_msmtrec_conflict_reports_become_a_summary_and_a_chart(ctr_harness, tmp_path):
    def report(cosine, a):
        return {"clients": ["x", "y", "z"], "expert_cosine": cosine, "a": {"x": a, "y": a, "z": a},
                "b": {"x": 0.1, "y": 0.2, "z": 0.3}}

    eye = np.eye(3)
    opposed = eye + np.array([[0, -0.5, 0.2], [-0.5, 0, 0.1], [0.2, 0.1, 0]])
    run = _ctr_run("PF-MSMTrec", 2020, {"x": (0.7, 0.6), "y": (0.7, 0.6), "z": (0.7, 0.6)})
    run["federated_rounds"] = {"best_round": 1, "history": [
        {"round": 0, "strategy": report(eye.tolist(), 0.1)},
        {"round": 1, "strategy": report(opposed.tolist(), 0.3)}]}
    summary = ctr_harness.summarise_runs([run], tmp_path)
    conflict = summary["conflict"][2020]
    assert conflict["cosine"] == pytest.approx([0.0, (-0.5 + 0.2 + 0.1) / 3])
    assert conflict["pairs"]["x/y"] == pytest.approx(-0.25) and conflict["a"]["x"] == [0.1, 0.3]
    text = ctr_harness.markdown(summary)
    assert "most opposed pair x/y -0.250" in text
    ctr_harness.conflict_chart(summary["conflict"], tmp_path / "conflict.png")
    import importlib.util

    charts = importlib.util.find_spec("matplotlib") is not None  # the [bench] extra
    assert (tmp_path / "conflict.png").exists() == charts


def test_data_variants_convert_once_and_read_their_base_yaml(entity_harness, ctr_harness, monkeypatch):
    """``--pair unrelated`` / ``--split gender``: the variant's dataset is converted into
    benchmarks/data, read with the shipped dataset's properties, and summarised apart."""
    import importlib

    shared = importlib.import_module("cross_market")  # the module the harnesses import
    calls = []
    monkeypatch.setattr(shared, "convert_once", lambda args, name: calls.append((args, name)))
    for module in (entity_harness, ctr_harness):
        for key in ("DATASET", "NAME", "DATA_SETTINGS"):
            monkeypatch.setattr(module, key, getattr(module, key))  # restored after the test
    folder = entity_harness.use_pair("unrelated")
    assert folder.name == "mkt-ml100k-unrelated" and entity_harness.DATASET == "ml100k-entities-unrelated"
    assert calls == [(["ml100k-entities", "--unrelated-source"], "ml100k-entities-unrelated")]
    settings = entity_harness.run_settings("MKT", 2020)[1]
    assert settings["data_path"] == str(shared.DATA) and settings["history_fields"]  # the yaml's
    assert ctr_harness.use_split("occupation").name == "pfmsmtrec-ml100k-occupation"
    settings = ctr_harness.run_settings("PF-MSMTrec", 2020)[1]
    assert settings["stopping_step"] == 10 and settings["eval_args"]["mode"] == "labeled"
    assert ctr_harness.use_split("age").name == "pfmsmtrec-ml100k"
    age = ctr_harness.run_settings("PF-MSMTrec", 2020)[1]
    assert "data_path" not in age and age["stopping_step"] == 10  # the shipped data, patience 10


def test_ant_paper_sizes_reach_every_model_and_the_pretraining_apart(ant_harness, monkeypatch):
    for key in ("NAME", "FOLDER", "SIZE_SETTINGS", "SIZE_SUFFIX"):
        monkeypatch.setattr(ant_harness, key, getattr(ant_harness, key))  # restored after the test
    monkeypatch.setattr(ant_harness, "CHOSEN", dict(ant_harness.CHOSEN))
    scaled = ant_harness.pretrained_file(2020)
    assert ant_harness.use_sizes("paper").name == "ant-scientific-paper"
    paper = {"hidden_size": 256, "inner_size": 256, "MAX_ITEM_LIST_LENGTH": 50}
    for name in ("SASRec-scratch@scientific-mm", "ANT-relearn@scientific-full"):
        settings = ant_harness.run_settings(name, 2020)[2]
        assert {k: settings[k] for k in paper} == paper
    assert {k: ant_harness.pretrain_settings(2020)[k] for k in paper} == paper
    assert ant_harness.pretrained_file(2020) != scaled
    assert ant_harness.run_settings("ANT-relearn@scientific-mm", 2020)[2]["pretrained"] == str(
        ant_harness.pretrained_file(2020))


def test_ant_pretraining_variants_change_the_pretraining_only(ant_harness, monkeypatch):
    for key in ("NAME", "FOLDER", "SIZE_SETTINGS", "SIZE_SUFFIX"):
        monkeypatch.setattr(ant_harness, key, getattr(ant_harness, key))  # restored after the test
    monkeypatch.setattr(ant_harness, "CHOSEN", dict(ant_harness.CHOSEN))
    default = ant_harness.pretrain_settings(2020)
    adaptation = ant_harness.run_settings("ANT-relearn@scientific-mm", 2020)[2]
    assert ant_harness.use_pretraining("ml100k").name == "ant-scientific-ml100k"
    assert ant_harness.pretrain_settings(2020) == {**default, "markets": ["ml100k"],
                                                   "source_market": ["ml100k"]}
    moved = ant_harness.run_settings("ANT-relearn@scientific-mm", 2020)[2]
    assert moved == {**adaptation, "pretrained": str(ant_harness.pretrained_file(2020))}
    assert moved["pretrained"] != adaptation["pretrained"]
    ant_harness.use_sizes("paper")  # the two choices combine
    assert ant_harness.FOLDER.name == "ant-scientific-paper-ml100k"
    ant_harness.use_pretraining("converged")
    assert ant_harness.pretrain_settings(2020)["epochs"] == 300
    assert ant_harness.pretrain_settings(2020)["markets"] == ["office", "ml100k"]


@pytest.mark.parametrize("pretraining", ["office+ml100k", "ml100k", "converged"])
def test_ant_pretraining_variants_pretrain_on_their_own_markets(ant_harness, monkeypatch,
                                                                 pretraining):
    """Each ``--pretraining``'s settings, read by the plugin's Config with the target's dataset
    yaml, name source markets that its pretraining loads (the ml100k variant once kept the yaml's
    ``[office, ml100k]`` and stopped at the start)."""
    from recbole_cmr import Config
    from recbole_cmr.modes import source_markets

    for key in ("NAME", "FOLDER", "SIZE_SETTINGS", "SIZE_SUFFIX"):
        monkeypatch.setattr(ant_harness, key, getattr(ant_harness, key))  # restored after the test
    monkeypatch.setattr(ant_harness, "CHOSEN", dict(ant_harness.CHOSEN))
    ant_harness.use_pretraining(pretraining)
    settings = ant_harness.pretrain_settings(2020)
    config = Config(model="ANT", dataset=ant_harness.TARGETS["scientific-mm"],
                    config_dict=settings, argv=[])
    markets = config["markets"]
    assert source_markets(config, dict.fromkeys(markets)) == markets == settings["markets"]


def test_fecosr_tuning_points_change_one_setting_and_read_validation_only(harness, tmp_path,
                                                                          monkeypatch):
    """``tune_fecosr.py``: FedAvg's budget of 11 points, each one FeCoSR setting off its yaml
    default; a fine-tuning point fine-tunes from the default point's federated stage (and refuses
    to run without it), a stage point from its own stage once that has finished here (else it
    trains it); a point's record holds validation and no test metric."""
    import recbole_cmr
    from recbole_cmr import Config

    tune = _load_harness("tune_fecosr")
    assert len(tune.GRID) == 11 and tune.GRID[0][0] == tune.DEFAULT
    defaults = Config(model="FeCoSR", dataset="xmrec-mini", argv=[])
    for name, kind, change in tune.GRID[1:]:
        [(key, value)] = change.items()
        assert defaults[key] != value, name
        assert (kind == "stage") == key.startswith("s2ce_")
    calls = []
    result = _fake_run_result(["ca", "de"])
    result.update(best_valid_score=0.11, federated_rounds={"best_round": 3, "rounds": 9})
    monkeypatch.setattr(recbole_cmr, "run_recbole_cmr",
                        lambda **kwargs: calls.append(kwargs["config_dict"]) or result)
    monkeypatch.setattr(tune, "round_checkpoint", lambda *args, **kwargs: (None, None))
    with pytest.raises(RuntimeError, match="run --only default first"):
        tune.run_point("xmrec", "adapter-rank4", tmp_path / "a.json")
    finished = {"default": "FeCoSR-stage.pth"}  # the stages that have finished here

    def stage_of(model, dataset, settings):
        names = [n for n in finished if tune.point_settings("xmrec", n) == settings]
        return (str(tmp_path / finished[names[0]]), {}) if names else (None, None)

    monkeypatch.setattr(tune, "round_checkpoint", stage_of)
    tune.run_point("xmrec", "adapter-rank4", tmp_path / "a.json")
    assert calls[-1]["adapter_rank"] == 4 and calls[-1]["fed_pretrained"].endswith("FeCoSR-stage.pth")
    tune.run_point("xmrec", "default", tmp_path / "d.json")
    assert calls[-1]["fed_pretrained"].endswith("FeCoSR-stage.pth")
    tune.run_point("xmrec", "s2ce-tau0.1", tmp_path / "b.json")
    assert "fed_pretrained" not in calls[-1] and calls[-1]["s2ce_tau"] == 0.1
    finished["s2ce-tau0.1"] = "FeCoSR-tau.pth"
    tune.run_point("xmrec", "s2ce-tau0.1", tmp_path / "b.json")
    assert calls[-1]["fed_pretrained"].endswith("FeCoSR-tau.pth") and calls[-1]["s2ce_tau"] == 0.1
    assert json.loads((tmp_path / "b.json").read_text())["federated_stage"] == "FeCoSR-tau.pth"
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["best_valid_ndcg@10"] == 0.11 and record["stage_valid_ndcg@10"] == 0.1
    assert record["federated_stage"] == "FeCoSR-stage.pth"
    assert "test" not in json.dumps({k: v for k, v in record.items() if k != "settings"})


def test_with_per_user_reruns_only_current_runs_without_a_sidecar(ctr_harness, per_user, tmp_path):
    """``--with-per-user``: a current record without a per-user sidecar (or whose sidecar file
    is gone) runs again; one with its sidecar, and without the flag any current one, is skipped."""
    values = {"s1": {"final": {"labeled": {"user": ["u1", "u2"], "auc": [0.5, 0.7]}}}}
    per_user.write_record({"name": "A", "seed": 1}, tmp_path / "A-seed1.json", values)
    per_user.write_record({"name": "B", "seed": 1}, tmp_path / "B-seed1.json")
    per_user.write_record({"name": "C", "seed": 1}, tmp_path / "C-seed1.json", values)
    per_user.sidecar_path(tmp_path / "C-seed1.json").unlink()
    ran = []

    def run(flag):
        ran.clear()
        ctr_harness.run_grid(["A", "B", "C"], [1], tmp_path, lambda record: True,
                             lambda name, seed, out: ran.append(name), with_per_user=flag)
        return list(ran)

    assert run(False) == []
    assert run(True) == ["B", "C"]


def test_a_record_keeps_numpy_numbers_as_numbers_and_rejects_what_json_cannot_hold(tmp_path):
    """Tuning records hold numpy scalars (valid scores): they are written as the numbers they
    hold (an int stays an int); anything else JSON cannot store is an error, and no file is left."""
    import numpy as np

    per_user = _load_harness("per_user")
    out_file = tmp_path / "point.json"
    per_user.write_record({"score": np.float32(0.25), "round": np.int64(7)}, out_file)
    assert json.loads(out_file.read_text()) == {"score": 0.25, "round": 7}
    with pytest.raises(TypeError, match="set"):
        per_user.write_record({"bad": {1}}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
