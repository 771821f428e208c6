"""Sampled evaluation (``uni99``) of sequential models from one sequence encoding per user: the
trainer gathers each user's candidates from ``full_sort_predict`` (issue 39); the scores and the
metrics must be RecBole's own ``predict`` path's, model by model."""

import numpy as np
import pytest
import torch
from recbole.trainer import Trainer
from recbole.utils import init_seed

from recbole_cmr import Config, create_dataset, data_preparation
from recbole_cmr.data.dataloader import PREDICT_ONLY
from recbole_cmr.data.sampler import MarketRepeatableSampler, MarketSampler, negatives_by_user
from recbole_cmr.trainer import MultiMarketTrainerMixin
from recbole_cmr.utils import get_model, get_trainer

from test_ant import _for, domains, text_cache  # noqa: F401  (fixtures)

UNI99 = {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni99"}
SEED = 2020


def _trainer(settings, model, dataset, market):
    """A ``model`` trainer of ``market`` after one training epoch, and the market's uni99 test
    loader."""
    config = Config(model=model, dataset=dataset, config_dict={
        **settings, "eval_args": UNI99, "eval_batch_size": 2000})
    train, _, test = data_preparation(config, create_dataset(config))
    init_seed(SEED, True)
    net = get_model(model)(config, train[market]._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], model)(config, net)
    trainer._train_epoch(train[market], 0)
    return trainer, test[market]


def _evaluate(trainer, loader, monkeypatch, recbole):
    """``trainer.evaluate(loader)`` with the same negatives every call, by the plugin's path or
    (``recbole``) RecBole's ``Trainer._neg_sample_batch_eval``.

    Returns:
        tuple: ``(result, scores [n_users, n_items], predict_calls)``.
    """
    seen, calls = [], []
    with monkeypatch.context() as patch:
        if recbole:
            patch.setattr(MultiMarketTrainerMixin, "_neg_sample_batch_eval",
                          Trainer._neg_sample_batch_eval)
        collect = trainer.eval_collector.eval_batch_collect
        patch.setattr(trainer.eval_collector, "eval_batch_collect",
                      lambda scores, *rest: seen.append(scores.clone()) or collect(scores, *rest))
        predict = trainer.model.predict
        patch.setattr(trainer.model, "predict", lambda inter: calls.append(1) or predict(inter))
        init_seed(SEED, True)  # the loader draws its negatives with numpy as it iterates
        result = trainer.evaluate(loader, load_best_model=False)
    return result, torch.cat(seen).cpu(), len(calls)


def _assert_recboles_numbers(trainer, loader, monkeypatch, fast=True):
    """The plugin's uni99 evaluation gives RecBole's scores (to float rounding, the same
    ``-inf`` pattern) and exactly its metrics; ``fast``: without one ``predict`` call."""
    result, scores, calls = _evaluate(trainer, loader, monkeypatch, recbole=False)
    expected, expected_scores, expected_calls = _evaluate(trainer, loader, monkeypatch, recbole=True)
    assert expected_calls > 0
    assert (calls == 0) == fast
    assert torch.equal(torch.isinf(scores), torch.isinf(expected_scores))
    finite = torch.isfinite(expected_scores)
    assert (finite.sum(1) > 1).all()  # every user: the positive and its negatives
    assert torch.allclose(scores[finite], expected_scores[finite], rtol=1e-5, atol=1e-5)
    assert dict(result) == dict(expected)
    return scores


@pytest.mark.parametrize("model, extra", [
    ("SASRec", {}),
    ("GRU4Rec", {}),
    ("BERT4Rec", {}),
    ("FeCoSR", {"s2ce": False, "adaptation": True}),  # the adapted item table: finetune stage
    ("FedAvgSASRec", {"market_softmax": True}),
])
def test_sampled_scores_are_recboles(two_markets, monkeypatch, model, extra):
    trainer, test = _trainer({**two_markets, **extra}, model, "xm2", "in")
    if model == "FeCoSR":
        trainer.model.set_stage("finetune")
        torch.nn.init.normal_(trainer.model.item_embedding.adapter.up, std=0.1)  # not the identity
    if model == "FedAvgSASRec":
        assert trainer.model.foreign_items.any()
    _assert_recboles_numbers(trainer, test, monkeypatch)


def test_ant_catalogue_and_market_softmax(domains, monkeypatch):
    """ANT (image and price modalities, no text encoder): its item table holds only the market's
    catalogue and its softmax is market-masked; sampled scores are still ``predict``'s."""
    settings = {**_for("ANT", domains), "text_modality": False}
    trainer, test = _trainer(settings, "ANT", "mlant", "south")
    assert trainer.model.foreign_items.any()
    _assert_recboles_numbers(trainer, test, monkeypatch)


