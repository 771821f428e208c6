"""Federated machinery: FedAvg math, the round loop on two real markets, resume, privacy."""

import logging
from pathlib import Path

import pytest
import torch
from recbole.data.interaction import Interaction

from recbole_cmr import (
    Config,
    create_dataset,
    data_preparation,
    get_trainer,
    load_data_and_model,
    run_recbole_cmr,
)
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


def _data(settings, model="SASRec"):
    """Config and fresh ``{market: loader}`` dicts for ``model`` on ``xm2``."""
    config = Config(model=model, dataset="xm2",
                    config_dict={"train_mode": "federated", "fed_rounds": 2, **settings})
    return (config, *data_preparation(config, create_dataset(config)))


def _server(settings, checkpoint_file=None):
    config, train, valid, test = _data(settings)
    clients = build_clients(config, train, valid, test)
    return FederatedServer(config, clients, checkpoint_file=checkpoint_file)


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
    clients = build_clients(config, train, valid, test)
    first, second = (c.model.state_dict() for c in clients)
    assert all(torch.equal(first[n], second[n]) for n in first)  # same initial weights
    assert clients[0].local_names and all("LayerNorm" in n for n in clients[0].local_names)

    checkpoint = str(tmp_path / "fed.pth")
    server = FederatedServer(config, clients, checkpoint_file=checkpoint)
    best_score, best_valid = server.fit()
    assert [r["markets"] for r in server.history] == [["in", "jp"], ["in", "jp"]]
    shared_bytes = sum(first[n].nelement() * 4 for n in server.shared_names)
    norm_bytes = sum(first[n].nelement() * 4 for n in clients[0].local_names)
    assert norm_bytes > 0 and not set(server.shared_names) & set(clients[0].local_names)
    assert all(r["bytes_up"] == r["bytes_down"] == 2 * shared_bytes for r in server.history)
    assert set(best_valid) == {"in", "jp"} and best_score > 0

    # after the broadcast of the best round: shared identical, local (LayerNorm) personal
    first, second = (c.model.state_dict() for c in clients)
    assert all(torch.equal(first[n], second[n]) for n in server.shared_names)
    assert any(not torch.equal(first[n], second[n]) for n in clients[0].local_names)

    tests = server.evaluate()
    assert set(tests) == {"in", "jp"} and "ndcg@10" in tests["jp"]
    state = torch.load(checkpoint, weights_only=True)
    assert state["round"] == 1 and "clients" not in state and "local" not in state["best"]
    assert set(state["global"]) == set(server.shared_names)  # the server file: parameters only
    own = torch.load(str(tmp_path / "fed.clients" / "in.pth"), weights_only=True)  # each client its own
    # written when round 1 closed (its validation message), before it was known to be the best
    assert own["round"] == 1 and own["market"] == "in" and own["best_round"] == 0
    assert set(own["private"]["local"]) == set(own["best_local"]) == set(clients[0].local_names)
    # the run checkpoint's best round completes it: a fresh client restores the same best round
    fresh = build_clients(config, train, valid, test)[0]
    fresh.load_state(str(tmp_path / "fed"), 1, best_round=state["best"]["round"])
    assert fresh.best_round == clients[0].best_round == state["best"]["round"]
    assert all(torch.equal(fresh.best_local[n], t) for n, t in clients[0].best_local.items())


def test_train_federated_returns_the_local_mode_shape(two_markets):
    result = train_federated(*_data({**two_markets, **LOCAL_NORM}), saved=True, verbose=False)
    assert set(result) == {"in", "jp"}
    for market, entry in result.items():
        assert set(entry) == {"valid", "test", "per_user", "checkpoint"} and entry["valid"]["ndcg@10"] > 0
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


@pytest.mark.parametrize("extra", [{}, {"fed_strategy": "fednova", "fed_local_steps": 3},
                                   {"fed_strategy": "scaffold"}, {"fed_rep_head_epochs": 1}])
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(two_markets, tmp_path, extra):
    settings = {**two_markets, **LOCAL_NORM, "fed_rounds": 3, **extra}
    server = _server(settings, str(tmp_path / "full.pth"))
    server.fit(verbose=False)
    expected = server.evaluate()

    def stop_after_round_1(round_idx, valid_score):
        if round_idx == 1:
            raise _Interrupt

    checkpoint = str(tmp_path / "cut.pth")
    interrupted = _server(settings, checkpoint)
    with pytest.raises(_Interrupt):
        interrupted.fit(verbose=False, callback_fn=stop_after_round_1)

    resumed = _server(settings)
    resumed.resume_checkpoint(checkpoint)
    assert resumed.start_round == 2
    resumed.fit(verbose=False)
    assert resumed.evaluate() == expected
    assert [r["valid_score"] for r in resumed.history] == [r["valid_score"] for r in server.history]
    assert all(torch.equal(resumed.global_params[n], t) for n, t in server.global_params.items())


