"""Multi-market dataset: shared item ids, RecBole's loaders, per-market catalogues."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from recbole.data.dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader, TrainDataLoader
from recbole.sampler import RepeatableSampler, Sampler
from recbole.utils import init_seed

from recbole_cmr import Config, create_dataset, data_preparation
from recbole_cmr.data import pooled_train_data
from recbole_cmr.data.dataloader import MarketFullSortEvalDataLoader, MarketNegSampleEvalDataLoader
from recbole_cmr.data.sampler import MarketRepeatableSampler, MarketSampler

from conftest import FAST  # noqa: E402

pytestmark = pytest.mark.usefixtures("shared_text_embeddings")  # MiniLM encodes once per run


def _build(settings, prepare=True, **extra):
    """Config, dataset and loaders; shared ids (``train_mode: federated``) unless ``extra`` says."""
    config = Config(model="SASRec", dataset="xm2",
                    config_dict={**settings, "train_mode": "federated", **extra})
    dataset = create_dataset(config)
    return config, dataset, data_preparation(config, dataset) if prepare else None


def _tokens(dataset, market):
    ds = dataset.market_datasets[market]
    ids = np.asarray(ds.inter_feat[ds.iid_field])
    return ds.field2id_token[ds.iid_field][ids]


def test_one_item_token_is_one_id_in_every_market(two_markets):
    _, dataset, _ = _build(two_markets, prepare=False)
    in_ds, jp_ds = dataset.market_datasets["in"], dataset.market_datasets["jp"]
    assert in_ds.item_num == jp_ds.item_num == dataset.item_num
    assert in_ds.field2token_id["item_id"] is jp_ds.field2token_id["item_id"]
    shared = set(_tokens(dataset, "in")) & set(_tokens(dataset, "jp"))
    assert len(shared) > 10  # real XMRec markets share products
    for token in list(shared)[:20]:
        item_id = dataset.item_token_id[token]
        assert item_id in dataset.catalogue("in") and item_id in dataset.catalogue("jp")
    # every interaction still points at its original token (read back from the file)
    raw = np.loadtxt(f"{two_markets['data_path']}/xm2/in.inter", dtype=str, delimiter="\t",
                     skiprows=1, usecols=1)
    assert sorted(_tokens(dataset, "in")) == sorted(raw)


def test_local_mode_keeps_plain_recboles_ids_in_every_market(two_markets, tmp_path):
    """train_mode local: each market is the dataset plain RecBole makes of its file alone."""
    import shutil

    from recbole.config import Config as RecBoleConfig
    from recbole.data import create_dataset as recbole_create_dataset

    _, local, _ = _build(two_markets, prepare=False, train_mode="local")
    assert not local.shared_ids
    with pytest.raises(ValueError, match="own item ids"):
        local.item_num
    for market in ("in", "jp"):
        ds = local.market_datasets[market]
        (tmp_path / "solo" / market).mkdir(parents=True)
        shutil.copy(f"{two_markets['data_path']}/xm2/{market}.inter", tmp_path / "solo" / market)
        alone = recbole_create_dataset(RecBoleConfig(
            model="SASRec", dataset=market, config_dict={
                **two_markets, "data_path": str(tmp_path / "solo"), "train_neg_sample_args": None}))
        assert list(ds.field2id_token["item_id"]) == list(alone.field2id_token["item_id"])
        assert ds.item_num == alone.item_num == len(local.catalogue(market)) + 1
        assert list(ds.inter_feat["item_id"]) == list(alone.inter_feat["item_id"])


def test_users_stay_per_market_unless_pooled(two_markets):
    _, local, _ = _build(two_markets, prepare=False)
    assert local.market_datasets["in"].user_num != local.market_datasets["jp"].user_num
    _, pooled, (train, _, _) = _build(two_markets, train_mode="pooled")
    users = [set(np.asarray(ds.inter_feat["user_id"])) for ds in pooled.market_datasets.values()]
    assert not users[0] & users[1]
    loader = pooled_train_data(pooled.config, train)
    assert len(loader._dataset) == sum(len(t._dataset) for t in train.values())


@pytest.mark.parametrize("model, sampler_class", [("SASRec", MarketRepeatableSampler),
                                                   ("BPR", MarketSampler)])
def test_loaders_are_recboles_classes(two_markets, model, sampler_class):
    """Per market and phase: RecBole's loader class for the phase's mode, over that market's
    split, with RecBole's sampler class for the model (repeatable for sequential models), set to
    the phase and drawing from the market's catalogue; full ranking adds only the foreign mask,
    sampled ranking collates a batch at once (test_sampled_eval)."""
    eval_args = {**two_markets["eval_args"], "mode": {"valid": "full", "test": "uni99"}}
    config = Config(model=model, dataset="xm2", config_dict={
        **two_markets, "train_mode": "federated", "eval_args": eval_args})
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    recbole_sampler = RepeatableSampler if model == "SASRec" else Sampler
    assert issubclass(sampler_class, recbole_sampler)
    for market in ("in", "jp"):
        catalogue = dataset.catalogue(market)
        assert type(train[market]) is TrainDataLoader
        assert type(valid[market]) is MarketFullSortEvalDataLoader
        assert isinstance(valid[market], FullSortEvalDataLoader)
        assert valid[market].is_sequential == (model == "SASRec")
        assert type(test[market]) is MarketNegSampleEvalDataLoader
        assert isinstance(test[market], NegSampleEvalDataLoader)
        assert test[market].neg_sample_args["distribution"] == "uniform"
        assert test[market].neg_sample_args["sample_num"] == 99
        splits = [loader._dataset for loader in (train[market], valid[market], test[market])]
        assert {split.market for split in splits} == {market}
        assert all(split.market_train is splits[0] for split in splits)
        samplers = [train[market]._sampler, valid[market]._sampler, test[market]._sampler]
        if model == "SASRec":  # CE: no training negatives
            assert samplers[0] is None and config["train_neg_sample_args"]["distribution"] == "none"
            samplers = samplers[1:]
        for sampler, phase in zip(samplers[::-1], ("test", "valid", "train")):
            assert type(sampler) is sampler_class and sampler.phase == phase
            assert list(sampler.catalogue) == list(catalogue)
        foreign = np.setdiff1d(np.arange(1, dataset.item_num), catalogue)
        assert valid[market].item_mask.nonzero().squeeze(1).tolist() == foreign.tolist()


def test_uni99_negatives_come_from_the_market(two_markets):
    eval_args = {**two_markets["eval_args"], "mode": "uni99"}
    _, dataset, (_, valid, test) = _build(two_markets, eval_args=eval_args)
    for market in ("in", "jp"):
        catalogue = set(dataset.catalogue(market).tolist())
        assert len(catalogue) < dataset.item_num - 1  # the market lacks some items
        for loader in (valid[market], test[market]):
            seen = set()
            for interaction, *_ in loader:
                seen |= set(interaction["item_id"].tolist())
            assert seen <= catalogue
            assert len(seen) > 50


def _scores_seen(trainer, monkeypatch):
    """Every score matrix the trainer's collector receives (``[B, n_items]`` each, masked)."""
    seen = []
    collect = trainer.eval_collector.eval_batch_collect
    monkeypatch.setattr(trainer.eval_collector, "eval_batch_collect",
                        lambda scores, *rest: seen.append(scores.clone()) or collect(scores, *rest))
    return seen