def test_candidates_in_the_input_sequence_keep_their_score(two_markets, monkeypatch):
    """``mask_history_items`` is full ranking's mask (the trainer's ``ScoreMask``), not the
    model's: with it on in the trainer's settings, a sampled candidate from the row's own input
    sequence (sequential negatives exclude only the positive) keeps ``predict``'s score."""
    trainer, test = _trainer(two_markets, "SASRec", "xm2", "in")
    trainer.config["mask_history_items"] = True
    scores = _assert_recboles_numbers(trainer, test, monkeypatch)
    split = test._dataset.inter_feat
    in_input = 0
    for row, (sequence, length) in enumerate(zip(split["item_id_list"], split["item_length"])):
        history = sequence[:length]
        in_input += int(torch.isfinite(scores[row, history]).sum())
    assert in_input > 0


def test_users_with_different_sequences_and_predict_only_models_keep_recboles_path(
        two_markets, monkeypatch):
    """A batch where one user's rows hold two sequences is scored by ``predict`` row by row, as
    RecBole does; so is a model whose ``full_sort_predict`` scores differently (CORE)."""
    trainer, test = _trainer(two_markets, "SASRec", "xm2", "in")
    trainer.tot_item_num = test._dataset.item_num  # as evaluate sets it
    trainer.model.eval()
    init_seed(SEED, True)
    interaction, row_idx, positive_u, positive_i = next(iter(test))
    sequence = interaction["item_id_list"]
    sequence[1] = sequence[1].roll(1)  # a negative row of user 0 with another sequence
    batch = (interaction, row_idx, positive_u, positive_i)
    with torch.no_grad():
        assert trainer._sampled_from_full_sort(batch) is None
        scores = trainer._neg_sample_batch_eval(batch)[1]
        expected = Trainer._neg_sample_batch_eval(trainer, batch)[1]
    assert torch.equal(scores, expected)

    core, test = _trainer(two_markets, "CORE", "xm2", "in")
    assert isinstance(core.model, PREDICT_ONLY)
    _assert_recboles_numbers(core, test, monkeypatch, fast=False)


def _interactions_equal(a, b):
    return set(a.columns) == set(b.columns) and all(torch.equal(a[k], b[k]) for k in a.columns)


@pytest.mark.parametrize("model, split", [
    ("SASRec", {"LS": "valid_and_test"}),  # one positive per user
    ("BPR", {"RS": [0.6, 0.2, 0.2]}),      # several positives per user
])
def test_a_batch_is_collated_as_recboles_per_user_collation(two_markets, model, split):
    """The market's sampled-evaluation loader builds a batch at once with RecBole's negatives
    (the same sampler calls in the same order), rows, labels and indices."""
    from recbole.data.dataloader import NegSampleEvalDataLoader

    from recbole_cmr.data.dataloader import MarketNegSampleEvalDataLoader

    config = Config(model=model, dataset="xm2", config_dict={
        **two_markets, "eval_args": {**UNI99, "split": split}, "eval_batch_size": 400})
    _, _, test = data_preparation(config, create_dataset(config))
    loader = test["in"]
    assert isinstance(loader, MarketNegSampleEvalDataLoader)
    several = 0
    for index in (list(range(0, 7)), list(range(7, 30))):
        init_seed(SEED, True)
        ours = loader.collate_fn(index)
        init_seed(SEED, True)
        theirs = NegSampleEvalDataLoader.collate_fn(loader, index)
        assert _interactions_equal(ours[0], theirs[0])
        assert all(torch.equal(x, y) for x, y in zip(ours[1:], theirs[1:]))
        several += int((ours[2].bincount() > 1).sum())
        assert (ours[0][config["LABEL_FIELD"]] == 0).sum() == 99 * len(ours[3])
    assert (several > 0) == (model == "BPR")


class _OwnSampler(MarketRepeatableSampler):
    """A sampler with its own ``sample_by_user_ids``: the loader must call it, not reproduce it."""

    def sample_by_user_ids(self, user_ids, item_ids, num):
        return super().sample_by_user_ids(user_ids, item_ids, num) % 7 + 1


