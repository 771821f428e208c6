"""``resume_dir``: a run cut off part-way and started again gives an uninterrupted run's numbers,
without training again what it had finished."""

import pytest
import torch
from recbole.trainer import Trainer

from recbole_cmr import run_recbole_cmr
from recbole_cmr.federated.server import FederatedServer
from recbole_cmr.quick_start import objective_function

from test_recbole_models import _settings, tiny  # noqa: F401  (fixture)

# dropout and a decaying learning rate: a resumed fit that lost the RNG or optimizer state differs
NOISY = {"hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.3, "learning_rate_decay": 0.8,
         "stopping_step": 10}


PACKAGES = {"BPR": "general_recommender", "CKE": "knowledge_aware_recommender",
            "DeepFM": "context_aware_recommender", "NARM": "sequential_recommender"}


class _Cut(Exception):
    """The process being killed."""


class _Epochs(list):
    cut = None


@pytest.fixture
def epochs(monkeypatch):
    """``(market, epoch)`` of every epoch a fit trains (federated rounds' local epochs are not
    fits); ``epochs.cut = (market, epoch)`` kills the run as that epoch starts."""
    trained = _Epochs()
    real = Trainer._train_epoch

    def spy(self, train_data, epoch_idx, *args, **kwargs):
        if getattr(self, "_in_fit", False):
            market = "+".join(self.checkpoint_info.get("markets") or [])
            if trained.cut == (market, epoch_idx):
                raise _Cut
            trained.append((market, epoch_idx))
        return real(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_epoch", spy)
    return trained


def _numbers(result):
    """Each market's valid and test results and per-user values, comparable with ``==``."""
    return {m: (r["valid"], r["test"], {k: getattr(v, "tolist", lambda: v)() for k, v in r["per_user"].items()})
            for m, r in result["per_market"].items()}


def test_a_local_run_cut_mid_fit_resumes_to_the_uninterrupted_numbers(two_markets, tmp_path, epochs):
    """Markets in, then jp: cut as jp's epoch 2 starts. Started again, in is not trained again,
    jp trains epochs 2 and 3 only, and every number is the uninterrupted run's."""
    settings = {**two_markets, **NOISY, "epochs": 4}
    full = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=settings)
    folder = str(tmp_path / "resume")
    epochs.clear()
    epochs.cut = ("jp", 2)
    with pytest.raises(_Cut):
        run_recbole_cmr(model="SASRec", dataset="xm2", config_dict={**settings, "resume_dir": folder})
    assert epochs == [("in", e) for e in range(4)] + [("jp", 0), ("jp", 1)]
    epochs.clear()
    epochs.cut = None
    resumed = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict={**settings, "resume_dir": folder})
    assert epochs == [("jp", 2), ("jp", 3)]
    assert _numbers(resumed) == _numbers(full)


@pytest.mark.parametrize("cut", ["round", "fine-tuning"])
def test_a_federated_run_with_fine_tuning_resumes_to_the_uninterrupted_numbers(
        two_markets, tmp_path, epochs, monkeypatch, cut):
    """FedAvg rounds, then each market's fine-tuning: cut after round 0 (the rounds continue from
    their checkpoint, named in resume_dir), or as jp's fine-tuning epoch 1 starts (no round and
    not in's fine-tuning is trained again)."""
    settings = {**two_markets, **NOISY, "train_mode": "federated", "fed_rounds": 3, "finetune": True,
                "epochs": 3}
    full = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict=settings)
    folder = str(tmp_path / "resume")
    rounds = []
    save = FederatedServer.save_checkpoint

    def spy(self, round_idx):
        save(self, round_idx)
        rounds.append(round_idx)
        if cut == "round" and round_idx == 0 and not resuming:
            raise _Cut

    monkeypatch.setattr(FederatedServer, "save_checkpoint", spy)
    resuming = False
    epochs.cut = ("jp", 1) if cut == "fine-tuning" else None
    with pytest.raises(_Cut):
        run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict={**settings, "resume_dir": folder})
    resuming, epochs.cut = True, None
    rounds.clear()
    epochs.clear()
    resumed = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2",
                              config_dict={**settings, "resume_dir": folder})
    if cut == "round":
        assert rounds == [1, 2]
        assert epochs == [(m, e) for m in ("in", "jp") for e in range(3)]
    else:
        assert rounds == [] and epochs == [("jp", 1), ("jp", 2)]
    assert _numbers(resumed) == _numbers(full)
    assert {m: r["federated"]["test"] for m, r in resumed["per_market"].items()} == \
        {m: r["federated"]["test"] for m, r in full["per_market"].items()}


def test_a_resume_dir_of_other_settings_is_an_error(two_markets, tmp_path):
    """The folder's state belongs to a run with another learning rate: an error naming the
    setting, nothing trained on top of it."""
    settings = {**two_markets, "epochs": 1, "resume_dir": str(tmp_path / "resume")}
    run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=settings)
    with pytest.raises(ValueError, match=r"resume_dir .*other settings \(learning_rate: "):
        run_recbole_cmr(model="SASRec", dataset="xm2", config_dict={**settings, "learning_rate": 0.01})