@pytest.mark.parametrize("model", ["SASRec", "BPR"])
def test_full_ranking_masks_foreign_items(two_markets, monkeypatch, model):
    """Through ``trainer.evaluate``: items foreign to the market score -inf in every row; the
    market's items keep their scores, except (general models) RecBole's training history."""
    from recbole_cmr.trainer import new_market_trainer

    config = Config(model=model, dataset="xm2", config_dict={**two_markets, "train_mode": "federated"})
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    for market in ("in", "jp"):
        _, trainer = new_market_trainer(config, train[market]._dataset, market, [market])
        seen = _scores_seen(trainer, monkeypatch)
        trainer.evaluate(valid[market], load_best_model=False)
        scores = torch.cat(seen)
        foreign = torch.ones(dataset.item_num, dtype=torch.bool)
        foreign[torch.as_tensor(dataset.catalogue(market))] = False
        assert 0 < foreign.sum() < dataset.item_num - 1
        assert torch.isneginf(scores[:, foreign]).all()
        allowed = ~foreign
        allowed[0] = False
        finite = torch.isfinite(scores)
        if model == "BPR":  # rows are users in id order; their training items stay masked
            users = valid[market].uid_list
            for row, user in enumerate(users.tolist()):
                history = valid[market].uid2history_item[user]
                assert len(history) and torch.isneginf(scores[row, history]).all()
                finite[row, history] = True
        assert finite[:, allowed].all()


SEQUENCES = {  # market a (u2's test target i3 repeats its input); market b: items foreign to a
    "a": {"u1": ["i1", "i2", "i3", "i4", "i5"], "u2": ["i3", "i6", "i3", "i2", "i3"],
          "u3": ["i2", "i1", "i6", "i4"]},
    "b": {"v1": ["i7", "i8", "i9"], "v2": ["i8", "i9", "i10"]},
}


