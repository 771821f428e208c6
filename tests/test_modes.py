"""Train modes: every mode makes a market's copy one way (seeded, re-pointed), reads only its own
settings, and reports the markets it trains."""

import pytest
import torch

from recbole_cmr import Config, create_dataset, data_preparation, run_recbole_cmr
from recbole_cmr import modes
from recbole_cmr.model.sequential_recommender.market_softmax import foreign_item_mask

from test_mkt import _for, entities  # noqa: F401  (fixture)

MS = {"model": "FedAvgSASRec", "market_softmax": True}


@pytest.fixture
def copies(monkeypatch):
    """Records ``(market, stage, base)`` of every market copy and checks the copy: a new object,
    its foreign-item mask (market_softmax) the market's own."""
    made = []
    real = modes.market_model

    def spy(config, base, market, train, stage="finetune"):
        model = real(config, base, market, train, stage)
        made.append((market, stage))
        assert model is not base
        if getattr(model, "foreign_items", None) is not None:
            own = foreign_item_mask(train[market]._dataset, model.n_items)
            assert torch.equal(model.foreign_items.cpu(), own), f"market {market}: pooled mask kept"
        return model

    monkeypatch.setattr(modes, "market_model", spy)
    return made


def test_every_mode_makes_each_fine_tuned_copy_through_market_model(two_markets, copies):
    """transfer, pooled + finetune and federated + finetune: one copy per fine-tuned market,
    each re-pointed at that market (``copies`` checks the mask)."""
    base = {**two_markets, **MS, "epochs": 1, "fed_rounds": 1}
    runs = {
        "transfer": ({"train_mode": "transfer", "fed_rounds": None}, ["in"]),
        "pooled": ({"train_mode": "pooled", "finetune": True, "fed_rounds": None}, ["in", "jp"]),
        "federated": ({"train_mode": "federated", "finetune": True}, ["in", "jp"]),
    }
    for mode, (settings, tuned) in runs.items():
        copies.clear()
        config = {k: v for k, v in {**base, **settings}.items() if v is not None}
        result = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict=config, saved=False)
        assert sorted(copies) == [(m, "finetune") for m in tuned], mode
        assert all(torch.isfinite(torch.tensor(list(result["per_market"][m]["test"].values()))).all()
                   for m in tuned)


def test_pooled_copies_fine_tune_on_their_own_market_mask(two_markets, copies):
    """Pooled on jp, fine-tuned on in with market_softmax: in's copy trains over in's items
    (with jp's mask in's positives are masked and the loss is infinite)."""
    result = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", saved=False, config_dict={
        **two_markets, **MS, "epochs": 1, "train_mode": "pooled", "finetune": True,
        "pooled_markets": ["jp"], "finetune_markets": ["in"]})
    assert copies == [("in", "finetune")]
    assert "pooled" in result["per_market"]["in"] and "pooled" not in result["per_market"]["jp"]
    assert result["test_result"] == result["per_market"]["in"]["test"]  # the macro: what was tuned


@pytest.mark.parametrize("mode", ["transfer", "pooled"])
def test_a_markets_fine_tuning_does_not_depend_on_what_ran_before(two_markets, mode):
    """The market's copy is seeded from its own seed: the random state left by earlier work
    (another market's fine-tuning, dropout draws) does not change its numbers. (Each run has
    its own loaders, whose shuffling RecBole seeds from ``seed``.)"""
    settings = {**two_markets, "epochs": 1, "train_mode": mode, "hidden_dropout_prob": 0.5,
                **({"finetune": True} if mode == "pooled" else {})}
    config = Config(model="PretrainFinetune", dataset="xm2", config_dict=settings)
    train, valid, test = data_preparation(config, create_dataset(config))
    base, _ = modes.first_stage(config, train, valid, {"jp": test["jp"]}, ["jp"], ["jp"], "jp",
                                False, False)
    results = []
    for draws in (0, 1000):
        train["in"].generator.manual_seed(config["seed"])  # as a new run's loader
        torch.rand(draws)  # what a market fine-tuned before would leave behind
        tuned = modes.finetune_local(config, {"in": base}, train, valid, test, False, False)
        results.append((tuned["in"]["valid"], tuned["in"]["test"]))
    assert results[0] == results[1]


