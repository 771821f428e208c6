"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) and FedProx: one-round updates by
hand, FedProx at mu 0 is FedAvg, resumed runs restore the server's moments."""

import math

import pytest
import torch

from recbole_cmr import Config
from recbole_cmr.federated import FedAvg, make_strategy

from test_federated import _Interrupt, _server

X0 = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
ROUND0 = [("a", {"w": torch.tensor([2.0, 2.0]), "steps": torch.tensor(5)}, 1),
          ("b", {"w": torch.tensor([0.0, 4.0]), "steps": torch.tensor(1)}, 3)]
# FedAvg of ROUND0: w = [0.5, 3.5] (delta [-0.5, 1.5]), steps = 2
ROUND1 = [("a", {"w": torch.tensor([1.0, 3.0]), "steps": torch.tensor(2)}, 1),
          ("b", {"w": torch.tensor([1.0, 3.0]), "steps": torch.tensor(2)}, 3)]


def _two_rounds(name, **settings):
    strategy = make_strategy({"fed_strategy": name, **settings})
    strategy.configure_round(0, X0)
    x1 = {**X0, **strategy.aggregate(0, ROUND0)}
    strategy.configure_round(1, x1)
    x2 = {**x1, **strategy.aggregate(1, [(c, {**u, "w": u["w"] + (x1["w"] - torch.tensor([0.75, 2.75]))}, n)
                                          for c, u, n in ROUND1])}
    return x1, x2


def _close(tensor, values):
    return torch.allclose(tensor.double(), torch.tensor(values, dtype=torch.float64), atol=1e-6)


def test_fedavgm_by_hand():
    x1, x2 = _two_rounds("fedavgm", server_learning_rate=0.5, server_momentum=0.9)
    # round 0: v = x - avg = [0.5, -1.5]; x1 = x0 - 0.5 v
    assert _close(x1["w"], [0.75, 2.75]) and int(x1["steps"]) == 2  # integers: plain mean
    # round 1 (clients send x1-relative [1, 3]): delta = avg - x1 = [0.25, 0.25]
    # v = 0.9 * [0.5, -1.5] - [0.25, 0.25] = [0.2, -1.6]; x2 = x1 - 0.5 v
    assert _close(x2["w"], [0.65, 3.55])


def test_fedavgm_with_lr_1_and_no_momentum_is_fedavg():
    strategy = make_strategy({"fed_strategy": "fedavgm"})
    strategy.configure_round(0, X0)
    assert torch.equal(strategy.aggregate(0, ROUND0)["w"], FedAvg().aggregate(0, ROUND0)["w"])


def _adaptive_by_hand(second_moment, eta, beta_1, tau, deltas):
    """Reddi et al., Algorithm 2, written out for 2-element tensors: the x after each round."""
    x, m, v, out = [1.0, 2.0], [0.0, 0.0], [tau ** 2] * 2, []
    for delta in deltas:
        m = [beta_1 * mi + (1 - beta_1) * d for mi, d in zip(m, delta)]
        v = [second_moment(vi, d * d) for vi, d in zip(v, delta)]
        x = [xi + eta * mi / (math.sqrt(vi) + tau) for xi, mi, vi in zip(x, m, v)]
        out.append(x)
    return out