def _sequence_markets(two_markets, **extra):
    """Dataset ``seq`` (markets of SEQUENCES) with settings for a hand-checked full ranking."""
    root = Path(two_markets["data_path"]) / "seq"
    root.mkdir(exist_ok=True)
    for market, users in SEQUENCES.items():
        lines = [f"{u}\t{i}\t{t}" for u, items in users.items() for t, i in enumerate(items)]
        (root / f"{market}.inter").write_text(
            "user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(lines) + "\n")
    return {**two_markets, "MAX_ITEM_LIST_LENGTH": 3, "topk": [3], "metric_decimal_place": 10,
            "eval_batch_size": 2, **extra}


def _fixed_score_trainer(config, train, market):
    """A SASRec trainer whose model scores item ``j`` ``-j`` for every row (lower ids first)."""
    from recbole_cmr.trainer import new_market_trainer

    model, trainer = new_market_trainer(config, train[market]._dataset, market, [market])
    n_items = train[market]._dataset.item_num
    model.full_sort_predict = lambda inter: -torch.arange(n_items, dtype=torch.float).repeat(
        len(inter), 1)
    return trainer


def _by_hand(loader, masked, k):
    """Hit, NDCG, MRR @k of the loader's rows, ranking the target among the items that are not
    padding and not in ``masked(input items, target)`` by the fixed scores ``-id``."""
    split = loader._dataset.inter_feat
    rows = zip(split["item_id_list"].tolist(), split["item_length"].tolist(),
               split["item_id"].tolist())
    hits, ndcgs, mrrs = [], [], []
    for sequence, length, target in rows:
        excluded = {0} | set(masked(sequence[:length], target))
        rank = 1 + sum(1 for j in range(1, target) if j not in excluded)  # lower id = higher score
        hits.append(float(rank <= k))
        ndcgs.append(1 / np.log2(rank + 1) if rank <= k else 0.0)
        mrrs.append(1 / rank if rank <= k else 0.0)
    return {f"hit@{k}": np.mean(hits), f"ndcg@{k}": np.mean(ndcgs), f"mrr@{k}": np.mean(mrrs)}


def test_history_masking_masks_the_input_sequence_but_never_the_target(two_markets, monkeypatch):
    """``mask_history_items``: through ``trainer.evaluate``, every item of a row's input sequence
    scores -inf except the row's target (u2 repeats it), and the metrics are the hand-computed
    ranking without them; off, only foreign items are masked, and the numbers differ."""
    results = {}
    for on in (True, False):
        config = Config(model="SASRec", dataset="seq", config_dict=_sequence_markets(
            two_markets, train_mode="federated", mask_history_items=on))
        dataset = create_dataset(config)
        train, _, test = data_preparation(config, dataset)
        foreign = set(range(1, dataset.item_num)) - set(dataset.catalogue("a").tolist())
        trainer = _fixed_score_trainer(config, train, "a")
        seen = _scores_seen(trainer, monkeypatch)
        results[on] = trainer.evaluate(test["a"], load_best_model=False)

        def masked(sequence, target):
            return foreign | ((set(sequence) - {target}) if on else set())

        expected = _by_hand(test["a"], masked, 3)
        assert dict(results[on]) == pytest.approx(expected, abs=1e-9)
        split = test["a"]._dataset.inter_feat
        scores = torch.cat(seen)
        assert len(scores) == len(split) == len(SEQUENCES["a"])
        for row, (sequence, length, target) in enumerate(zip(
                split["item_id_list"].tolist(), split["item_length"].tolist(),
                split["item_id"].tolist())):
            history = [i for i in sequence[:length] if i != target]
            assert torch.isneginf(scores[row, history]).all() == on
            assert torch.isfinite(scores[row, target])
            assert torch.isneginf(scores[row, sorted(foreign)]).all()
        repeated = [t in s[:n] for s, n, t in zip(split["item_id_list"].tolist(),
                                                  split["item_length"].tolist(),
                                                  split["item_id"].tolist())]
        assert any(repeated)  # u2: the target is in its input and still ranked
    assert results[True] != results[False]


def test_history_masking_off_is_recboles_full_ranking(two_markets):
    """Off (the default) and with no foreign items (train_mode local), a market's evaluation is
    RecBole's own: its loader's batches, its trainer's numbers."""
    from recbole.trainer import Trainer

    config = Config(model="SASRec", dataset="seq",
                    config_dict=_sequence_markets(two_markets, train_mode="local"))
    assert config["mask_history_items"] is False
    dataset = create_dataset(config)
    train, _, test = data_preparation(config, dataset)
    trainer = _fixed_score_trainer(config, train, "a")
    ours = trainer.evaluate(test["a"], load_best_model=False)
    recboles = FullSortEvalDataLoader(config, test["a"]._dataset, test["a"]._sampler)
    assert next(iter(test["a"]))[1] is None  # nothing to mask beyond RecBole
    assert Trainer(config, trainer.model).evaluate(recboles, load_best_model=False) == ours
    assert dict(ours) == pytest.approx(_by_hand(test["a"], lambda *_: set(), 3), abs=1e-9)


@pytest.mark.parametrize("model, extra, error", [
    ("BPR", {}, r"mask_history_items: True .* BPR is not sequential"),
    ("SASRec", {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                              "mode": {"valid": "uni99", "test": "full"}}},
     r"mask_history_items: True needs full ranking, but eval_args mode is \{'valid': 'uni99'\}"),
    ("SASRec", {"mask_history_items": "yes"}, r"mask_history_items='yes' is not a bool: expected a bool"),
])
def test_history_masking_where_it_cannot_apply_is_an_error(two_markets, model, extra, error):
    settings = _sequence_markets(two_markets, **{"train_mode": "federated",
                                                 "mask_history_items": True, **extra})
    with pytest.raises(ValueError, match=error):  # a wrong type already in Config, the rest here
        config = Config(model=model, dataset="seq", config_dict=settings)
        data_preparation(config, create_dataset(config))


