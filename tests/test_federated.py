"""Federated machinery: FedAvg math, the round loop on two real markets, resume, privacy."""

import logging

import pytest
import torch
from recbole.data.interaction import Interaction

from recbole_cmr import Config, create_dataset, data_preparation, get_trainer, load_data_and_model
from recbole_cmr.federated import (
    FedAvg,
    FederatedServer,
    aggregate_round,
    build_clients,
    get_strategy,
    select_shared,
    train_federated,
)

LOCAL_NORM = {"fed_local_params": ["*LayerNorm*"]}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one intra-op thread is as fast, and 2 threads on a busy 2-core machine are
    30x slower (OpenMP threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(settings):
    """Config and fresh ``{market: loader}`` dicts for SASRec on ``xm2``."""
    config = Config(model="SASRec", dataset="xm2",
                    config_dict={"train_mode": "local", "fed_rounds": 2, **settings})
    return (config, *data_preparation(config, create_dataset(config)))


def _server(settings, checkpoint_file=None):
    config, train, valid, test = _data(settings)
    clients = build_clients(config, train, valid)
    return FederatedServer(config, clients, checkpoint_file=checkpoint_file), test


# ---- strategies on hand-made tensors ---------------------------------------------------------
def test_select_shared_by_glob_and_regex():
    names = dict.fromkeys(["item_embedding.weight", "enc.0.LayerNorm.weight", "enc.0.dense.bias",
                           "LayerNorm.bias"])
    assert select_shared(names) == list(names)
    without_norm = ["item_embedding.weight", "enc.0.dense.bias"]
    assert select_shared(names, ["*"], ["*LayerNorm*"]) == without_norm
    assert select_shared(names, [r"enc\.\d+\..*"], ["*LayerNorm*"]) == ["enc.0.dense.bias"]


def test_fedavg_is_the_mean_weighted_by_examples():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(2)}
    b = {"w": torch.tensor([5.0, 6.0]), "steps": torch.tensor(4)}
    new = get_strategy("FedAvg")().aggregate(0, [("in", a, 1), ("jp", b, 3)])
    assert torch.allclose(new["w"], torch.tensor([4.0, 5.0]))
    assert new["w"].dtype == torch.float32 and new["steps"].dtype == torch.int64
    assert int(new["steps"]) == 4  # 3.5 rounded to even
    with pytest.raises(ValueError, match="expected"):
        FedAvg().aggregate(0, [("in", a, 1), ("jp", {"w": b["w"]}, 1)])
    with pytest.raises(ValueError, match="fed_strategy"):
        get_strategy("nope")


def test_local_parameters_never_reach_the_aggregate():
    state = {"emb.weight": torch.zeros(3, 2), "LayerNorm.weight": torch.ones(2)}
    shared = select_shared(state, ["*"], ["*LayerNorm*"])
    updates = [(m, {n: state[n] + i for n in shared}, 10) for i, m in enumerate(["in", "jp"])]
    new = FedAvg().aggregate(1, updates)
    assert list(new) == ["emb.weight"]
    assert torch.allclose(new["emb.weight"], torch.full((3, 2), 0.5))


def test_non_finite_updates_are_dropped_with_a_warning(caplog):
    current = {"w": torch.zeros(2)}
    good = {"w": torch.tensor([2.0, 4.0])}
    bad = {"w": torch.tensor([float("nan"), 1.0])}
    worse = {"w": torch.tensor([float("inf"), 1.0])}
    with caplog.at_level(logging.WARNING):
        new = aggregate_round(FedAvg(), 3, [("in", bad, 100), ("jp", good, 1)], current)
    assert torch.equal(new["w"], good["w"])
    assert "Round 3" in caplog.text and "[in]" in caplog.text and "[jp]" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        unchanged = aggregate_round(FedAvg(), 4, [("in", bad, 1), ("jp", worse, 1)], current)
    assert unchanged is current and torch.equal(unchanged["w"], torch.zeros(2))
    assert "[jp]" in caplog.text and "unchanged" in caplog.text


# ---- the round loop on xm2 -------------------------------------------------------------------
def test_federated_sasrec_round_loop(two_markets, tmp_path):
    config, train, valid, test = _data({**two_markets, **LOCAL_NORM})
    clients = build_clients(config, train, valid)
    first, second = (c.model.state_dict() for c in clients)
    assert all(torch.equal(first[n], second[n]) for n in first)  # same initial weights
    assert clients[0].local_names and all("LayerNorm" in n for n in clients[0].local_names)

    checkpoint = str(tmp_path / "fed.pth")
    server = FederatedServer(config, clients, checkpoint_file=checkpoint)
    best_score, best_valid = server.fit()
    assert [r["markets"] for r in server.history] == [["in", "jp"], ["in", "jp"]]
    assert all(r["bytes_up"] == r["bytes_down"] > 0 for r in server.history)
    assert set(best_valid) == {"in", "jp"} and best_score > 0

    # after the broadcast of the best round: shared identical, local (LayerNorm) personal
    first, second = (c.model.state_dict() for c in clients)
    assert all(torch.equal(first[n], second[n]) for n in server.shared_names)
    assert any(not torch.equal(first[n], second[n]) for n in clients[0].local_names)

    tests = server.evaluate(test)
    assert set(tests) == {"in", "jp"} and "ndcg@10" in tests["jp"]
    state = torch.load(checkpoint, weights_only=True)
    assert state["round"] == 1 and set(state["clients"]) == {"in", "jp"}
    assert set(state["clients"]["in"]["local"]) == set(clients[0].local_names)