def test_a_finished_fit_is_taken_as_it_ended(two_markets, tmp_path, epochs):
    """Run twice with one resume_dir: the second trains nothing and tests the same models."""
    settings = {**two_markets, **NOISY, "epochs": 2, "resume_dir": str(tmp_path / "resume")}
    first = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=settings)
    epochs.clear()
    again = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=settings)
    assert epochs == []
    assert _numbers(again) == _numbers(first)
    assert torch.isfinite(torch.tensor([again["best_valid_score"]]))


@pytest.mark.parametrize("model", ["BPR", "CKE", "DeepFM", "NARM"])
def test_recbole_models_resume_to_the_uninterrupted_numbers(tiny, tmp_path, epochs, model):
    """RecBole's own models and trainers (negative sampling; a knowledge graph's loader, which
    holds two, and RecBole's KGTrainer; a context-aware and a sequential model): cut as epoch 1
    starts, started again, every number is an uninterrupted run's."""
    settings = {**_settings(tiny, tmp_path, PACKAGES[model], model), "epochs": 3}
    full = objective_function(config_dict=settings)
    folder = str(tmp_path / "resume")
    epochs.clear()
    epochs.cut = ("tiny", 1)
    with pytest.raises(_Cut):
        objective_function(config_dict={**settings, "resume_dir": folder})
    epochs.cut = None
    epochs.clear()
    resumed = objective_function(config_dict={**settings, "resume_dir": folder})
    assert sorted(set(epochs)) == [("tiny", 1), ("tiny", 2)]
    assert _numbers(resumed) == _numbers(full)


def test_federated_rounds_without_their_checkpoint_cannot_resume(two_markets, tmp_path):
    """saved=False writes no round checkpoint, so resume_dir could not continue the rounds: an
    error before anything is trained, naming both ways out."""
    settings = {**two_markets, "train_mode": "federated", "fed_rounds": 1,
                "resume_dir": str(tmp_path / "resume")}
    with pytest.raises(ValueError, match=r"resume_dir needs the federated round checkpoint.*saved=True"):
        run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict=settings, saved=False)


def test_a_pointer_to_a_round_checkpoint_never_written_starts_afresh(two_markets, tmp_path):
    """Cut before its first round ended, a run left only ``federated.json``: started again, the
    rounds start from round 0 and the pointer names the new checkpoint."""
    import json

    folder = tmp_path / "resume"
    settings = {**two_markets, "train_mode": "federated", "fed_rounds": 1, "resume_dir": str(folder)}
    expected = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2",
                               config_dict={k: v for k, v in settings.items() if k != "resume_dir"})
    pointer = folder / "federated.json"
    run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict=settings)  # writes the pointer
    kept = json.loads(pointer.read_text())
    pointer.write_text(json.dumps({**kept, "checkpoint": str(tmp_path / "gone.pth")}))
    again = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict=settings)
    assert json.loads(pointer.read_text())["checkpoint"] != str(tmp_path / "gone.pth")
    assert _numbers(again) == _numbers(expected)



class _Second:
    """A cut point ``(market, epoch)`` that kills the run the second time it is reached."""

    def __init__(self, at):
        self.at, self.seen = at, 0

    def __eq__(self, other):
        self.seen += other == self.at
        return other == self.at and self.seen == 2


def test_a_search_cut_in_its_second_trial_resumes_each_trial_from_its_own_state(
        two_markets, tmp_path, epochs):
    """``resume_dir`` with ``recbole_cmr.hyper_tuning``: each trial keeps its state apart, so a
    search cut as its second trial reaches jp's epoch 2 and started again retrains nothing of the
    first trial, continues the second at jp's epoch 2, and gives the trials of an uninterrupted
    search (with one folder shared, the second trial finds the first's state, written under other
    settings, and stops with an error)."""
    import pandas as pd

    from recbole_cmr.hyper_tuning import run_hyper

    params = tmp_path / "params.hyper"
    params.write_text("learning_rate choice [0.01,0.001]\n")
    settings = {**two_markets, **NOISY, "epochs": 4}

    def search(out, **extra):
        """The trials (parameters, valid and test numbers), in the order of their parameters."""
        run_hyper("SASRec", "xm2", str(params), config_dict={**settings, **extra},
                  output_dir=str(tmp_path / out))
        table = pd.read_csv(tmp_path / out / "SASRec-xm2.trials.csv")
        return table.sort_values("params").to_dict("records")

    full = search("full")
    assert full[0]["best_valid_score"] != full[1]["best_valid_score"]
    folder = str(tmp_path / "resume")
    epochs.clear()
    epochs.cut = _Second(("jp", 2))
    with pytest.raises(_Cut):
        search("cut", resume_dir=folder)
    trial = [("in", e) for e in range(4)] + [("jp", e) for e in range(4)]
    assert epochs == trial + trial[:6]
    epochs.clear()
    epochs.cut = None
    assert search("resumed", resume_dir=folder) == full
    assert epochs == [("jp", 2), ("jp", 3)]