@pytest.mark.parametrize("kind", [MarketRepeatableSampler, MarketSampler, _OwnSampler])
@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
@pytest.mark.parametrize("per_user", [1, 3])
def test_negatives_are_recboles_draws(two_markets, kind, distribution, per_user):
    """``negatives_by_user`` gives exactly the values of one ``sample_by_user_ids`` call per user
    from the same numpy state, for RecBole's repeatable and non-repeatable samplers, uniform and
    popularity draws, one and several positives per user; over a 12-item catalogue most first
    draws are rejected, so the rejection loop runs for most users."""
    config = Config(model="BPR", dataset="xm2", config_dict={**two_markets, "eval_args": UNI99})
    loaders = data_preparation(config, create_dataset(config))
    built = [phase["in"]._dataset for phase in loaders]
    split = built[2]
    catalogue = np.arange(1, 13) if distribution == "uniform" else None
    if kind is MarketSampler:  # negatives exclude every item of the user's
        sampler = kind(["train", "valid", "test"], built, distribution, 1.0, catalogue=None)
    else:
        sampler = kind(["train", "valid", "test"], split, distribution, 1.0,
                       catalogue=catalogue)
    sampler = sampler.set_phase("test")
    users = np.repeat(split.inter_feat["user_id"].numpy()[:40], per_user)
    items = np.repeat(split.inter_feat["item_id"].numpy()[:40], per_user)
    items[1::per_user] = np.roll(items, 5)[1::per_user]  # distinct positives when per_user > 1
    if catalogue is not None:
        items[::2] = catalogue[np.arange(len(items))[::2] % 12]  # positives inside the catalogue
    counts = np.full(40, per_user)
    np.random.seed(SEED)
    ours = negatives_by_user(sampler, users, items, counts, 99)
    np.random.seed(SEED)
    bounds = np.cumsum(np.r_[0, counts])
    theirs = torch.cat([torch.as_tensor(sampler.sample_by_user_ids(users[a:b], items[a:b], 99))
                        for a, b in zip(bounds[:-1], bounds[1:])])
    assert torch.equal(ours, theirs.long())
    assert np.random.randint(1 << 30) == (np.random.seed(SEED) or  # the same state after
                                          [sampler.sample_by_user_ids(users[a:b], items[a:b], 99)
                                           for a, b in zip(bounds[:-1], bounds[1:])]
                                          and np.random.randint(1 << 30))
    if kind is MarketRepeatableSampler and catalogue is not None:
        positives = torch.as_tensor(items).repeat_interleave(99)  # RecBole's order per user
        assert not (ours.view(40, -1) == torch.as_tensor(items).view(40, per_user).repeat(
            1, 99)).any()
        assert positives.numel() == ours.numel()


def test_a_batch_holds_eval_batch_size_users_when_scored_per_user(two_markets):
    """uni99 of a model scored from one encoding per user (SASRec, one positive per user) puts
    ``eval_batch_size`` users in a batch, as its full ranking does; a model scored by
    ``predict`` (CORE), a general model (BPR) and loading in worker processes keep RecBole's
    ``eval_batch_size`` rows."""
    steps = {}
    for model, extra in (("SASRec", {}), ("CORE", {}), ("BPR", {}), ("SASRec-workers", {"worker": 1})):
        config = Config(model=model.split("-")[0], dataset="xm2", config_dict={
            **two_markets, "eval_args": UNI99, "eval_batch_size": 1000, **extra})
        _, _, test = data_preparation(config, create_dataset(config))
        steps[model] = test["in"].step
    assert steps == {"SASRec": 1000, "CORE": 10, "BPR": 10, "SASRec-workers": 10}
    assert type(next(iter(test["in"]))) is tuple  # a worker process sends RecBole's rows


def test_a_batch_of_users_falls_back_to_predict_in_parts(two_markets, monkeypatch):
    """When ``full_sort_predict`` turns out unusable at run time, a batch of
    ``eval_batch_size`` users is scored by RecBole's ``predict`` in parts of at most
    ``eval_batch_size`` rows, with RecBole's scores and metrics."""
    trainer, test = _trainer(two_markets, "SASRec", "xm2", "in")
    trainer.config["eval_batch_size"] = 500  # 5 users (500 rows) per part
    assert test.step == 2000 and test.sample_size > 5
    rows = []

    def unusable(interaction):
        raise NotImplementedError

    monkeypatch.setattr(trainer.model, "full_sort_predict", unusable)
    predict = trainer.model.predict
    monkeypatch.setattr(trainer.model, "predict",
                        lambda inter: rows.append(len(inter)) or predict(inter))
    _evaluate(trainer, test, monkeypatch, recbole=False)
    assert max(rows) <= 500 and len(rows) >= test.sample_size // 5
    _assert_recboles_numbers(trainer, test, monkeypatch, fast=False)
