"""MKT and the multi-entity CTR path on a slice of the shipped ml100k-entities: entity schemas,
click histories from training clicks only (no look-ahead, no valid/test click of any entity), bad
input, CTRGAUC, HFA, PDL, what each ablation switch changes, the frozen MEM of stage 2, the
baselines and the benchmark harness's revision."""

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from recbole.data.interaction import cat_interactions
from sklearn.metrics import roc_auc_score
from torch import nn

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
            "checkpoint_dir": str(tmp_path / "saved")}


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


def _rows(split):
    """The rows of one RecBole split: DataFrame ``user_id, item_id, label, timestamp``."""
    return pd.DataFrame({f: split.inter_feat[f].numpy() for f in
                         ("user_id", "item_id", "label", "timestamp")})


def _history_items(split, field):
    """One line per history item of ``split``'s rows: DataFrame ``row, user_id, item_id,
    timestamp`` (the row's user and time)."""
    history = split.inter_feat[field].numpy()
    row, pos = np.nonzero(history)
    rows = _rows(split)
    return pd.DataFrame({"row": row, "user_id": rows["user_id"].to_numpy()[row],
                         "item_id": history[row, pos], "timestamp": rows["timestamp"].to_numpy()[row]})


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


def test_histories_hold_only_earlier_training_clicks_across_entities(entities):
    """For every row of every split of each entity: no history item sits in the valid or test
    split of the entity it came from, and each is a training click of that entity strictly
    before the row's time."""
    _, dataset = _dataset(entities, model="MKT")
    built = dataset.build()
    checked = 0
    for field, entity in entities["history_fields"].items():
        train = _rows(built[entity][0])
        first_click = train[train["label"] == 1].groupby(["user_id", "item_id"])["timestamp"].min()
        held_out = pd.concat([_rows(s) for s in built[entity][1:]])
        held_out = set(zip(held_out["user_id"], held_out["item_id"]))
        for market, splits in built.items():
            for split in splits:
                items = _history_items(split, field)
                leaked = set(zip(items["user_id"], items["item_id"])) & held_out
                assert not leaked, f"{field} of {market} rows holds {len(leaked)} held-out {entity} rows"
                clicked = first_click.reindex(pd.MultiIndex.from_frame(items[["user_id", "item_id"]]))
                assert (clicked.to_numpy() < items["timestamp"].to_numpy()).all()  # NaN: no click
                checked += len(items)
    assert checked > 0


def test_histories_are_the_last_earlier_training_clicks(entities):
    _, dataset = _dataset(entities)
    built = dataset.build()
    max_len = entities["history_max_len"]
    checked = 0
    for market, splits in built.items():
        for split in splits:
            rows = _rows(split)
            for field, entity in entities["history_fields"].items():
                train = _rows(built[entity][0])
                clicks = train[train["label"] == 1].sort_values("timestamp", kind="stable")
                for row in range(0, len(rows), 97):
                    user, time = rows["user_id"][row], rows["timestamp"][row]
                    mine = clicks[(clicks["user_id"] == user) & (clicks["timestamp"] < time)]
                    got = split.inter_feat[field][row]
                    assert got[got != 0].tolist() == mine["item_id"].tolist()[-max_len:]
                    assert len(got) == max_len
                    checked += int((got != 0).sum())
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


def test_given_history_is_checked_for_look_ahead_and_keeps_training_clicks(entities):
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
    earlier = mine["item_id:token"].iloc[:-1].tolist()  # all earlier clicks, some held out
    frame.loc[mine.index[-1], "hist_target:token_seq"] = " ".join(earlier)
    _write(entities, "target", "inter", frame)
    _, dataset = _dataset(settings)
    ds = dataset.market_datasets["target"]
    assert [ds.field2id_token["item_id"][i] for i in ds.inter_feat["hist_target"][mine.index[-1]]] == earlier
    built = dataset.build()["target"]
    token_id = ds.field2token_id
    train = _rows(built[0])
    in_train = set(train.loc[(train["user_id"] == token_id["user_id"][user]) & (train["label"] == 1),
                             "item_id"])
    kept = [i for i in (token_id["item_id"][t] for t in earlier) if i in in_train]
    assert 0 < len(kept) < len(earlier)
    test = _rows(built[2])
    row = np.flatnonzero((test["user_id"] == token_id["user_id"][user])
                         & (test["item_id"] == token_id["item_id"][later]).to_numpy())
    got = built[2].inter_feat["hist_target"][row[0]]
    assert got[got != 0].tolist() == kept[-entities["history_max_len"]:]
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
    assert all(not (split.inter_feat["hist_book"] != 0).any() for split in dataset.build()["movie"])


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


@pytest.fixture
def mkt_inputs(entities):
    """``(config, dataset, batch)``: MKT's config on the fixture, the target's training split and
    a batch of 64 source then 64 target training rows."""
    config, dataset = _dataset(entities, model="MKT")
    train, _, _ = data_preparation(config, dataset)
    batch = cat_interactions([next(iter(train[m]))[:64] for m in ("source", "target")])
    return config, train["target"]._dataset, batch


def _mkt(config, dataset, **switches):
    """An MKT in eval mode (no dropout) built from seed 0 with ``switches`` set."""
    config = copy.deepcopy(config)
    for key, value in switches.items():
        config[key] = value
    torch.manual_seed(0)
    return get_model("MKT")(config, dataset).eval()


