"""Sampled evaluation (``uni99``) of sequential models from one sequence encoding per user: the
trainer gathers each user's candidates from ``full_sort_predict`` (issue 39); the scores and the
metrics must be RecBole's own ``predict`` path's, model by model."""

import pytest
import torch
from recbole.trainer import Trainer
from recbole.utils import init_seed

from recbole_cmr import Config, create_dataset, data_preparation
from recbole_cmr.trainer import PREDICT_ONLY, MultiMarketTrainerMixin
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
