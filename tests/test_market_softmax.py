"""``market_softmax`` (train over the market's own items) and ``fedavg_rows`` (per-row FedAvg)."""

import pytest
import torch

from recbole_cmr import Config, create_dataset, data_preparation, run_recbole_cmr
from recbole_cmr.federated import FedAvg, build_clients, get_strategy
from recbole_cmr.model.sequential_recommender.fecosr import FeCoSR

from test_fecosr import small_movielens  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("shared_text_embeddings")  # MiniLM encodes once per run

ROWS = {"model": "FedAvgSASRec", "market_softmax": True, "fed_strategy": "fedavg_rows"}


# ---- fedavg_rows on hand-made tensors ----------------------------------------------------------
def test_fedavg_rows_averages_each_row_over_the_clients_that_changed_it():
    current = {"emb": torch.zeros(4, 2), "dense": torch.zeros(2)}
    a = {"emb": torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]), "dense": torch.tensor([1.0, 2.0])}
    b = {"emb": torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0], [0.0, 0.0]]), "dense": torch.tensor([5.0, 6.0])}
    results = [("in", a, 1), ("jp", b, 3)]
    strategy = get_strategy("fedavg_rows")()
    with pytest.raises(RuntimeError, match="configure_round"):
        strategy.aggregate(0, results)
    strategy.configure_round(0, current)
    new = strategy.aggregate(0, results)
    assert torch.equal(new["emb"][0], torch.zeros(2)) and torch.equal(new["emb"][3], torch.zeros(2))
    assert torch.allclose(new["emb"][1], torch.full((2,), 4.0))  # both: (1*1 + 3*5) / 4
    assert torch.equal(new["emb"][2], torch.full((2,), 2.0))  # only "in" changed it: not diluted
    fedavg = FedAvg().aggregate(0, results)
    assert torch.allclose(new["dense"], fedavg["dense"])  # dense tensors: exactly FedAvg
    assert torch.allclose(fedavg["emb"][2], torch.full((2,), 0.5))  # what FedAvg makes of it


# ---- market_softmax on real markets ------------------------------------------------------------
def _clients(settings):
    config = Config(model=settings["model"], dataset="xm2",
                    config_dict={"fed_rounds": 1, **settings})
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    return config, dataset, build_clients(config, train, valid)


def test_foreign_items_are_the_items_missing_from_the_market_training_data(two_markets):
    _, dataset, clients = _clients({**two_markets, **ROWS})
    for client in clients:
        split = client.train_data._dataset
        mask = client.model.foreign_items
        seen = torch.unique(torch.cat([split.inter_feat["item_id"], split.inter_feat["item_id_list"].reshape(-1)]))
        assert mask.shape == (dataset.item_num,) and bool(mask[0])
        assert not mask[seen[seen > 0]].any()
        assert int((~mask).sum()) == len(seen[seen > 0])
    assert (clients[0].model.foreign_items != clients[1].model.foreign_items).any()


def test_a_round_keeps_small_market_items_undiluted(two_markets):
    """One round of FedAvgSASRec: a market leaves its foreign rows bit-identical, so with
    fedavg_rows an item of one market only takes that market's row, where FedAvg shrinks it."""
    config, _, clients = _clients({**two_markets, **ROWS})
    start = {n: t.clone() for n, t in clients[0].get_parameters().items()}
    results = []
    for client in clients:
        update, n, metrics = client.fit(start, 0)
        results.append((client.client_id, {k: v.clone() for k, v in update.items()}, n))
        foreign = client.model.foreign_items
        assert torch.equal(update["item_embedding.weight"][foreign], start["item_embedding.weight"][foreign])
        assert not torch.equal(update["item_embedding.weight"][~foreign], start["item_embedding.weight"][~foreign])
    strategy = get_strategy(config["fed_strategy"])(config)
    strategy.configure_round(0, start)
    new = strategy.aggregate(0, results)["item_embedding.weight"]
    only_in = ~clients[0].model.foreign_items & clients[1].model.foreign_items
    assert only_in.any()
    assert torch.allclose(new[only_in], results[0][1]["item_embedding.weight"][only_in])
    diluted = FedAvg().aggregate(0, results)["item_embedding.weight"]
    assert not torch.allclose(diluted[only_in], new[only_in])


def _scores(result):
    return {m: (r["valid"], r["test"]) for m, r in result["per_market"].items()}


def test_market_softmax_off_is_plain_sasrec(two_markets):
    settings = {**two_markets, "epochs": 1, "train_mode": "local", "finetune": False}
    plain = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=settings, saved=False)
    off = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict=settings, saved=False)
    assert _scores(off) == _scores(plain)
    # without market_softmax every client changes every row, so fedavg_rows is FedAvg exactly
    federated = {**two_markets, "fed_rounds": 1, "fed_strategy": "fedavg"}
    fedavg = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict=federated, saved=False)
    rows = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2",
                           config_dict={**federated, "fed_strategy": "fedavg_rows"}, saved=False)
    assert _scores(rows) == _scores(fedavg)