def test_mkt_fine_tunes_and_scores_only_its_target_by_default(entities):  # noqa: F811
    settings = {k: v for k, v in _for("MKT", entities).items() if k != "finetune_markets"}
    result = run_recbole_cmr(model="MKT", dataset="mlent", config_dict=settings, saved=False)
    per_market = result["per_market"]
    assert "pooled" in per_market["target"] and "pooled" not in per_market["source"]
    assert result["test_result"] == per_market["target"]["test"]
    assert result["best_valid_result"] == per_market["target"]["valid"]


@pytest.mark.parametrize("argv, message", [
    (["--train_mode=local", "--fed_rounds=3"], "fed_rounds is not read by train_mode local: only train_mode federated"),
    (["--train_mode=local", "--eta_l=0.01"], "eta_l is not read by train_mode local"),
    (["--train_mode=pooled", "--fed_strategy=fedadam"], "fed_strategy is not read by train_mode pooled"),
    (["--train_mode=local", "--finetune=True"], "finetune is not read by train_mode local"),
    (["--train_mode=transfer", "--finetune=False"], "finetune is not read by train_mode transfer"),
    (["--train_mode=local", "--pretrained=x.pth"], "pretrained is not read by train_mode local"),
    (["--train_mode=federated", "--finetune=True", "--finetune_markets=['in']"],
     "finetune_markets is not read by train_mode federated: only train_mode pooled"),
    (["--train_mode=pooled", "--finetune_markets=['in']"], "finetune_markets is not read by train_mode pooled"),
    (["--train_mode=pooled", "--finetune_lr_scale=0.1"], "finetune_lr_scale is not read by train_mode pooled"),
    (["--train_mode=federated", "--pooled_markets=['in']"], "pooled_markets is not read by train_mode federated"),
    (["--train_mode=local", "--source_market=in"], "source_market is not read by train_mode local"),
])
def test_a_setting_the_train_mode_does_not_read_is_an_error(two_markets, argv, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        Config(model="SASRec", dataset="xm2", config_dict=two_markets, argv=argv)


@pytest.mark.parametrize("argv", [
    ["--train_mode=federated", "--fed_rounds=3", "--eta_l=0.01"],
    ["--train_mode=pooled", "--finetune=True", "--finetune_markets=['in']", "--finetune_lr_scale=0.1"],
    ["--train_mode=transfer", "--source_market=jp", "--finetune_params=['item_embedding*']"],
    ["--train_mode=local", "--fed_rounds=50", "--finetune=False"],  # the defaults: nothing ignored
])
def test_settings_the_train_mode_reads_are_accepted(two_markets, argv):
    Config(model="SASRec", dataset="xm2", config_dict=two_markets, argv=argv)


def test_harness_settings_keep_what_each_train_mode_reads(two_markets):
    from recbole_cmr.config import mode_settings

    shared = {**two_markets, "fed_rounds": 80, "eta_l": 0.003}
    assert "fed_rounds" not in mode_settings("SASRec", "xm2", {**shared, "train_mode": "local"})
    assert mode_settings("FedAvgSASRec", "xm2", shared) == shared  # its yaml: federated
    kept = mode_settings("PretrainFinetune", "xm2", shared)  # its yaml: transfer
    assert "fed_rounds" not in kept and "eta_l" not in kept and kept["epochs"] == shared["epochs"]


def test_a_recbole_models_own_setting_is_neither_overridden_nor_gated(two_markets):
    """MacridVAE's ``tau`` (its softmax temperature) is also the name of a federated strategy's
    setting: the plugin's default must not override the model's, and setting it is no error."""
    assert Config(model="MacridVAE", dataset="xm2", config_dict=two_markets)["tau"] == 0.1
    assert Config(model="MacridVAE", dataset="xm2", config_dict={**two_markets, "tau": 0.2})["tau"] == 0.2
    assert Config(model="SASRec", dataset="xm2", config_dict=two_markets)["tau"] is None
    with pytest.raises(ValueError, match="tau is not read by train_mode local"):
        Config(model="SASRec", dataset="xm2", config_dict={**two_markets, "tau": 0.2})