@pytest.mark.parametrize("name, settings, second_moment", [
    ("fedadam", {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
     lambda v, d2: 0.99 * v + 0.01 * d2),
    ("fedyogi", {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
     lambda v, d2: v - 0.01 * d2 * math.copysign(1.0, v - d2) if v != d2 else v),
    ("fedadagrad", {"eta": 0.1, "beta_1": 0.0, "tau": 1e-3}, lambda v, d2: v + d2),
])
def test_adaptive_server_optimizers_by_hand(name, settings, second_moment):
    x1, x2 = _two_rounds(name, **settings)
    # round 1's clients send [1, 3] shifted by (x1 - [0.75, 2.75]): delta = [1, 3] - [0.75, 2.75]
    expected = _adaptive_by_hand(second_moment, settings["eta"], settings["beta_1"], settings["tau"],
                                 [[-0.5, 1.5], [0.25, 0.25]])
    assert _close(x1["w"], expected[0]) and _close(x2["w"], expected[1])
    assert int(x1["steps"]) == 2


def test_rowwise_server_steps_leave_unchanged_rows_and_their_moments_alone():
    current = {"emb": torch.zeros(3, 2)}
    update = {"emb": torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])}
    strategy = make_strategy({"fed_strategy": "fedadam", "fed_rowwise": True})
    strategy.configure_round(0, current)
    new = strategy.aggregate(0, [("a", update, 1)])["emb"]
    assert torch.equal(new[1], torch.zeros(2))  # no client changed row 1
    assert (new[0] > 0).all() and new[2][0] > 0
    state = strategy.state_dict()["state"]["emb"]
    assert torch.equal(state["m"][1], torch.zeros(2))
    # plain FedAdam moves row 1 too once it has momentum
    plain = make_strategy({"fed_strategy": "fedadam"})
    plain.configure_round(0, current)
    first = plain.aggregate(0, [("a", update, 1)])
    plain.configure_round(1, first)
    moved = plain.aggregate(1, [("a", {"emb": first["emb"].clone()}, 1)])["emb"]
    assert not torch.equal(moved[0], first["emb"][0])


def test_a_setting_the_strategy_does_not_read_is_an_error(two_markets):
    config = Config(model="SASRec", dataset="xm2", config_dict={
        **two_markets, "train_mode": "federated", "fed_strategy": "fedadam", "server_momentum": 0.9})
    with pytest.raises(ValueError, match=r"server_momentum is a setting of fed_strategy \['fedavgm'\]"):
        make_strategy(config)


# ---- on real markets --------------------------------------------------------------------------
def _fit(settings):
    server = _server(settings)
    server.fit(verbose=False)
    return server


def test_fedprox_with_mu_0_is_fedavg_bit_for_bit_and_mu_pulls_clients_to_the_global(two_markets):
    fedavg = _fit(two_markets)
    prox0 = _fit({**two_markets, "fed_strategy": "fedprox", "proximal_mu": 0.0})
    assert all(torch.equal(prox0.global_params[n], t) for n, t in fedavg.global_params.items())
    assert prox0.evaluate() == fedavg.evaluate()

    def drift(mu):
        server = _server({**two_markets, "fed_strategy": "fedprox", "proximal_mu": mu})
        start = server.global_params
        update, _, _ = server.clients["jp"].fit(start, 0, server.strategy.client_config(0))
        return sum(float(((update[n] - start[n]) ** 2).sum()) for n in start)

    assert drift(10.0) < drift(0.0)


def test_a_resumed_fedadam_run_restores_the_server_moments(two_markets, tmp_path):
    settings = {**two_markets, "fed_strategy": "fedadam", "eta": 0.01, "fed_rounds": 3}
    full = _server(settings, str(tmp_path / "full.pth"))
    full.fit(verbose=False)

    def stop_after_round_1(round_idx, valid_score):
        if round_idx == 1:
            raise _Interrupt

    cut = _server(settings, str(tmp_path / "cut.pth"))
    with pytest.raises(_Interrupt):
        cut.fit(verbose=False, callback_fn=stop_after_round_1)
    resumed = _server(settings)
    resumed.resume_checkpoint(str(tmp_path / "cut.pth"))
    moments = resumed.strategy.state_dict()["state"]
    assert moments and all(s["v"].abs().sum() > 0 for s in moments.values())
    resumed.fit(verbose=False)
    assert resumed.evaluate() == full.evaluate()
    assert all(torch.equal(resumed.global_params[n], t) for n, t in full.global_params.items())
    for name, state in full.strategy.state_dict()["state"].items():
        assert all(torch.equal(state[k], resumed.strategy.state_dict()["state"][name][k]) for k in state)