def test_server_side_only_sees_named_tensors_and_counts(two_markets, monkeypatch):
    """Everything that crosses the client boundary, both ways: the server hands clients only
    global shared tensors, a round number and a phase name (never a loader), and gets back the
    shared tensors (no local LayerNorm), an int count, float metrics and result dicts."""
    from recbole_cmr.federated import Client

    server = _server({**two_markets, **LOCAL_NORM})
    local = set(server.clients["in"].local_names)
    sent, received = [], []
    fit, evaluate = Client.fit, Client.evaluate

    def spy_fit(self, global_params, round, config=None):
        assert type(config) is dict and all(type(v) is float for v in config.values())
        sent.append((global_params, round))
        reply = fit(self, global_params, round, config)
        received.append(reply)
        return reply

    def spy_evaluate(self, global_params, phase="valid", best=False):
        sent.append((global_params, phase))
        reply = evaluate(self, global_params, phase, best)
        received.append(reply)
        return reply

    monkeypatch.setattr(Client, "fit", spy_fit)
    monkeypatch.setattr(Client, "evaluate", spy_evaluate)
    server.fit(verbose=False)
    server.evaluate()

    assert len(sent) == 2 * 2 * 2 + 2  # rounds x markets x (fit, validate) + test
    for params, arg in sent:
        assert type(params) is dict and list(params) == server.shared_names
        assert all(type(t) is torch.Tensor for t in params.values()) and type(arg) in (int, str)
    updates = [r for r in received if type(r) is tuple]
    assert len(updates) == 4
    for update, num_examples, metrics in updates:
        assert list(update) == server.shared_names and not set(update) & local
        assert all(type(t) is torch.Tensor and not t.requires_grad for t in update.values())
        assert type(num_examples) is int and num_examples > 0
        assert all(isinstance(v, float) for v in metrics.values())
    for result in (r for r in received if type(r) is not tuple):
        assert all(isinstance(v, float) for v in result.values())
    for value in [p for pair in sent for p in pair] + [u for r in updates for u in r]:
        assert not isinstance(value, (Interaction, torch.utils.data.DataLoader))