def test_market_softmax_on_is_the_cross_entropy_over_the_markets_own_items(two_markets):
    """The loss is CE over the market's items only (a hand computation on a batch), and a local
    epoch leaves the rows of foreign items exactly as they were while it trains the others."""
    from recbole_cmr.trainer import new_market_trainer

    settings = {**two_markets, "model": "FedAvgSASRec", "train_mode": "local", "market_softmax": True}
    config = Config(model="FedAvgSASRec", dataset="xm2", config_dict=settings)
    train, _, _ = data_preparation(config, create_dataset(config))
    model, trainer = new_market_trainer(config, train["in"]._dataset, "in", ["in"])
    model.eval()  # no dropout: the hand computation sees the same sequence vectors
    batch = next(iter(train["in"]))
    seq = model.forward(batch["item_id_list"], batch["item_length"])  # [B, H]
    logits = seq @ model.item_embedding.weight.T  # [B, n_items]
    own = ~model.foreign_items
    assert own.sum() < len(own)  # the market does not sell every item
    positives = batch["item_id"]
    hand = -(logits[torch.arange(len(positives)), positives] - torch.logsumexp(logits[:, own], dim=1))
    assert torch.allclose(model.calculate_loss(batch), hand.mean(), atol=1e-5)
    plain = torch.nn.functional.cross_entropy(logits, positives)
    assert not torch.allclose(model.calculate_loss(batch), plain)
    model.train()
    before = model.item_embedding.weight.detach().clone()
    trainer._train_epoch(train["in"], 0)
    after = model.item_embedding.weight.detach()
    foreign = model.foreign_items
    assert torch.equal(after[foreign], before[foreign])
    assert not torch.equal(after[~foreign], before[~foreign])


def test_transfer_gives_each_target_its_own_market_mask(two_markets, monkeypatch):
    """A target's copy of the source model must mask the target's foreign items, not the
    source's (which masks target positives: an infinite loss)."""
    from recbole_cmr import modes

    targets = {}
    real = modes.market_model

    def spy(config, base, market, train, stage="finetune"):
        model = real(config, base, market, train, stage)
        batch = next(iter(train[market]))  # every target positive is trainable
        assert not model.foreign_items[batch["item_id"]].any()
        assert torch.isfinite(model.calculate_loss(batch))
        targets[market] = model
        return model

    monkeypatch.setattr(modes, "market_model", spy)
    result = run_recbole_cmr(model="PretrainFinetune", dataset="xm2", saved=False,
                             config_dict={**two_markets, "epochs": 1, "market_softmax": True})
    assert list(targets) == ["in"]  # jp is the larger market, so the source
    assert set(result["per_market"]) == {"in", "jp"}


def test_a_non_finite_training_loss_stops_the_run_naming_market_epoch_and_batch(two_markets):
    from recbole_cmr.trainer import new_market_trainer

    config = Config(model="SASRec", dataset="xm2", config_dict=two_markets)
    train, _, _ = data_preparation(config, create_dataset(config))
    model, trainer = new_market_trainer(config, train["jp"]._dataset, "jp", ["jp"])
    calls = []

    def loss(interaction):
        calls.append(1)
        value = torch.tensor(float("inf") if len(calls) == 2 else 1.0)
        return model.position_embedding.weight.sum() * 0 + value

    with pytest.raises(ValueError, match=r"Training loss is inf in market \[jp\], epoch 3, batch 1"):
        trainer._train_epoch(train["jp"], 3, loss_func=loss)


def test_s2ce_neighbours_stay_inside_the_market(small_movielens):  # noqa: F811
    config = Config(model="FeCoSR", dataset="ml2", config_dict={**small_movielens, "market_softmax": True})
    train, _, _ = data_preparation(config, create_dataset(config))
    model = FeCoSR(config, train["east"]._dataset)
    foreign = model.foreign_items
    used = model.s2ce.neighbour_weight > 0  # [n_items, k]
    assert used.any() and not foreign[model.s2ce.neighbour_index[used]].any()
    loss = model.calculate_loss(next(iter(train["east"])))
    assert torch.isfinite(loss)
    loss.backward()
    grad = model.item_embedding.embedding.weight.grad
    assert torch.count_nonzero(grad[foreign]) == 0 and torch.count_nonzero(grad[~foreign]) > 0


def test_market_softmax_needs_the_ce_loss(two_markets):
    with pytest.raises(ValueError, match="market_softmax.*loss_type: CE"):
        run_recbole_cmr(model="FedAvgSASRec", dataset="xm2",
                        config_dict={**two_markets, **ROWS, "loss_type": "BPR",
                                     "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}},
                        saved=False)