def test_fed_rowwise_composes_with_fedavg_and_fedprox_and_refuses_other_strategies():
    from recbole_cmr.federated import FedAvgRows, Strategy, register_strategy

    assert type(make_strategy({"fed_strategy": "fedavg", "fed_rowwise": True})) is FedAvgRows
    prox = make_strategy({"fed_strategy": "fedprox", "fed_rowwise": True, "proximal_mu": 0.1})
    assert type(prox.average) is FedAvgRows and prox.client_config(0) == {"proximal_mu": 0.1}

    @register_strategy("median_for_test")
    class Median(Strategy):
        def aggregate(self, round, results):
            return {}

    assert type(make_strategy({"fed_strategy": "median_for_test"})) is Median
    with pytest.raises(ValueError, match=r"fed_rowwise applies to .* not to fed_strategy \[median_for_test\]"):
        make_strategy({"fed_strategy": "median_for_test", "fed_rowwise": True})


def _fit_res(results, steps):
    from recbole_cmr.federated.strategy import FitRes

    return [FitRes(c, u, n, {"loss": 0.0, "num_steps": tau}) for (c, u, n), tau in zip(results, steps)]


def test_fednova_by_hand():
    """x += tau_eff * sum_i p_i (y_i - x) / tau_i, tau_eff = sum_i p_i tau_i; equal step counts
    give FedAvg; integer tensors the plain average; a reply without num_steps is an error."""
    strategy = make_strategy({"fed_strategy": "fednova"})
    strategy.configure_round(0, X0)
    x1 = strategy.aggregate(0, _fit_res(ROUND0, [1.0, 4.0]))
    # p = (1/4, 3/4); normalised deltas: a [1, 0] / 1, b [-1, 2] / 4; tau_eff = 1/4 + 3 = 3.25
    expected = [1.0 + 3.25 * (0.25 * 1 + 0.75 * -0.25), 2.0 + 3.25 * (0.75 * 0.5)]
    assert _close(x1["w"], expected) and int(x1["steps"]) == 2
    fedavg = FedAvg().aggregate(0, ROUND0)
    assert _close(strategy.aggregate(0, _fit_res(ROUND0, [7.0, 7.0]))["w"], fedavg["w"].tolist())
    with pytest.raises(ValueError, match=r"fednova needs each client's num_steps > 0; client \[a\]"):
        strategy.aggregate(0, ROUND0)  # plain tuples: no metrics


def test_fed_local_steps_takes_that_many_steps_across_epochs(two_markets):
    """``fed_local_steps``: exactly that many optimizer steps per round, running on into the next
    epoch of the market's data (reshuffled), reported as ``num_steps``; the same seed gives the
    same update; with fed_local_epochs set too it is an error."""
    server = _server({**two_markets, "fed_local_steps": 5, "train_batch_size": 512})
    client = server.clients["in"]
    batches = len(client.train_data)
    assert batches < 5  # so the round runs into a second epoch
    steps = []
    step = client.trainer.optimizer.step
    client.trainer.optimizer.step = lambda *a, **k: steps.append(1) or step(*a, **k)
    start = server.params_for("in")
    update, _, metrics = client.fit(start, 0)
    assert len(steps) == 5 and metrics["num_steps"] == 5.0
    again = _server({**two_markets, "fed_local_steps": 5, "train_batch_size": 512}).clients["in"]
    repeated = again.fit(start, 0)[0]
    assert all(torch.equal(repeated[n], t) for n, t in update.items())
    plain = _server(two_markets).clients["in"]
    assert plain.fit(plain.get_parameters(), 0)[2]["num_steps"] == float(len(plain.train_data))
    with pytest.raises(ValueError, match="fed_local_steps and fed_local_epochs both set"):
        _server({**two_markets, "fed_local_steps": 5, "fed_local_epochs": 2})