def _plain(value):
    """True for what a message may carry: tensors, numbers, strings, None, and dicts/lists of them."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, int, float, str))


MESSAGES = ("get_parameters", "parameter_shapes", "keep_local", "fit",
            "evaluate", "end_round", "mark_best", "restore_best", "export", "save_state", "load_state")


def test_every_server_call_to_a_client_is_a_message_of_plain_data(two_markets, tmp_path, monkeypatch):
    """Round logic, best round, export and checkpoints reach a client only through the message
    methods, with plain data both ways; the server holds parameters, counts and metrics only,
    and each client writes and reads its own state file (as a Flower node will)."""
    from recbole_cmr.federated import Client

    calls = []
    for name in MESSAGES:
        def spy(self, *args, _name=name, _method=getattr(Client, name), **kwargs):
            reply = _method(self, *args, **kwargs)
            calls.append((_name, args, kwargs, reply))
            return reply
        monkeypatch.setattr(Client, name, spy)
    settings = {**two_markets, **LOCAL_NORM, "checkpoint_dir": str(tmp_path)}
    server = _server(settings, str(tmp_path / "run.pth"))
    server.fit(verbose=False)
    server.evaluate()
    paths = server.export_best(verbose=False)
    resumed = _server(settings)
    resumed.resume_checkpoint(str(tmp_path / "run.pth"))
    assert {c[0] for c in calls} == set(MESSAGES) - {"keep_local"}  # nothing market-dependent
    for name, args, kwargs, reply in calls:
        assert _plain(list(args)) and _plain(kwargs), name
        assert _plain(reply) or name == "evaluate" and _plain(dict(reply)), name
    assert sorted(paths) == ["in", "jp"] and all(Path(p).exists() for p in paths.values())
    for market in ("in", "jp"):
        assert (tmp_path / "run.clients" / f"{market}.pth").exists()
        assert resumed.clients[market].best_round == server.best["round"]
    held = {k: v for k, v in vars(server).items() if k not in ("clients", "config", "strategy", "logger")}
    assert _plain({k: v for k, v in held.items() if k not in ("rng", "device")})
    assert set(server.best) == {"round", "global", "personal", "valid"}


def test_a_clients_round_does_not_depend_on_what_ran_before_it(two_markets):
    """Each client seeds its own round (``Client.seed_for``): its update is the same whichever
    clients trained before it in the process, as on its own machine under Flower."""
    def update_of_in(order):
        config, train, valid, test = _data({**two_markets, **LOCAL_NORM})
        clients = {c.client_id: c for c in build_clients(config, train, valid, test)}
        start = clients["in"].get_parameters()
        updates = {}
        for cid in order:
            torch.rand(7)  # anything else drawing random numbers in between
            updates[cid] = clients[cid].fit(start, 1)[0]
        return updates["in"]

    first, after_jp = update_of_in(["in", "jp"]), update_of_in(["jp", "in"])
    assert all(torch.equal(first[n], after_jp[n]) for n in first)


def test_local_epochs_train_each_market_that_many_epochs_per_round(two_markets, monkeypatch):
    server = _server({**two_markets, "fed_local_epochs": 2, "fed_rounds": 2})
    epochs = {"in": [], "jp": []}
    for cid, client in server.clients.items():
        train_epoch = client.trainer._train_epoch

        def spy(data, epoch_idx, cid=cid, train_epoch=train_epoch, **kwargs):
            epochs[cid].append(epoch_idx)
            return train_epoch(data, epoch_idx, **kwargs)

        monkeypatch.setattr(client.trainer, "_train_epoch", spy)
    server.fit(verbose=False)
    assert epochs == {"in": [0, 1, 2, 3], "jp": [0, 1, 2, 3]}


def test_eval_step_validates_every_n_rounds(two_markets):
    server = _server({**two_markets, "fed_rounds": 4, "eval_step": 2})
    server.fit(verbose=False)
    scores = [r["valid_score"] for r in server.history]
    assert scores[0] is None and scores[2] is None and None not in (scores[1], scores[3])
    assert server.best["round"] in (1, 3)
    assert server.best_score == max(scores[1], scores[3])


def test_general_model_keeps_its_market_sized_user_embeddings_local(two_markets, caplog):
    settings = {**two_markets, "train_mode": "federated", "fed_rounds": 2, "state": "INFO",
                "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}}
    with caplog.at_level(logging.INFO):
        result = run_recbole_cmr(model="BPR", dataset="xm2", config_dict=settings, saved=False)
    assert set(result["per_market"]) == {"in", "jp"}
    assert caplog.text.count("their shape differs between markets") == 1
    assert "user_embedding.weight" in caplog.text
    config, train, valid, test = _data({**settings, "train_mode": "federated"}, model="BPR")
    clients = build_clients(config, train, valid, test)
    assert [c.shared_names for c in clients] == [["item_embedding.weight"]] * 2
    shares_users = Config(model="BPR", dataset="xm2",
                          config_dict={**settings, "fed_shared_params": ["item_*", "user_*"]})
    with pytest.raises(ValueError, match=r'pattern "user_\*" names \[.user_embedding.weight.\]'):
        build_clients(shares_users, train, valid)


def test_a_pattern_that_matches_nothing_is_an_error_with_a_suggestion(two_markets):
    with pytest.raises(ValueError, match=r'fed_local_params: pattern "\*norm\*" .* "\*LayerNorm\*"'):
        _server({**two_markets, "train_mode": "federated", "fed_local_params": ["*norm*"]})


def test_client_fraction_half_trains_one_market_per_round_reproducibly(two_markets):
    settings = {**two_markets, "fed_client_fraction": 0.5, "fed_rounds": 3}
    runs = []
    for _ in range(2):
        server = _server(settings)
        server.fit(verbose=False)
        runs.append(([r["markets"] for r in server.history], server.evaluate()))
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


def test_the_best_round_is_tested_and_exported_in_one_message_each(two_markets, tmp_path, monkeypatch):
    """After the rounds, ``finish`` tests and exports the best round in one message per client
    (``evaluate`` then ``export``: on Flower every message costs a ClientApp process), as
    ``evaluate("test")`` and ``export_best`` do alone, and each loads the best round itself,
    its local parameters too, from wherever the clients' models are."""
    server = _server({**two_markets, **LOCAL_NORM, "fed_rounds": 3, "checkpoint_dir": str(tmp_path)})
    server.fit(verbose=False)
    expected = server.evaluate("test")
    best_local = {cid: client.local_state() for cid, client in server.clients.items()}

    def move_away():  # every parameter, shared and local, off the best round
        for client in server.clients.values():
            client.model.load_state_dict({n: t + 0.5 for n, t in client.model.state_dict().items()
                                          if t.is_floating_point()}, strict=False)

    messages = []
    deliver = FederatedServer.deliver
    monkeypatch.setattr(FederatedServer, "deliver", lambda self, batches: messages.append(
        {cid: [m for m, _ in calls] for cid, calls in batches.items()}) or deliver(self, batches))
    move_away()
    assert server.evaluate("test") == expected
    move_away()
    server.export_best(verbose=False)
    move_away()
    tests, paths, then = server.finish(export=True, verbose=False, then={"in": [("get_parameters", ())]})
    assert {m: entry["test"] for m, entry in tests.items()} == expected
    assert all(Path(path).exists() for path in paths.values()) and set(paths) == set(expected)
    assert then["jp"] == [] and set(then["in"][0]) == set(server.shared_names)
    assert messages == [{"in": ["evaluate"], "jp": ["evaluate"]}, {"in": ["export"], "jp": ["export"]},
                        {"in": ["evaluate", "export", "get_parameters"], "jp": ["evaluate", "export"]}]
    for cid, client in server.clients.items():
        assert all(torch.equal(t, best_local[cid][n]) for n, t in client.local_state().items())