HFA_LAYERS = {"cross_w", "cross_b", "implicit", "score"}


def test_without_hfa_the_specific_fields_are_aligned_unweighted(mkt_inputs, monkeypatch):
    config, dataset, batch = mkt_inputs
    full, plain = _mkt(config, dataset), _mkt(config, dataset, hfa=False)
    extra = set(full.state_dict()) - set(plain.state_dict())
    assert {k.split(".")[3] for k in extra} == HFA_LAYERS  # mem.hfa.<entity>.<layer>...
    assert set(plain.state_dict()) < set(full.state_dict())
    plain.load_state_dict({k: v for k, v in full.state_dict().items() if k not in extra})
    with torch.no_grad():
        assert not torch.allclose(full.mem.logits(batch), plain.mem.logits(batch), atol=1e-4)
        for hfa in full.mem.hfa.values():  # every field weighted 1: HFA's only difference gone
            monkeypatch.setattr(hfa, "importance", lambda spec: spec.new_ones(spec.shape[:2]))
        assert torch.allclose(full.mem.logits(batch), plain.mem.logits(batch), atol=1e-6)


def test_pdl_adds_its_weighted_term_and_without_it_the_loss_is_the_entities_bce(mkt_inputs):
    config, dataset, batch = mkt_inputs
    entity, labels = batch["entity"] - 1, batch["label"].float()
    assert set(entity.tolist()) == {0, 1}
    losses = {}
    for pdl in (True, False):
        model = _mkt(config, dataset, pdl=pdl)
        with torch.no_grad():
            rep = model.mem.represent(batch)
            logits = model.mem.logits(batch, rep)
            losses[pdl] = model.calculate_loss(batch).item()
        bce = sum(nn.functional.binary_cross_entropy_with_logits(logits[entity == k], labels[entity == k])
                  for k in (0, 1))
        cos = nn.functional.cosine_similarity(rep["knowledge"], rep["individual"], dim=-1)
        term = sum(cos[entity == k].mean() for k in (0, 1))
        expected = bce + config["pdl_weight"] * term if pdl else bce
        assert losses[pdl] == pytest.approx(expected.item(), rel=1e-6)
    assert losses[True] != pytest.approx(losses[False], rel=1e-6)


def test_without_gates_the_transferred_vectors_are_added_as_they_are(mkt_inputs):
    config, dataset, batch = mkt_inputs
    target = batch[torch.arange(64, 128)]
    plain, gated = _mkt(config, dataset, stage2_gates=False), _mkt(config, dataset)
    assert plain.gates is None and not any(k.startswith("gates.") for k in plain.state_dict())
    assert set(gated.gates) == {"user", "history", "shared", "knowledge"}
    for model in (plain, gated):
        model.set_stage("finetune")
    with torch.no_grad():
        rep = plain.mem.represent(target)
        raw = {"user": rep["user"], "history": rep["history"], "shared": rep["shared"],
               "specific": rep["knowledge"]}
        sent = plain.transferred(target)
        assert set(sent) == set(raw) and all(torch.equal(sent[k], raw[k]) for k in raw)
        logits = plain.target_logits(target)
        assert torch.equal(logits, plain.target_net.logits(target, added=raw))
        assert not torch.allclose(logits, plain.target_net.logits(target), atol=1e-4)
        rep = gated.mem.represent(target)
        gated_sent = gated.transferred(target)
        for name, key in (("user", "user"), ("history", "history"), ("shared", "shared"),
                          ("specific", "knowledge")):
            gate = gated.gates[key]
            expected = gate.value(rep[key]) * torch.sigmoid(gate.gate(rep[key]))
            assert torch.allclose(gated_sent[name], expected, atol=1e-6)
            assert not torch.allclose(expected, rep[key], atol=1e-3)


@pytest.mark.parametrize("model,extra", [
    ("EntityDNN", {"pooled_markets": ["target"], "valid_markets": ["target"]}),
    ("EntityDNN", {"finetune": True, "finetune_markets": ["target"]}),
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


def test_entity_harness_reruns_records_of_older_code_and_tunes_the_target_only(monkeypatch):
    """benchmarks/multi_entity.py: a record without the current code revision (made before the
    histories were leak-free) is stale; MKT keeps its own default of fine-tuning the target."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))  # it imports the other harnesses' helpers
    spec = importlib.util.spec_from_file_location("multi_entity", folder / "multi_entity.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    _, settings = harness.run_settings("MKT", 2020)
    record = {"name": "MKT", "seed": 2020, "settings": json.loads(json.dumps(settings))}
    assert harness.is_current({**record, "revision": harness.REVISION})
    assert not harness.is_current(record)  # no revision: before the fix
    assert not harness.is_current({**record, "revision": harness.REVISION - 1})
    assert "finetune_markets" not in settings and not harness.SETTINGS.get("finetune_markets")
    assert harness.run_settings("Finetune", 2020)[1]["finetune_markets"] == [harness.TARGET]


def test_hyper_tuning_objective_selects_on_the_target_entity(entities):
    result = objective_function({**_for("MKT", entities), "model": "MKT", "dataset": "mlent",
                                 "valid_markets": ["target"]}, saved=False)
    assert result["best_valid_score"] == result["per_market"]["target"]["valid"]["auc"]
    assert result["best_valid_result"] == result["per_market"]["target"]["valid"]
    assert result["test_result"] == result["per_market"]["target"]["test"]
