"""End-to-end runs: RecBole parity, reproducibility, checkpoints, pooled training, result files."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from recbole.config import Config as RecBoleConfig
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed

from recbole_cmr import get_trainer, load_data_and_model, run_recbole_cmr
from conftest import SHIPPED


def _plain_recbole(dataset, settings, monkeypatch):
    """RecBole 1.2.1 itself, step by step as its run_recbole does (its checkpoints reload
    weights-only after ``import recbole_cmr``: no env flag)."""
    config = RecBoleConfig(model="SASRec", dataset=dataset, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    data = recbole_create_dataset(config)
    train, valid, test = recbole_data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    trainer = Trainer(config, SASRec(config, train._dataset))
    _, best_valid = trainer.fit(train, valid, saved=True)
    return best_valid, trainer.evaluate(test, load_best_model=True)


@pytest.mark.parametrize("mode", [{"valid": "full", "test": "uni99"},
                                  {"valid": "uni99", "test": "full"}])
def test_local_market_inside_seven_markets_is_plain_recbole(two_markets, tmp_path, monkeypatch, mode):
    """train_mode local: market jp of the 7-market xmrec-mini trains and evaluates exactly as
    plain RecBole 1.2.1 on a copy of jp.inter alone (every valid and test metric, full ranking
    and uni99, each protocol once for model selection and once for testing)."""
    (tmp_path / "data" / "jp").mkdir()
    shutil.copy(SHIPPED / "jp.inter", tmp_path / "data" / "jp" / "jp.inter")
    settings = {
        **two_markets,
        "train_neg_sample_args": None,
        "eval_args": {**two_markets["eval_args"], "mode": mode},
    }
    valid, test = _plain_recbole("jp", settings, monkeypatch)
    result = run_recbole_cmr(model="SASRec", dataset="xmrec-mini", saved=False, config_dict={
        **settings, "data_path": str(SHIPPED.parent), "train_mode": "local"})
    assert len(result["per_market"]) == 7
    assert dict(result["per_market"]["jp"]["valid"]) == dict(valid)
    assert dict(result["per_market"]["jp"]["test"]) == dict(test)


def test_same_seed_same_metrics_and_seed_matters(two_markets):
    first = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=two_markets, saved=False)
    again = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=two_markets, saved=False)
    other = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict={**two_markets, "seed": 7},
                            saved=False)
    assert first["per_market"] == again["per_market"]
    assert first["test_result"] != other["test_result"]


def test_checkpoint_reload_gives_identical_test_metrics(two_markets):
    result = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=two_markets)
    for market in ("in", "jp"):
        checkpoint_file = result["per_market"][market]["checkpoint"]
        # Named by model, dataset, market, time and process (parallel runs never share a file).
        name = os.path.basename(checkpoint_file)
        assert name.startswith(f"SASRec-xm2-{market}-") and name.endswith(f"-{os.getpid()}.pth")
        assert torch.load(checkpoint_file, weights_only=True)["markets"] == [market]
        config, model, dataset, train, valid, test = load_data_and_model(checkpoint_file)
        assert list(test) == [market]
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        reloaded = trainer.evaluate(test[market], load_best_model=False)
        assert dict(reloaded) == dict(result["per_market"][market]["test"])


def test_pooled_training_reports_every_market(two_markets):
    result = run_recbole_cmr(model="SASRec", dataset="xm2",
                             config_dict={**two_markets, "train_mode": "pooled"})
    assert set(result["per_market"]) == {"in", "jp"}
    checkpoints = {r["checkpoint"] for r in result["per_market"].values()}
    assert len(checkpoints) == 1
    state = torch.load(checkpoints.pop(), weights_only=True)
    assert state["markets"] == ["in", "jp"] and state["train_mode"] == "pooled"
    macro = (result["per_market"]["in"]["test"]["ndcg@10"] + result["per_market"]["jp"]["test"]["ndcg@10"]) / 2
    assert result["test_result"]["ndcg@10"] == pytest.approx(macro, abs=1e-6)
    assert result["best_valid_result"] is not None


def test_results_table_is_saved_beside_the_log(two_markets):
    result = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=two_markets, saved=False)
    json_path, csv_path = result["results_files"]
    table = pd.read_csv(csv_path, index_col="market")
    assert list(table.index) == ["in", "jp", "macro"]
    assert {"hit@10", "ndcg@10", "mrr@10", "valid ndcg@10"} <= set(table.columns)
    saved = json.load(open(json_path))
    assert saved["test_result"]["ndcg@10"] == pytest.approx(table.loc["macro", "ndcg@10"])


def test_results_of_runs_sharing_a_log_name_get_numbered_files(tmp_path):
    """Two runs in the same second share a log name: the second run's results go to ``-2``,
    a third's to ``-3``; none overwrites another's."""
    from recbole_cmr.results import save_results

    log_path = str(tmp_path / "SASRec-xm2-Dec-06-2026_14-00-00.log")
    frame = pd.DataFrame({"ndcg@10": [0.1]}, index=pd.Index(["macro"], name="market"))
    paths = [save_results({"run": i}, frame, log_path) for i in range(3)]
    stem = log_path[:-len(".log")]
    assert [p[0] for p in paths] == [f"{stem}.results.json", f"{stem}-2.results.json",
                                     f"{stem}-3.results.json"]
    assert [p[1] for p in paths] == [f"{stem}.results.csv", f"{stem}-2.results.csv",
                                     f"{stem}-3.results.csv"]
    assert [json.load(open(p[0]))["run"] for p in paths] == [0, 1, 2]


def test_recbole_general_model_learns_through_the_plugin(two_markets):
    settings = {**two_markets, "learning_rate": 0.01}
    untrained = run_recbole_cmr(model="BPR", dataset="xm2", saved=False,
                                config_dict={**settings, "epochs": 0})
    trained = run_recbole_cmr(model="BPR", dataset="xm2", saved=False,
                              config_dict={**settings, "epochs": 3})
    assert set(trained["per_market"]) == {"in", "jp"}
    for market in ("in", "jp"):
        assert trained["per_market"][market]["test"]["hit@10"] > \
            untrained["per_market"][market]["test"]["hit@10"]
    # 3 epochs: several times the hit rate of the random initial model
    assert trained["test_result"]["hit@10"] > 3 * untrained["test_result"]["hit@10"]


def test_two_runs_in_one_process_write_their_own_logs_and_results(two_markets, tmp_path):
    """Hyper-tuning and notebooks run several models in one process: each run keeps its own
    log file and results files, named by its own model and dataset."""
    settings = {**two_markets, "epochs": 1, "state": "INFO"}
    first = run_recbole_cmr(model="SASRec", dataset="xm2", saved=False, config_dict=settings)
    second = run_recbole_cmr(model="GRU4Rec", dataset="xm2", saved=False, config_dict=settings)
    again = run_recbole_cmr(model="GRU4Rec", dataset="xm2", saved=False, config_dict=settings)
    files = [r["results_files"] for r in (first, second, again)]
    assert len({f for pair in files for f in pair}) == 6
    for result, (json_path, csv_path) in zip((first, second, again), files):
        model = result["model"]
        assert os.path.basename(json_path).startswith(f"{model}-xm2-")
        assert os.path.dirname(json_path) == str(tmp_path / "log" / model)
        saved = json.load(open(json_path))
        assert saved["model"] == model and saved["test_result"] == dict(result["test_result"])
        assert pd.read_csv(csv_path, index_col="market").loc["macro", "ndcg@10"] == \
            pytest.approx(result["test_result"]["ndcg@10"])
    [sasrec_log] = (tmp_path / "log" / "SASRec").glob("*.log")
    text = sasrec_log.read_text()
    assert "SASRec (local) on xm2" in text and "GRU4Rec" not in text
    assert "GRU4Rec (local) on xm2" in "".join(
        p.read_text() for p in (tmp_path / "log" / "GRU4Rec").glob("*.log"))


def test_federated_train_mode_through_the_quick_start(two_markets):
    settings = {**two_markets, "train_mode": "federated", "fed_rounds": 2}
    result = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=settings)
    assert set(result["per_market"]) == {"in", "jp"}
    for market, res in result["per_market"].items():
        state = torch.load(res["checkpoint"], weights_only=True)
        assert state["markets"] == [market] and state["train_mode"] == "federated"
    assert result["best_valid_result"] is not None
    rounds = result["federated_rounds"]
    scores = [r["valid_score"] for r in rounds["history"]]
    assert rounds["rounds"] == len(scores) == 2 and None not in scores
    assert rounds["best_round"] == scores.index(max(scores))
    assert result["best_valid_score"] == pytest.approx(max(scores), abs=1e-6)
    assert rounds["rounds_wall_s"] == pytest.approx(sum(r["round_time"] for r in rounds["history"]), abs=0.1)
    saved = json.load(open(result["results_files"][0]))
    assert saved["federated_rounds"]["best_round"] == rounds["best_round"]
    # two rounds under a patience of 10: the budget, not early stopping, ended them; the log says so
    assert rounds["budget_ended"] is True and saved["federated_rounds"]["budget_ended"] is True
    [log] = Path(result["results_files"][0]).parent.glob("*.log")
    assert "fed_rounds=2 ended the federated rounds before early stopping did" in log.read_text()


def test_budget_ended_is_true_only_when_the_rounds_ran_out_without_early_stopping():
    from types import SimpleNamespace

    from recbole_cmr.federated.server import FederatedServer

    ended = FederatedServer.budget_ended.fget
    assert ended(SimpleNamespace(stopped=False, history=[0, 1], rounds=2))
    assert not ended(SimpleNamespace(stopped=False, history=[0], rounds=2))  # rounds remain
    # early stopping, or a stage taken from a finished run (fed_pretrained), marks it stopped
    assert not ended(SimpleNamespace(stopped=True, history=[0, 1], rounds=2))


def test_federated_run_resumes_from_its_round_checkpoint(two_markets, tmp_path):
    settings = {**two_markets, "train_mode": "federated", "fed_rounds": 3, "stopping_step": 10}
    full = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=settings)
    (tmp_path / "saved").rename(tmp_path / "saved_full")
    run_recbole_cmr(model="SASRec", dataset="xm2", config_dict={**settings, "fed_rounds": 2})
    [round_file] = (tmp_path / "saved").glob("SASRec-xm2-federated-*.pth")
    resumed = run_recbole_cmr(model="SASRec", dataset="xm2",
                              config_dict={**settings, "fed_resume": str(round_file)})
    assert {m: r["test"] for m, r in resumed["per_market"].items()} == \
        {m: r["test"] for m, r in full["per_market"].items()}


def test_a_moved_round_checkpoint_resumes_with_its_clients_folder_beside_it(two_markets, tmp_path):
    """With RecBole's relative ``checkpoint_dir: saved/`` the clients' state lies beside the
    round checkpoint (``saved/<run>.clients/``, not ``saved/saved/...``), and the pair moved to
    another folder resumes from there."""
    settings = {**two_markets, "train_mode": "federated", "fed_rounds": 2, "stopping_step": 10,
                "checkpoint_dir": "saved/"}
    run_recbole_cmr(model="SASRec", dataset="xm2", config_dict={**settings, "fed_rounds": 1})
    [round_file] = (tmp_path / "saved").glob("SASRec-xm2-federated-*.pth")
    clients = round_file.with_suffix(".clients")
    assert sorted(p.name for p in clients.iterdir()) == ["in.pth", "jp.pth"]
    assert not (tmp_path / "saved" / "saved").exists()
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    round_file.rename(moved / round_file.name)
    clients.rename(moved / clients.name)
    resumed = run_recbole_cmr(model="SASRec", dataset="xm2",
                              config_dict={**settings, "fed_resume": str(moved / round_file.name)})
    assert resumed["federated_rounds"]["rounds"] == 2
    assert sorted(p.name for p in (moved / clients.name).iterdir()) == ["in.pth", "jp.pth"]