def test_a_late_best_mark_takes_the_local_parameters_of_the_round_it_marks(two_markets):
    """``mark_best(r)`` arriving after the client moved on (a posted mark travels with the next
    Flower message; a restarted node may have run that message before) keeps round ``r``'s
    local parameters as ``end_round(r)`` closed them, also across a session file; a round that
    was never closed takes the current ones."""
    server = _server({**two_markets, **LOCAL_NORM})
    client = server.clients["in"]
    client.end_round(0, False)
    closed = client.local_state()
    client.model.load_state_dict({n: t + 1.0 for n, t in closed.items()}, strict=False)  # moved on
    again = build_clients(server.config, {"in": client.train_data}, {"in": client.valid_data})[0]
    again.load_session_state(client.session_state())
    for marked in (client, again):
        marked.mark_best(0)
        assert marked.best_round == 0 and all(torch.equal(marked.best_local[n], t) for n, t in closed.items())
    client.mark_best(1)  # not closed: the parameters now
    assert all(torch.equal(client.best_local[n], t + 1.0) for n, t in closed.items())


class _Deferring(FederatedServer):
    """A transport that holds posted calls for the client's next message (as Flower's does) and
    loses market ``lost`` in the next training message when ``lose`` is set."""

    DEFER_POSTED = True
    lose = None

    def deliver(self, batches):
        self.__dict__.setdefault("messages", []).append(
            {cid: [m for m, _ in calls] for cid, calls in batches.items()})
        if self.lose and any(m == "fit" for calls in batches.values() for m, _ in calls):
            lost, self.lose = self.lose, None
            return super().deliver({cid: calls for cid, calls in batches.items() if cid != lost})
        return super().deliver(batches)


def test_posted_calls_travel_first_with_the_next_message_and_wait_for_a_lost_node(two_markets):
    """With a transport that defers them, posted calls (no reply needed) go first, in order, in
    the client's next message, and the run's results equal the in-process server's; a market
    whose node was lost in a training round (the round went on without it) keeps them for its
    next message; ``flush`` sends what is left."""
    settings = {**two_markets, **LOCAL_NORM, "fed_rounds": 2, "fed_min_clients": 1}

    def server(kind):
        config, train, valid, test = _data(settings)
        return kind(config, build_clients(config, train, valid, test))

    plain = server(FederatedServer)
    plain.fit(verbose=False)
    deferring = server(_Deferring)
    deferring.post("keep_local", {cid: ([],) for cid in deferring.clients})
    deferring.fit(verbose=False)
    tests, _, _ = deferring.finish(export=False)
    assert tests == plain.test_entries()
    last_best = ["mark_best"] * (deferring.best["round"] == 1)  # round 0 is the first best
    assert deferring.messages == [
        {"in": ["get_parameters", "parameter_shapes"], "jp": ["parameter_shapes"]},
        *[{cid: calls for cid in deferring.clients} for calls in (
            ["keep_local", "fit"], ["evaluate"], ["mark_best", "fit"], ["evaluate"],
            [*last_best, "restore_best", "evaluate"])]]
    assert not any(deferring._posted.values())

    losing = server(_Deferring)
    losing.post("keep_local", {cid: ([],) for cid in losing.clients})
    losing.lose = "jp"
    losing.fit(verbose=False)
    assert losing.history[0]["dropped"] == ["jp"]
    assert losing.messages[2] == {"in": ["evaluate"], "jp": ["keep_local", "evaluate"]}  # kept for jp
    last_best = ["mark_best"] * (losing.best["round"] == 1)
    assert {cid: [m for m, _ in calls] for cid, calls in losing._posted.items()} == \
        {cid: [*last_best, "restore_best"] for cid in losing.clients}
    losing.flush()
    assert losing.messages[-1] == {cid: [*last_best, "restore_best"] for cid in losing.clients}
    assert not any(losing._posted.values())