def test_train_federated_returns_the_local_mode_shape(two_markets):
    result = train_federated(*_data({**two_markets, **LOCAL_NORM}), saved=True, verbose=False)
    assert set(result) == {"in", "jp"}
    for market, entry in result.items():
        assert set(entry) == {"valid", "test", "checkpoint"} and entry["valid"]["ndcg@10"] >= 0
        assert torch.load(entry["checkpoint"], weights_only=True)["markets"] == [market]
        config, model, dataset, train, valid, test = load_data_and_model(entry["checkpoint"])
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        assert dict(trainer.evaluate(test[market], load_best_model=False)) == dict(entry["test"])


def test_same_seed_same_metrics(two_markets):
    first = train_federated(*_data(two_markets), saved=False, verbose=False)
    again = train_federated(*_data(two_markets), saved=False, verbose=False)
    assert first == again
    assert all(entry["checkpoint"] is None for entry in first.values())


class _Interrupt(Exception):
    pass


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(two_markets, tmp_path):
    settings = {**two_markets, **LOCAL_NORM, "fed_rounds": 3}
    server, test = _server(settings, str(tmp_path / "full.pth"))
    server.fit(verbose=False)
    expected = server.evaluate(test)

    def stop_after_round_1(round_idx, valid_score):
        if round_idx == 1:
            raise _Interrupt

    checkpoint = str(tmp_path / "cut.pth")
    interrupted, _ = _server(settings, checkpoint)
    with pytest.raises(_Interrupt):
        interrupted.fit(verbose=False, callback_fn=stop_after_round_1)

    resumed, test = _server(settings)
    resumed.resume_checkpoint(checkpoint)
    assert resumed.start_round == 2
    resumed.fit(verbose=False)
    assert resumed.evaluate(test) == expected
    assert [r["valid_score"] for r in resumed.history] == [r["valid_score"] for r in server.history]
    assert all(torch.equal(resumed.global_params[n], t) for n, t in server.global_params.items())


def test_server_side_only_sees_named_tensors_and_counts(two_markets, monkeypatch):
    server, _ = _server(two_markets)
    names = set(server.clients["in"].model.state_dict())
    received = []
    collect, aggregate = FederatedServer._collect, server.strategy.aggregate

    def spy_collect(self, client_id, update, num_examples, metrics):
        received.append((client_id, update, num_examples, metrics))
        return collect(self, client_id, update, num_examples, metrics)

    def spy_aggregate(round_idx, results):
        received.extend(results)
        return aggregate(round_idx, results)

    monkeypatch.setattr(FederatedServer, "_collect", spy_collect)
    monkeypatch.setattr(server.strategy, "aggregate", spy_aggregate)
    server.fit(verbose=False)

    assert len(received) == 2 * 2 * 2  # rounds x markets x (collect, aggregate)
    for client_id, update, num_examples, *metrics in received:
        assert client_id in {"in", "jp"} and type(num_examples) is int and num_examples > 0
        assert type(update) is dict and set(update) <= names
        assert all(type(t) is torch.Tensor for t in update.values())  # plain tensors, detached
        assert all(isinstance(v, float) for m in metrics for v in m.values())
        for value in [update, *update.values(), num_examples, *metrics]:
            assert not isinstance(value, (Interaction, torch.utils.data.DataLoader))


def test_client_fraction_half_trains_one_market_per_round_reproducibly(two_markets):
    settings = {**two_markets, "fed_client_fraction": 0.5, "fed_rounds": 3}
    runs = []
    for _ in range(2):
        server, test = _server(settings)
        server.fit(verbose=False)
        runs.append(([r["markets"] for r in server.history], server.evaluate(test)))
    selections = runs[0][0]
    assert all(len(markets) == 1 for markets in selections)
    assert runs[0] == runs[1]


def test_a_cut_checkpoint_write_keeps_the_last_whole_round(tmp_path, monkeypatch):
    """A process killed while saving a round must leave the previous checkpoint loadable."""
    from recbole_cmr import utils

    path = tmp_path / "fed.pth"
    utils.save_atomic({"round": 3, "w": torch.ones(4)}, str(path))

    def cut_short(obj, f):  # writes part of the file, then dies like a killed process would
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        utils.save_atomic({"round": 4, "w": torch.zeros(4)}, str(path))
    state = torch.load(path, weights_only=True)
    assert state["round"] == 3 and torch.equal(state["w"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["fed.pth"]
