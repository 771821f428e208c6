"""MKT and the multi-entity CTR path on a slice of the shipped ml100k-entities: entity schemas,
click histories without look-ahead, bad input, CTRGAUC, HFA, PDL, the frozen MEM of stage 2 and
the baselines."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from recbole.data.interaction import cat_interactions
from sklearn.metrics import roc_auc_score

from recbole_cmr import Config, create_dataset, data_preparation, objective_function, run_recbole_cmr
from recbole_cmr.compat import load_checkpoint
from recbole_cmr.config import plugin_model_settings
from recbole_cmr.data.convert.atomic import AtomicDataset, write_dataset
from recbole_cmr.evaluator import ctr_gauc
from recbole_cmr.model.context_aware_recommender.mkt import HFA, polarized_distribution_loss
from recbole_cmr.utils import get_model, resource_path

from conftest import shared_data

SHIPPED = Path(resource_path("dataset", "ml100k-entities"))
N_USERS = 40
MKT_FAST = {"epochs": 1, "show_progress": False, "state": "WARNING", "train_batch_size": 512,
            "embedding_size": 4, "expert_mlp_sizes": [16], "tower_mlp_sizes": [8],
            "mlp_hidden_sizes": [16, 8], "hfa_width": 8, "spec_width": 8, "bottom_mlp_sizes": [16],
            "attention_mlp_sizes": [8], "history_max_len": 5}


def _dataset_yaml():
    with open(resource_path("properties", "dataset", "ml100k-entities.yaml")) as f:
        return yaml.safe_load(f)


@pytest.fixture
def entities(tmp_path):
    """The first users of the shipped ml100k-entities, as dataset ``mlent``."""
    root = tmp_path / "data"
    target = root / "mlent"
    target.mkdir(parents=True)
    for entity in ("source", "target"):
        frame = pd.read_csv(SHIPPED / f"{entity}.inter", sep="\t", dtype=str)
        users = sorted(frame["user_id:token"].unique(), key=int)[:N_USERS]
        frame[frame["user_id:token"].isin(users)].to_csv(target / f"{entity}.inter", sep="\t", index=False)
        for ext in ("user", "item"):
            shutil.copy(SHIPPED / f"{entity}.{ext}", target / f"{entity}.{ext}")
    return {**_dataset_yaml(), **MKT_FAST, "data_path": str(root),
            "checkpoint_dir": str(tmp_path / "saved"), "finetune_markets": ["target"]}


def _for(model, settings):
    """``settings`` without the model settings ``model`` does not have."""
    owners = plugin_model_settings()
    return {k: v for k, v in settings.items() if model in owners.get(k, [model])}


def _run(model, settings, **kwargs):
    return run_recbole_cmr(model=model, dataset="mlent", config_dict=_for(model, settings), **kwargs)


def _dataset(settings, model="EntityDNN", **extra):
    config = Config(model=model, dataset="mlent", config_dict=_for(model, {**settings, **extra}))
    return config, create_dataset(config)


def _raw(settings, entity):
    return pd.read_csv(Path(settings["data_path"]) / "mlent" / f"{entity}.inter", sep="\t", dtype=str)


# ---------------------------------------------------------------- data
def test_entities_share_users_and_one_item_table(entities):
    config, dataset = _dataset(entities)
    source, target = (dataset.market_datasets[m] for m in ("source", "target"))
    assert source.field2id_token["user_id"].tolist() == target.field2id_token["user_id"].tolist()
    items = source.item_feat
    assert items.equals(target.item_feat)
    entity = items["entity"].to_numpy()
    assert set(entity[source.item_ids]) == {1} and set(entity[target.item_ids]) == {2}
    # each entity's specific fields are filled for its own items only
    assert (items["title_cluster"].to_numpy()[source.item_ids] == 0).all()
    assert (items["title_cluster"].to_numpy()[target.item_ids] > 0).all()
    assert (items["release_year"].to_numpy()[target.item_ids] == 0).all()
    assert (items["release_year"].to_numpy()[source.item_ids] > 0).mean() > 0.99
    train, _, _ = data_preparation(config, dataset)
    batch = next(iter(train["target"]))
    assert batch["hist_source"].shape[1] == batch["hist_target"].shape[1] == 5
    assert set(batch["entity"].tolist()) == {2}


def test_histories_are_earlier_clicks_of_the_entity(entities):
    _, dataset = _dataset(entities)
    clicks = {}
    for entity in ("source", "target"):
        raw = _raw(entities, entity)
        raw = raw[raw["label:float"].astype(float) == 1]
        clicks[entity] = raw.assign(t=raw["timestamp:float"].astype(float))
    ds = dataset.market_datasets["target"]
    feat = ds.inter_feat
    tokens = ds.field2id_token
    checked = 0
    for row in range(0, len(feat), 97):
        user = tokens["user_id"][feat["user_id"][row]]
        time = feat["timestamp"][row]
        for field, entity in (("hist_source", "source"), ("hist_target", "target")):
            got = [tokens["item_id"][i] for i in feat[field][row]]
            mine = clicks[entity][(clicks[entity]["user_id:token"] == user) & (clicks[entity]["t"] < time)]
            mine = mine.sort_values("t", kind="stable")
            assert got == mine["item_id:token"].tolist()[-5:]
            checked += len(got)
    assert checked > 0


def _write(settings, entity, ext, frame):
    frame.to_csv(Path(settings["data_path"]) / "mlent" / f"{entity}.{ext}", sep="\t", index=False)


def test_row_carrying_another_entitys_field_is_an_error(entities):
    items = pd.read_csv(SHIPPED / "source.item", sep="\t", dtype=str)
    items["title_cluster:token"] = ""
    items.loc[3, "title_cluster:token"] = "7"
    _write(entities, "source", "item", items)
    with pytest.raises(ValueError, match=r"source\.item, data line 4.*\[title_cluster\].*\[target\]"):
        _dataset(entities)
    items["title_cluster:token"] = ""  # an empty column is no row carrying the field
    _write(entities, "source", "item", items)
    _dataset(entities)


def test_missing_entity_field_and_bad_settings_are_errors(entities):
    with pytest.raises(ValueError, match=r"field \[price\] of entity \[target\]"):
        _dataset(entities, entity_fields={"source": ["release_year", "genre"], "target": ["price"]})
    with pytest.raises(ValueError, match=r"entities \['books'\]"):
        _dataset(entities, entity_fields={"books": ["genre"]})
    with pytest.raises(ValueError, match="shared_user_ids"):
        _dataset(entities, shared_user_ids=False)
    with pytest.raises(ValueError, match="train_mode local"):
        _dataset(entities, train_mode="local")
    no_time = {**entities["load_col"], "inter": ["user_id", "item_id", "label"]}
    with pytest.raises(ValueError, match=r"time field \[timestamp\] of .*source\.inter"):
        _dataset(entities, load_col=no_time, eval_args={**entities["eval_args"], "order": "RO"})


def test_given_history_is_checked_for_look_ahead(entities):
    frame = _raw(entities, "target")
    user = frame["user_id:token"].iloc[0]
    mine = frame[(frame["user_id:token"] == user) & (frame["label:float"] == "1")]
    first, later = mine["item_id:token"].iloc[0], mine["item_id:token"].iloc[-1]
    frame["hist_target:token_seq"] = ""
    _write(entities, "target", "inter", frame)
    src = _raw(entities, "source")
    src["hist_target:token_seq"] = ""
    _write(entities, "source", "inter", src)
    load = {**entities["load_col"], "inter": [*entities["load_col"]["inter"], "hist_target"]}
    settings = {**entities, "load_col": load, "history_fields": {"hist_target": "target"}}
    row = mine.index[-1]
    frame.loc[row, "hist_target:token_seq"] = first  # an earlier click: fine
    _write(entities, "target", "inter", frame)
    _, dataset = _dataset(settings)
    ds = dataset.market_datasets["target"]
    assert [ds.field2id_token["item_id"][i] for i in ds.inter_feat["hist_target"][row]] == [first]
    frame.loc[mine.index[0], "hist_target:token_seq"] = later  # its own future click
    _write(entities, "target", "inter", frame)
    with pytest.raises(ValueError, match=r"target\.inter: field \[hist_target\] of row 1 .*earlier clicks"):
        _dataset(settings)


def test_douban_domains_load_as_entities(tmp_path):
    """Real multi-domain rows (douban sample: book / movie / music, overlapping users)."""
    raw = pd.read_csv(shared_data("ctr_samples", "douban_sample.csv"), dtype=str)
    raw = raw.rename(columns={"rating": "label", "time_bin": "timestamp"}).sort_values(
        ["user_id", "timestamp"], kind="stable")
    users = raw[["user_id", "living_place"]].drop_duplicates("user_id")
    markets = {d: raw[raw["domain"] == d] for d in ("book", "movie", "music")}
    write_dataset(AtomicDataset(
        name="douban", fmt="test", markets=markets, shared_users=True,
        fields={"user_id": "token", "item_id": "token", "label": "float", "timestamp": "float"},
        users={d: users[users["user_id"].isin(f["user_id"])] for d, f in markets.items()},
        user_fields={"user_id": "token", "living_place": "token"}), tmp_path / "data")
    config = Config(model="DeepFM", dataset="douban", config_dict={
        "data_path": str(tmp_path / "data"), "USER_ID_FIELD": "user_id", "LABEL_FIELD": "label",
        "TIME_FIELD": "timestamp", "shared_user_ids": True, "train_mode": "pooled",
        "history_fields": {"hist_book": "book", "hist_movie": "movie"}, "history_max_len": 3,
        "load_col": None, "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO",
                                        "group_by": "user", "mode": "labeled"}})
    dataset = create_dataset(config)
    movie = dataset.market_datasets["movie"]
    both = set(movie.inter_feat["user_id"]) & set(dataset.market_datasets["book"].inter_feat["user_id"])
    assert both  # one user id space
    assert len(both) > 100  # users in two domains keep one id
    # every user's rows share one time_bin: no click is strictly earlier, so every history is empty
    assert raw.groupby("user_id")["timestamp"].nunique().max() == 1
    assert sum(len(h) for h in movie.inter_feat["hist_book"]) == 0


# ---------------------------------------------------------------- metric and layers
def test_ctr_gauc_equals_direct_computation():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 6, 200)
    trues = (rng.random(200) < 0.4).astype(float)
    trues[users == 5] = 1.0  # one class only: skipped
    preds = np.round(rng.random(200), 2)  # ties
    total, weight = 0.0, 0
    for u in range(5):
        rows = users == u
        total += rows.sum() * roc_auc_score(trues[rows], preds[rows])
        weight += rows.sum()
    assert ctr_gauc(preds, trues, users) == pytest.approx(total / weight, abs=1e-12)
    assert np.isnan(ctr_gauc(preds[:3], np.ones(3), users[:3]))


def test_hfa_importance_in_open_interval_and_pdl_of_orthogonal_vectors():
    torch.manual_seed(0)
    hfa = HFA(n_fields=3, d=4, width=5, cross_layers=2)
    spec = torch.randn(64, 3, 4) * 10
    scores = hfa.importance(spec)
    assert scores.shape == (64, 3) and (scores > 0).all() and (scores < 2).all()
    assert hfa(spec).shape == (64, 5)
    g_com = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]])
    g_ind = torch.tensor([[0, 5.0, 0], [0, 0, 1.0], [4.0, 0, 0]])
    entity = torch.tensor([0, 1, 1])
    assert polarized_distribution_loss(g_com, g_ind, entity, 2).item() == 0.0
    assert polarized_distribution_loss(g_com, g_com, entity, 2).item() == pytest.approx(2.0)


# ---------------------------------------------------------------- MKT stages
def test_mkt_two_stages_keep_the_mem_bit_identical(entities):
    result = _run("MKT", entities)
    target = result["per_market"]["target"]
    assert set(target["test"]) == {"auc", "ctrgauc", "logloss"}
    assert 0 < target["test"]["ctrgauc"] < 1
    before = load_checkpoint(target["pooled"]["checkpoint"])["state_dict"]
    after = load_checkpoint(target["checkpoint"])
    assert after["stage"] == "finetune"
    mem = [k for k in before if k.startswith("mem.")]
    assert mem and all(torch.equal(before[k], after["state_dict"][k]) for k in mem)
    assert any(not torch.equal(before[k], after["state_dict"][k]) for k in before
               if k.startswith(("target_net.", "gates.")))
    # stage 2 alone from the stage-1 checkpoint: the same pooled stage
    alone = _run("MKT", {**entities, "pretrained": target["pooled"]["checkpoint"]})
    assert alone["per_market"]["target"]["pooled"]["test"] == target["pooled"]["test"]


def test_source_rows_never_reach_the_stage2_loss(entities):
    config, dataset = _dataset(entities, model="MKT")
    train, _, _ = data_preparation(config, dataset)
    model = get_model("MKT")(config, train["target"]._dataset)
    model.set_stage("finetune")
    model.train()
    assert not model.mem.training  # the frozen MEM stays in eval mode while training
    model.eval()  # no dropout: the two losses below are comparable
    source = next(iter(train["source"]))[:64]
    target = next(iter(train["target"]))[:64]
    both = cat_interactions([source, target])
    assert model.calculate_loss(both).item() == pytest.approx(model.calculate_loss(target).item())
    model.zero_grad()
    model.calculate_loss(source).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all((g == 0).all() for g in grads)
    assert all(not p.requires_grad for p in model.mem.parameters())


@pytest.mark.parametrize("model,extra", [
    ("EntityDNN", {"pooled_markets": ["target"], "valid_markets": ["target"]}),
    ("EntityDNN", {"finetune": True}),
    ("SharedBottom", {}),
    ("PLE", {}),
    ("MKT", {"hfa": False, "pdl": False, "stage2_gates": False}),
])
def test_baselines_and_ablations_run(entities, model, extra):
    result = _run(model, {**entities, **extra}, saved=False)
    test = result["per_market"]["target"]["test"]
    assert set(test) == {"auc", "ctrgauc", "logloss"}
    assert 0 < test["auc"] < 1 and 0 < test["ctrgauc"] < 1 and test["logloss"] > 0
    if extra.get("finetune"):  # the Finetune baseline: pooled on both, then tuned on the target
        assert "pooled" in result["per_market"]["target"]
        assert "pooled" not in result["per_market"]["source"]


def test_hyper_tuning_objective_selects_on_the_target_entity(entities):
    result = objective_function({**_for("MKT", entities), "model": "MKT", "dataset": "mlent",
                                 "valid_markets": ["target"]}, saved=False)
    assert result["best_valid_score"] == result["per_market"]["target"]["valid"]["auc"]
    assert result["best_valid_result"] == result["per_market"]["target"]["valid"]
    assert result["test_result"] == result["per_market"]["target"]["test"]