def test_scaffold_server_half_by_hand():
    """FedAvg of the values; c += sum_i (c_i+ - c_i) / N over the N clients of the federation;
    the clients get c (and ``scaffold``); a reply without a control change is an error; c is
    the strategy's state (resume)."""
    from recbole_cmr.federated.strategy import FitRes

    strategy = make_strategy({"fed_strategy": "scaffold"})
    strategy.set_clients(["a", "b", "c", "d"])
    assert strategy.client_tensors(0) == {} and strategy.client_config(0) == {"scaffold": 1.0}
    strategy.configure_round(0, X0)
    changes = {"a": torch.tensor([4.0, 0.0]), "b": torch.tensor([0.0, -8.0])}
    results = [FitRes(c, u, n, {"num_steps": 1.0}, {"w": changes[c]}) for c, u, n in ROUND0]
    x1 = strategy.aggregate(0, results)
    assert _close(x1["w"], FedAvg().aggregate(0, ROUND0)["w"].tolist())  # [0.5, 3.5]
    assert _close(strategy.client_tensors(1)["w"], [1.0, -2.0])  # (4 + 0, 0 - 8) / 4 clients
    again = make_strategy({"fed_strategy": "scaffold"})
    again.load_state_dict(strategy.state_dict())
    assert torch.equal(again.client_tensors(1)["w"], strategy.client_tensors(1)["w"])
    with pytest.raises(ValueError, match=r"scaffold needs each client's control-variate change; "
                                         r"clients \['a', 'b'\]"):
        strategy.aggregate(0, _fit_res(ROUND0, [1.0, 1.0]))


def test_scaffold_client_half_corrects_each_step_and_keeps_option_two(two_markets):
    """With c = c_i = 0 a SCAFFOLD round is FedAvg's bit for bit; the client keeps
    c_i+ = c_i - c + (x - y_i) / (K lr) and replies its change; a non-zero c - c_i changes the
    training (the correction reaches every step); c_i survives in the private state."""
    plain = _server(two_markets).clients["in"]
    start = plain.get_parameters()
    update, _, metrics = plain.fit(start, 0)
    client = _server({**two_markets, "fed_strategy": "scaffold"}).clients["in"]
    *reply, change = client.fit(start, 0, {"scaffold": 1.0}, {})
    assert all(torch.equal(reply[0][n], t) for n, t in update.items())  # neutral start: FedAvg
    lr = client.trainer.optimizer.param_groups[0]["lr"]
    name = "item_embedding.weight"
    expected = (start[name].double() - reply[0][name].double()) / (metrics["num_steps"] * lr)
    assert torch.allclose(change[name].double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(client.control[name].to(change[name].dtype), change[name])  # c_i was 0
    assert set(change) == set(client.trainable_shared())
    steered = _server({**two_markets, "fed_strategy": "scaffold"}).clients["in"]
    control = {name: torch.full_like(start[name], 0.5, dtype=torch.float64)}
    moved = steered.fit(start, 0, {"scaffold": 1.0}, control)[0]
    assert not torch.equal(moved[name], reply[0][name])
    restored = _server({**two_markets, "fed_strategy": "scaffold"}).clients["in"]
    restored.load_private_state(client.private_state())
    assert torch.equal(restored.control[name], client.control[name])


def test_fedrep_trains_the_head_alone_then_the_body_alone(two_markets):
    """``fed_rep_head_epochs``: each round first trains only the local parameters (here the
    LayerNorms) that many epochs, then only the shared ones; ``requires_grad`` is restored, the
    body's steps are ``num_steps``, the head's values stay on the client; without local
    parameters it is an error."""
    settings = {**two_markets, "fed_local_params": ["*LayerNorm*"], "fed_rep_head_epochs": 2}
    client = _server(settings).clients["in"]
    local, shared = set(client.trainable_local()), set(client.trainable_shared())
    assert local and shared and all("LayerNorm" in n for n in local)
    phases = []
    train_epoch = client.trainer._train_epoch

    def recording(*args, **kwargs):
        phases.append({n for n, p in client.model.named_parameters() if p.requires_grad})
        return train_epoch(*args, **kwargs)

    client.trainer._train_epoch = recording
    before = {n: p.detach().clone() for n, p in client.model.named_parameters()}
    start = client.get_parameters()
    update, _, metrics = client.fit(start, 0)
    assert phases == [local, local, shared]
    assert all(p.requires_grad for p in client.model.parameters())
    assert metrics["num_steps"] == float(len(client.train_data))
    after = dict(client.model.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in local)  # the head trained
    plain = _server({**settings, "fed_rep_head_epochs": 0}).clients["in"]
    plain_update = plain.fit(start, 0)[0]
    assert any(not torch.equal(update[n], plain_update[n]) for n in shared)
    with pytest.raises(ValueError, match=r"fed_rep_head_epochs: 1 .* market \[in\] keeps no trainable"):
        _server({**two_markets, "fed_rep_head_epochs": 1})