def _peak_bytes(step):
    """Peak CPU memory (bytes) that torch allocates while ``step()`` runs (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def test_foreign_mask_memory_is_flat_in_the_foreign_items(two_markets):
    """A 100k-item shared catalogue of which market ``a`` holds 6: one evaluation batch of a
    general model (RecBole's history plus the foreign mask) allocates at most twice its score
    matrix, not index tensors of rows x foreign items."""
    n_extra = 100_000
    settings = _sequence_markets(two_markets, train_mode="federated",
                                 item_vocabulary="seq.vocab")
    items = [i for users in SEQUENCES.values() for seq in users.values() for i in seq]
    tokens = list(dict.fromkeys(items)) + [f"x{i}" for i in range(n_extra)]
    (Path(settings["data_path"]) / "seq" / "seq.vocab").write_text("\n".join(tokens) + "\n")
    config = Config(model="BPR", dataset="seq",
                    config_dict={**settings, "eval_batch_size": 16 * (len(tokens) + 1)})
    dataset = create_dataset(config)
    train, _, test = data_preparation(config, dataset)
    from recbole_cmr.trainer import new_market_trainer

    _, trainer = new_market_trainer(config, train["a"]._dataset, "a", ["a"])
    trainer.tot_item_num = dataset.item_num
    n_foreign = dataset.item_num - 1 - len(dataset.catalogue("a"))
    assert n_foreign >= n_extra
    out = {}
    peak = _peak_bytes(lambda: out.update(batch=trainer._full_sort_batch_eval(next(iter(test["a"])))))
    scores = out["batch"][1]
    assert scores.shape == (len(SEQUENCES["a"]), dataset.item_num)
    assert torch.isneginf(scores).sum(1).min() >= n_foreign  # the mask was applied
    assert peak <= 2 * scores.numel() * scores.element_size()


def test_market_statistics_are_logged(two_markets, caplog):
    """Each market's RecBole statistics are logged with the real counts of its .inter file
    (RecBole counts the padding user; its item count is the shared id table), and the dataset's
    summary (logged by run_recbole_cmr) gives each market's own users, items and rows."""
    with caplog.at_level("INFO"):
        _, dataset, _ = _build({**two_markets, "state": "INFO"}, prepare=False)
    text = re.sub(r"\x1b\[[0-9;]*m", "", caplog.text)
    for market in ("in", "jp"):
        frame = pd.read_csv(f"{two_markets['data_path']}/xm2/{market}.inter", sep="\t", dtype=str)
        users, items = frame["user_id:token"].nunique(), frame["item_id:token"].nunique()
        block = text.split(f"[market {market}]")[1].split("[market ")[0]
        stats = dict(re.findall(r"^(The number of \w+|Average actions of \w+): (\S+)$", block, re.M))
        assert int(stats["The number of users"]) == users + 1
        assert int(stats["The number of inters"]) == len(frame)
        assert int(stats["The number of items"]) == dataset.item_num > items + 1
        assert float(stats["Average actions of users"]) == pytest.approx(len(frame) / users)
        assert float(stats["Average actions of items"]) == pytest.approx(len(frame) / items)
        assert f"{market}: {len(frame)} inters, {users} users, {items} items" in str(dataset)


def test_item_text_embeddings_from_the_shared_item_file(two_markets, tmp_path, caplog):
    config, dataset, _ = _build({**two_markets, "text_cache_dir": str(tmp_path / "cache")},
                                prepare=False)
    tokens = list(dataset.item_tokens[1:])
    with_text = tokens[:40]
    rows = [f"{t}\tProduct {t} electronics accessory" for t in with_text]
    rows += ["NOT_IN_ANY_MARKET_1\tstray text", "NOT_IN_ANY_MARKET_2\tstray text"]
    item_file = tmp_path / "data" / "xm2" / "xm2.item"
    item_file.write_text("item_id:token\ttitle:token_seq\n" + "\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        emb = dataset.item_text_embedding
    assert emb.shape == (dataset.item_num, 384)
    assert emb[0].abs().sum() == 0  # padding
    has_text = emb.abs().sum(dim=1) > 0
    assert has_text.sum() == len(with_text)
    assert bool(has_text[dataset.item_token_id[with_text[0]]])
    missing = len(tokens) - len(with_text)
    assert f"{missing} of {len(tokens)} items have no text" in caplog.text
    assert "ignoring text of 2 tokens that are not in the item vocabulary" in caplog.text
    assert "NOT_IN_ANY_MARKET_1" in caplog.text
    # cached on disk: a fresh dataset reuses the file instead of encoding again
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_item_text_requested_without_item_file(two_markets):
    _, dataset, _ = _build(two_markets, prepare=False)
    with pytest.raises(ValueError, match=r"has no item text: .*xm2\.item does not exist"):
        dataset.item_text_embedding


def _write_user_files(two_markets):
    """``.user`` files for ``in`` and ``jp``: age (float) and country (token) per user."""
    root = f"{two_markets['data_path']}/xm2"
    profiles = {"in": ("IN", 30.0), "jp": ("JP", 50.0)}
    for market, (country, age) in profiles.items():
        users = sorted(set(np.loadtxt(f"{root}/{market}.inter", dtype=str, delimiter="\t",
                                      skiprows=1, usecols=0)))
        rows = [f"{u}\t{age + i % 3}\t{country}\t{'shared' if i % 2 else market}"
                for i, u in enumerate(users)]
        with open(f"{root}/{market}.user", "w") as f:
            f.write("user_id:token\tage:float\tcountry:token\tsegment:token\n" + "\n".join(rows) + "\n")
    return {**two_markets, "load_col": None}


def _user_rows(ds, split_user_feat=None):
    """``{user token: (age, country token)}`` from a market dataset (or a pooled split's table)."""
    feat = ds.user_feat if split_user_feat is None else split_user_feat
    uid, tokens = np.asarray(feat["user_id"]), ds.field2id_token
    return {tokens["user_id"][u]: (float(np.asarray(feat["age"])[i]),
                                   tokens["country"][int(np.asarray(feat["country"])[i])])
            for i, u in enumerate(uid) if u != 0}


def test_token_fields_share_one_vocabulary_across_markets(two_markets):
    settings = _write_user_files(two_markets)
    _, dataset, _ = _build(settings, prepare=False)
    in_ds, jp_ds = dataset.market_datasets["in"], dataset.market_datasets["jp"]
    for field in ("country", "segment"):
        assert list(in_ds.field2id_token[field]) == list(jp_ds.field2id_token[field])
    country = in_ds.field2token_id["country"]
    assert country["IN"] != country["JP"]
    for ds, token in ((in_ds, "IN"), (jp_ds, "JP")):  # every user reads its own market's country
        rows = _user_rows(ds)
        users = set(ds.field2id_token["user_id"][np.unique(np.asarray(ds.inter_feat["user_id"]))])
        assert {rows[u][1] for u in users} == {token}
    assert in_ds.field2token_id["segment"]["shared"] == jp_ds.field2token_id["segment"]["shared"]
    # user ids stay per market; a market-private field keeps per-market ids too
    assert in_ds.user_num != jp_ds.user_num
    _, private, _ = _build(settings, prepare=False, market_private_fields=["segment"])
    ids = [private.market_datasets[m].field2token_id["segment"] for m in ("in", "jp")]
    assert set(ids[0]) == {"[PAD]", "in", "shared"} and set(ids[1]) == {"[PAD]", "jp", "shared"}
    with pytest.raises(ValueError, match=r"market_private_fields \['colour'\].*market \[in\]"):
        _build(settings, prepare=False, market_private_fields=["colour"])


def test_pooled_users_keep_their_own_markets_features(two_markets):
    settings = _write_user_files(two_markets)
    _, dataset, (train, _, _) = _build(settings, train_mode="pooled")
    pooled = pooled_train_data(dataset.config, train)._dataset
    rows = _user_rows(pooled)
    expected = {}
    for market, (country, age) in {"in": ("IN", 30.0), "jp": ("JP", 50.0)}.items():
        users = sorted(set(np.loadtxt(f"{settings['data_path']}/xm2/{market}.inter", dtype=str,
                                      delimiter="\t", skiprows=1, usecols=0)))
        expected.update({f"{market}:{u}": (age + i % 3, country) for i, u in enumerate(users)})
    seen = set(pooled.field2id_token["user_id"][np.unique(np.asarray(pooled.inter_feat["user_id"]))])
    assert {u[:3] for u in seen} == {"in:", "jp:"}
    assert {u: rows[u] for u in seen} == {u: expected[u] for u in seen}
    batch = next(iter(pooled_train_data(dataset.config, train)))  # the loader joins them too
    countries = pooled.field2id_token["country"][batch["country"].numpy()]
    users = pooled.field2id_token["user_id"][batch["user_id"].numpy()]
    assert all(c == expected[u][1] for u, c in zip(users, countries))


def _tiny_markets(root):
    """Market ``a`` (4 items; user u1 has all of them) and market ``b`` (3 other items)."""
    (root / "tiny").mkdir(parents=True)
    rows = {"a": [("u1", i, t) for t, i in enumerate(["i1", "i2", "i3", "i4"])]
            + [("u2", i, t) for t, i in enumerate(["i2", "i1", "i3"])],
            "b": [(u, i, t) for u in ("v1", "v2") for t, i in enumerate(["i5", "i6", "i7"])]}
    for market, inters in rows.items():
        lines = [f"{u}\t{i}\t{t}" for u, i, t in inters]
        (root / "tiny" / f"{market}.inter").write_text(
            "user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(lines) + "\n")


def test_sampling_over_a_market_everyone_bought_out_is_a_clear_error(two_markets, tmp_path):
    """uni99 for a general model (negatives exclude all the user's items) in market ``a``: u1 has
    every item of its catalogue, so RecBole's sampler (which checks the global item count) would
    loop forever; the plugin names market and cure."""
    import signal

    _tiny_markets(tmp_path / "data")
    settings = {**two_markets, "eval_args": {**two_markets["eval_args"], "mode": "uni99"}}

    def hang(*_):
        raise TimeoutError("the sampler loops forever")

    signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match=r"Market \[a\]: 1 user\(s\) .* every one of the "
                                             r"market's 4 items.*user_inter_num_interval"):
            config = Config(model="BPR", dataset="tiny",
                            config_dict={**settings, "train_mode": "federated"})
            data_preparation(config, create_dataset(config))
    finally:
        signal.alarm(0)
    # sequential models' negatives exclude only the positive item: uni99 works there
    config = Config(model="SASRec", dataset="tiny", config_dict=settings)
    data_preparation(config, create_dataset(config))


def test_catalogue_size_metrics_count_the_markets_own_items(two_markets, monkeypatch):
    """ItemCoverage and GiniIndex divide by the market's catalogue, and AveragePopularity reads the
    market's own training counts, also when one pooled model is evaluated per market."""
    from recbole.evaluator.metrics import GiniIndex

    from recbole_cmr.trainer import new_market_trainer

    metrics = {"metrics": ["Hit", "ItemCoverage", "GiniIndex", "AveragePopularity"]}
    config, dataset, (train, _, test) = _build(two_markets, train_mode="pooled", **metrics)
    model, trainer = new_market_trainer(config, pooled_train_data(config, train)._dataset,
                                        "pooled", ["in", "jp"])
    trainer.eval_collector.data_collect(pooled_train_data(config, train))
    structs = []
    evaluate = trainer.evaluator.evaluate
    monkeypatch.setattr(trainer.evaluator, "evaluate", lambda s: structs.append(s) or evaluate(s))
    results = trainer.evaluate(test, load_best_model=False)
    for (market, result), struct in zip(results.items(), structs):
        n_items = len(dataset.catalogue(market)) + 1
        assert n_items < dataset.item_num
        items = struct.get("rec.items").numpy()[:, :10]
        assert result["itemcoverage@10"] == round(len(np.unique(items)) / n_items, 4)
        assert result["giniindex@10"] == round(GiniIndex(config).get_gini(items, n_items), 4)
        counts = train[market]._dataset.item_counter
        popularity = np.mean([[counts.get(int(i), 0) for i in row] for row in items])
        assert result["averagepopularity@10"] == pytest.approx(popularity, abs=1e-4)


# Knowledge-aware models and models with their own RecBole dataset class.
KG_ENTITIES = [f"e{k}" for k in range(1, 12)] + ["x1", "x2", "x3"]  # x*: linked to no item


def _write_atomic(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))


@pytest.fixture
def kg_markets(tmp_path):
    """Dataset ``kgm``: market ``a`` (items i1-i8) and ``b`` (i5-i12), one ``kgm.kg`` / ``kgm.link``
    for both (i<k> -> e<k> for k <= 11: i12 is unlinked, e9-e11 link to items of ``b`` only, which
    are entities that no item of ``a`` links to) and pretrained entity vectors (``ent_vec`` of the
    k-th entity: ``[k, k + 0.5]``)."""
    folder = tmp_path / "data" / "kgm"
    folder.mkdir(parents=True)
    for market, users, first in (("a", "u", 1), ("b", "v", 5)):
        _write_atomic(folder / f"{market}.inter", ["user_id:token", "item_id:token", "timestamp:float"],
                      [(f"{users}{u}", f"i{(u + 2 * k) % 8 + first}", k)
                       for u in range(1, 9) for k in range(4)])
    _write_atomic(folder / "kgm.link", ["item_id:token", "entity_id:token"],
                  [(f"i{k}", f"e{k}") for k in range(1, 12)])
    _write_atomic(folder / "kgm.kg", ["head_id:token", "relation_id:token", "tail_id:token"],
                  [(e, f"r{k % 2}", KG_ENTITIES[(3 * k + 1) % len(KG_ENTITIES)])
                   for k, e in enumerate(KG_ENTITIES)])
    _write_atomic(folder / "kgm.ent_feature", ["ent_id:token", "ent_vec:float_seq"],
                  [(e, f"{k} {k + 0.5}") for k, e in enumerate(KG_ENTITIES, 1)])
    return {**FAST, "data_path": str(tmp_path / "data"), "load_col": None, "epochs": 1,
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
            "metrics": ["Hit", "NDCG"], "topk": [3], "valid_metric": "NDCG@3",
            "checkpoint_dir": str(tmp_path / "saved")}


def _kg_build(settings, model="CKE", prepare=False, **extra):
    config = Config(model=model, dataset="kgm", config_dict={**settings, **extra})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    return config, dataset, data_preparation(config, dataset) if prepare else None


def _kg_triples(ds):
    """The market's knowledge graph as a set of token triples."""
    tokens = ds.field2id_token[ds.entity_field]
    relations = ds.field2id_token[ds.relation_field]
    kg = ds.kg_feat
    return set(zip(tokens[np.asarray(kg[ds.head_entity_field])],
                   relations[np.asarray(kg[ds.relation_field])],
                   tokens[np.asarray(kg[ds.tail_entity_field])]))


def test_knowledge_markets_share_one_entity_space(kg_markets):
    """With shared ids every market has RecBole's KnowledgeBasedDataset over one entity space:
    an item's entity id is its shared item id, and one entity (e9, linked only through market b's
    items) has one id in every market."""
    from recbole.data.dataset import KnowledgeBasedDataset

    _, dataset, _ = _kg_build(kg_markets, train_mode="pooled")
    a, b = dataset.market_datasets["a"], dataset.market_datasets["b"]
    file_triples = set(map(tuple, pd.read_csv(f"{kg_markets['data_path']}/kgm/kgm.kg", sep="\t",
                                              dtype=str).values.tolist()))
    for ds in (a, b):
        assert isinstance(ds, KnowledgeBasedDataset)
        assert _kg_triples(ds) == file_triples
        entities = ds.field2id_token[ds.entity_field]
        items = ds.field2token_id[ds.iid_field]
        for k in range(1, 12):  # i12 has no entity (RecBole drops its rows)
            assert entities[items[f"i{k}"]] == f"e{k}"
        assert ds.entity_num == dataset.item_num + 3  # x1-x3 follow the items
    assert list(a.field2id_token[a.entity_field]) == list(b.field2id_token[b.entity_field])
    for field in (a.head_entity_field, a.relation_field, a.tail_entity_field):
        assert np.asarray(a.kg_feat[field]).tolist() == np.asarray(b.kg_feat[field]).tolist()


@pytest.mark.parametrize("train_mode", ["local", "pooled"])
def test_one_knowledge_market_is_plain_recboles_dataset(kg_markets, tmp_path, train_mode):
    """Market a alone (its own ids, or shared ids over one market) is the KnowledgeBasedDataset
    plain RecBole makes of its files: the same item and entity ids and the same graph."""
    import shutil

    from recbole.config import Config as RecBoleConfig
    from recbole.data import create_dataset as recbole_create_dataset

    source = Path(kg_markets["data_path"]) / "kgm"
    (tmp_path / "solo" / "a").mkdir(parents=True)
    for suffix in ("inter", "kg", "link"):
        shutil.copy(source / f"{'a' if suffix == 'inter' else 'kgm'}.{suffix}",
                    tmp_path / "solo" / "a" / f"a.{suffix}")
    alone = recbole_create_dataset(RecBoleConfig(model="CKE", dataset="a", config_dict={
        **kg_markets, "data_path": str(tmp_path / "solo")}))
    _, dataset, _ = _kg_build(kg_markets, train_mode=train_mode, markets=["a"])
    ds = dataset.market_datasets["a"]
    for field in (ds.iid_field, ds.entity_field, ds.relation_field):
        assert list(ds.field2id_token[field]) == list(alone.field2id_token[field])
    for field in (ds.head_entity_field, ds.relation_field, ds.tail_entity_field):
        assert np.asarray(ds.kg_feat[field]).tolist() == np.asarray(alone.kg_feat[field]).tolist()
    assert np.asarray(ds.inter_feat[ds.iid_field]).tolist() == \
        np.asarray(alone.inter_feat[alone.iid_field]).tolist()


def test_knowledge_loaders_sample_the_shared_graph(kg_markets):
    """A knowledge-aware model trains on RecBole's KnowledgeBasedDataLoader (per market and
    pooled): interactions with the market's negatives, and triples whose negative tails its
    KGSampler draws over the shared entity ids."""
    from recbole.data.dataloader import KnowledgeBasedDataLoader
    from recbole.sampler import KGSampler
    from recbole.utils import KGDataLoaderState

    config, dataset, (train, _, _) = _kg_build(kg_markets, prepare=True, train_mode="pooled")
    entity_num = dataset.market_datasets["a"].entity_num
    for loader in (*train.values(), pooled_train_data(config, train)):
        assert type(loader) is KnowledgeBasedDataLoader
        sampler = loader.kg_dataloader._sampler
        assert type(sampler) is KGSampler and sampler.entity_num == entity_num
        loader.set_mode(KGDataLoaderState.RSKG)
        batch = next(iter(loader))
        assert {"user_id", "item_id", "neg_item_id", "head_id", "neg_tail_id"} <= set(batch.columns)
        assert 0 < int(batch["neg_tail_id"].min()) and int(batch["neg_tail_id"].max()) < entity_num
    assert set(train["b"].general_dataloader._sampler.catalogue) == set(dataset.catalogue("b"))


def test_dien_negatives_follow_the_shared_item_ids(kg_markets):
    """RecBole's DIENDataset draws each row's negative item when loading; with shared ids the
    draws are the same items (tokens) as with the market's own ids."""
    from recbole.data.dataset import DIENDataset

    drawn = {}
    for mode in ("local", "pooled"):
        _, dataset, _ = _kg_build(kg_markets, model="DIEN", train_mode=mode)
        for market, ds in dataset.market_datasets.items():
            assert isinstance(ds, DIENDataset)
            drawn[mode, market] = ds.field2id_token[ds.iid_field][ds.neg_item_list.numpy()].tolist()
    for market in ("a", "b"):
        assert drawn["pooled", market] == drawn["local", market]


def test_preloaded_entity_vectors_follow_the_shared_entity_ids(kg_markets):
    """``preload_weight`` rows (here GRU4RecKG's pretrained entity vectors) stay with their
    entity when the ids are shared."""
    settings = {"alias_of_entity_id": ["ent_id"], "preload_weight": {"ent_id": "ent_vec"},
                "additional_feat_suffix": ["ent_feature"], "train_neg_sample_args": None}
    _, dataset, _ = _kg_build(kg_markets, model="GRU4RecKG", train_mode="pooled", **settings)
    for ds in dataset.market_datasets.values():
        vectors = ds.get_preload_weight("ent_id")
        assert len(vectors) == ds.entity_num
        for k, entity in enumerate(KG_ENTITIES, 1):
            assert vectors[ds.field2token_id[ds.entity_field][entity]].tolist() == [k, k + 0.5]


@pytest.mark.parametrize("train_mode", ["local", "pooled", "transfer"])
def test_knowledge_model_trains_in_train_mode(kg_markets, train_mode):
    from recbole_cmr.quick_start import objective_function

    """CKE (trained on RecBole's KG loaders by RecBole's KGTrainer) in every train mode but
    federated: one model per market, one pooled model, market a's model fine-tuned on b."""
    source = {"source_market": "a"} if train_mode == "transfer" else {}
    result = objective_function(config_dict={**kg_markets, **source, "model": "CKE",
                                             "dataset": "kgm", "train_mode": train_mode})
    assert set(result["per_market"]) == {"a", "b"}
    for outcome in result["per_market"].values():
        assert set(outcome["test"]) == {"hit@3", "ndcg@3"}
        assert all(np.isfinite(v) for v in outcome["test"].values())


def test_federated_knowledge_model_is_a_clear_error(kg_markets):
    with pytest.raises(ValueError, match=r"train_mode federated cannot train model \[CKE\]: it is "
                                         r"knowledge-aware \(ModelType.KNOWLEDGE\)"):
        _kg_build(kg_markets, train_mode="federated")


def test_every_recbole_model_dataset_class_has_a_market_version():
    """RecBole's ``<Model>Dataset`` classes (``create_dataset`` picks them by name) each have a
    per-market version, and one RecBole lacks is a clear error, not a plain dataset."""
    from recbole.data import dataset as recbole_datasets
    from recbole.data.dataset import Dataset, customized_dataset

    from recbole_cmr.data.dataset import MARKET_DATASETS, market_dataset_class

    own = {c for c in vars(customized_dataset).values()
           if isinstance(c, type) and c.__module__ == customized_dataset.__name__}
    assert own and own <= set(MARKET_DATASETS)
    config = Config(model="BPR", dataset="kgm", config_dict={"data_path": "."})
    assert issubclass(market_dataset_class(config), Dataset)
    recbole_datasets.BPRDataset = type("BPRDataset", (Dataset,), {})
    try:
        with pytest.raises(ValueError, match=r"RecBole loads model \[BPR\] with its BPRDataset, "
                                             r"which recbole_cmr has no per-market version of"):
            market_dataset_class(config)
    finally:
        del recbole_datasets.BPRDataset


def test_knowledge_model_without_link_file_names_it(kg_markets):
    link = Path(kg_markets["data_path"]) / "kgm" / "kgm.link"
    link.unlink()
    message = rf"Model \[CKE\] is knowledge-aware: it needs {re.escape(str(link))}, the dataset's"
    with pytest.raises(ValueError, match=message + r" .link file shared by all markets"):
        _kg_build(kg_markets, train_mode="pooled")
