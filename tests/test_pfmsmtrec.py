"""MMoE and PF-MSMTrec on multi-scenario, multi-task CTR data (a slice of the shipped
ml100k-scenarios): per-task evaluation, bad-input errors, the parameter template, federated BN,
the conflict-averse direction, personalized weights and resuming."""

import itertools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recbole_cmr import Config, create_dataset, data_preparation, run_recbole_cmr
from recbole_cmr.federated import FederatedServer, build_clients
from recbole_cmr.federated.personalized import (
    PersonalizedConflictAverse,
    conflict_averse_direction,
    simplex_weights,
    starting_with,
    tower_attention,
)

from conftest import CTR_FAST, USERS_PER_SCENARIO, _dataset_yaml  # noqa: E402,F401  (and the scenarios fixture)


def _run(model, settings, **extra):
    return run_recbole_cmr(model=model, dataset="mlsc", config_dict={**settings, **extra},
                           saved=False)


# ---- data and per-task evaluation ------------------------------------------------------------
def test_mmoe_reports_every_task_and_their_mean(scenarios):
    result = _run("MMoE", scenarios, epochs=1)
    assert sorted(result["per_market"]) == ["25to34", "35to44", "45plus", "under25"]
    for market, res in result["per_market"].items():
        test = res["test"]
        assert {"auc", "logloss", "auc_click", "auc_ctcvr", "logloss_click",
                "logloss_ctcvr"} <= set(test)
        assert test["auc"] == pytest.approx((test["auc_click"] + test["auc_ctcvr"]) / 2, abs=1e-4)
        assert test["auc_click"] != test["auc_ctcvr"]
    assert result["best_valid_score"] == pytest.approx(result["best_valid_result"]["auc"])


def test_task_labels_chain_click_and_conversion(scenarios):
    config = Config(model="MMoE", dataset="mlsc", config_dict=scenarios)
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    from recbole_cmr import get_model

    loader = train["45plus"]
    model = get_model("MMoE")(config, loader._dataset)
    batch = next(iter(loader))
    labels = model.task_labels(batch)
    assert torch.equal(labels[:, 0], batch["click"].float())
    assert torch.equal(labels[:, 1], (batch["click"] * batch["conversion"]).float())
    assert "conversion" not in model.float_field_names + model.token_field_names
    model.eval()  # no dropout: the two forward passes below see the same network
    probs = model(batch).clamp(1e-7, 1 - 1e-7)
    manual = torch.stack([torch.nn.functional.binary_cross_entropy(probs[:, t], labels[:, t])
                          for t in range(2)]).mean()
    assert float(model.calculate_loss(batch).detach()) == pytest.approx(float(manual.detach()), rel=1e-5)


def test_single_task_recbole_model_runs_on_the_same_data(scenarios):
    settings = {k: v for k, v in scenarios.items() if k not in ("expert_mlp_sizes", "tower_mlp_sizes")}
    result = _run("DeepFM", settings, epochs=1, mlp_hidden_size=[16])
    test = result["per_market"]["under25"]["test"]
    assert set(test) == {"auc", "logloss"} and 0 < test["auc"] < 1


def _rewrite(path, change):
    frame = pd.read_csv(path, sep="\t", dtype=str)
    change(frame).to_csv(path, sep="\t", index=False)


def test_non_binary_label_is_named(scenarios, tmp_path):
    path = tmp_path / "data" / "mlsc" / "35to44.inter"
    _rewrite(path, lambda f: f.assign(**{"conversion:float": f["conversion:float"].where(
        f.index != 3, "3")}))
    with pytest.raises(ValueError, match=r"Label field \[conversion\] of .*35to44\.inter.* holds 3"):
        _run("MMoE", scenarios)


def test_missing_label_field_is_named(scenarios, tmp_path):
    path = tmp_path / "data" / "mlsc" / "under25.inter"
    _rewrite(path, lambda f: f.drop(columns=["conversion:float"]))
    with pytest.raises(ValueError, match=r"under25\.inter.*label fields \['conversion'\]"):
        _run("MMoE", scenarios, load_col=None)


def test_scenario_with_other_schema_is_named(scenarios, tmp_path):
    path = tmp_path / "data" / "mlsc" / "45plus.inter"
    _rewrite(path, lambda f: f.rename(columns={"click:float": "click:token"}))
    with pytest.raises(ValueError, match=r"45plus\.inter.*different schemas.*click"):
        _run("MMoE", scenarios)


def test_yaml_feature_absent_from_files_is_named(scenarios):
    load_col = {**scenarios["load_col"], "user": ["user_id", "age", "income"]}
    with pytest.raises(ValueError, match=r"load_col\['user'\].*\['income'\].*\.user"):
        _run("MMoE", scenarios, load_col=load_col)


def test_label_as_numerical_feature_is_refused(scenarios):
    with pytest.raises(ValueError, match="numerical_features.*label"):
        _run("MMoE", scenarios, numerical_features=["conversion"])


# ---- the conflict-averse direction and tower attention --------------------------------------
@pytest.mark.parametrize("alpha", [0.4, 0.8])
def test_conflict_averse_direction_known_answers(alpha):
    orthogonal = torch.eye(2, dtype=torch.float64)
    g0 = orthogonal.mean(0)
    expected = g0 * (1 + alpha) / (1 + alpha ** 2)  # w = (1/2, 1/2) by symmetry
    assert torch.allclose(conflict_averse_direction(orthogonal, alpha), expected, atol=1e-6)
    same = torch.tensor([[1.0, 2.0, -1.0]] * 3, dtype=torch.float64)
    assert torch.allclose(conflict_averse_direction(same, alpha),
                          same[0] * (1 + alpha) / (1 + alpha ** 2), atol=1e-6)
    assert torch.equal(conflict_averse_direction(orthogonal, 0.0), g0)


def test_simplex_weights_equal_a_direct_grid_solve():
    G = torch.tensor([[1.0, 0.2, -0.5], [-0.3, 1.0, 0.1], [0.4, -0.6, 0.9]], dtype=torch.float64)
    A = (G @ G.T).numpy()
    c = 0.4 * np.sqrt(A.mean())
    grid = [np.array([i, j, 200 - i - j]) / 200 for i, j in itertools.product(range(201), repeat=2)
            if i + j <= 200]
    values = [w @ A.mean(1) + c * np.sqrt(w @ A @ w) for w in grid]
    best = grid[int(np.argmin(values))]
    w = simplex_weights(A, c)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert np.abs(w - best).max() < 0.02
    assert w @ A.mean(1) + c * np.sqrt(w @ A @ w) <= min(values) + 1e-9


def test_tower_attention_is_a_softmax_mix_of_the_updates():
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    mixed = tower_attention(G)
    for i in range(3):
        scores = torch.tensor([float(G[i] @ G[j]) / np.sqrt(2) for j in range(3)])
        weights = torch.softmax(scores, 0).double()
        assert torch.allclose(mixed[i], weights @ G)


# ---- federated PF-MSMTrec ------------------------------------------------------------------
def _federation(settings, model="PFMSMTrec", checkpoint_file=None, strategy=None, **extra):
    config = Config(model=model, dataset="mlsc", config_dict={**settings, **extra})
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    clients = build_clients(config, train, valid, test)
    return FederatedServer(config, clients, strategy=strategy, checkpoint_file=checkpoint_file)


def _private_names(model):
    """What must never leave a client, from the modules themselves (not from any pattern): the
    scenario-specific experts' parameters and buffers and every BatchNorm layer's."""
    scenario = model.experts["scenario"].state_dict() if "scenario" in model.experts else {}
    bn = {f"{m}.{n}" for m, module in model.named_modules()
          if isinstance(module, torch.nn.BatchNorm1d) for n in module.state_dict()}
    return {f"experts.scenario.{n}" for n in scenario} | bn


def _one_client(settings, **extra):
    """The client of the first scenario, built as a federated run builds each."""
    from recbole_cmr.federated.server import make_client

    config = Config(model="PFMSMTrec", dataset="mlsc", config_dict={**settings, **extra})
    train, valid, test = data_preparation(config, create_dataset(config))
    market = next(iter(train))
    return make_client(config, market, train[market], valid[market], test[market])


@pytest.mark.parametrize("extra,private", [
    ({}, {"scenario", "bn"}),
    ({"fed_bn": False}, {"scenario"}),
    ({"parameter_template": False}, {"bn"}),
    ({"parameter_template": False, "fed_bn": False}, set()),
])
def test_scenario_experts_and_bn_are_what_stays_on_a_client(scenarios, extra, private):
    """What training keeps local (the client's ``local_names``) is exactly the scenario-specific
    experts (with the template) and the BatchNorm layers (with FedBN); all else is shared."""
    client = _one_client(scenarios, **extra)
    model, names = client.model, list(client.model.state_dict())
    expected = {n for n in _private_names(model)
                if ("scenario" if n.startswith("experts.scenario.") else "bn") in private}
    assert set(client.local_names) == expected
    assert client.shared_names == [n for n in names if n not in expected]
    assert ("scenario" in model.experts) == ("scenario" in private)
    assert sum(len(e) for e in model.experts.values()) == 8  # [4, 1, 2] with two tasks, or 8


def test_pattern_settings_that_would_leak_or_do_nothing_are_errors(scenarios, caplog):
    """A pattern setting of PF-MSMTrec or its strategy that matches no parameter (a typo) is an
    error naming the setting, the pattern and what would match; so are patterns that would share
    a scenario-specific expert, and settings whose switch is off."""
    from recbole_cmr import get_model
    from recbole_cmr.federated.personalized import PersonalizedConflictAverse

    config = Config(model="PFMSMTrec", dataset="mlsc", config_dict=scenarios)
    train, _, _ = data_preparation(config, create_dataset(config))
    dataset = next(iter(train.values()))._dataset

    def model(**extra):
        return get_model("PFMSMTrec")(Config(model="PFMSMTrec", dataset="mlsc",
                                             config_dict={**scenarios, **extra}), dataset)

    cases = [
        ({"fed_bn_params": ["*BatchNorm*"]},
         r'fed_bn_params: pattern "\*BatchNorm\*" matches no parameter.*experts\.shared\.\*\.bn_\*\.\*'),
        ({"template_scenario_params": ["experts.Scenario.*"]},
         r'template_scenario_params: pattern "experts\.Scenario\.\*" .*did you mean "experts\.scenario\.\*"'),
        ({"template_scenario_params": ["experts.scenario.0.*"]},
         r"leaves scenario-specific expert parameters \['experts\.scenario\.1\."),
        ({"fed_bn": False, "fed_bn_params": ["*.bn_*"]}, r"fed_bn_params is read only with fed_bn: True"),
        ({"parameter_template": False, "template_scenario_params": ["experts.scenario.*"]},
         r"template_scenario_params is read only with parameter_template: True"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**extra)
    names = list(model().state_dict())
    for key, typo, would_match in (("pf_expert_group", r"expert\.[^.]+\.\d+", r"experts\.shared\."),
                                   ("pf_tower_layer", r"tower\.\d+", r"towers\.")):
        strategy = PersonalizedConflictAverse(Config(model="PFMSMTrec", dataset="mlsc",
                                                     config_dict={**scenarios, key: typo}))
        with pytest.raises(ValueError, match=rf'{key}: pattern ".*" matches no parameter.*{would_match}'):
            strategy.check_names(names)
    # a yaml default that another setting makes match nothing is logged, not an error
    with caplog.at_level("WARNING"):
        plain = model(template_experts=[4, 1, 0])
    assert "template_scenario_params" in caplog.text and "scenario" not in plain.experts


class Wire(FederatedServer):
    """Records every reply a client sends the server: ``[(method, {client_id: reply})]``."""

    def deliver(self, batches):
        replies = super().deliver(batches)
        for cid, calls in batches.items():
            self.__dict__.setdefault("received", []).extend(
                (method, {cid: reply}) for (method, _), reply in zip(calls, replies[cid]))
        return replies


def _tensor_names(value):
    """The names of every named tensor in a reply (dicts of tensors, nested in lists/tuples)."""
    if isinstance(value, dict):
        own = {k for k, v in value.items() if isinstance(v, torch.Tensor)}
        return own.union(*(_tensor_names(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*(_tensor_names(v) for v in value))
    return set()


def test_no_scenario_expert_or_bn_parameter_reaches_the_server(scenarios):
    """On the wire: every tensor a PF-MSMTrec client sends the server (its parameters at the
    start, its updates, its replies to every other message) is shared, never a scenario-specific
    expert's or a BatchNorm layer's (named from the modules, not from the patterns)."""
    config = Config(model="PFMSMTrec", dataset="mlsc", config_dict={**scenarios, "fed_rounds": 1})
    train, valid, test = data_preparation(config, create_dataset(config))
    server = Wire(config, build_clients(config, train, valid, test))
    server.fit(verbose=False)
    server.finish(export=False)
    private = _private_names(next(iter(server.clients.values())).model)
    received = set().union(*(_tensor_names(r) for method, replies in server.received
                             for r in replies.values()))
    assert {method for method, _ in server.received} >= {"get_parameters", "fit", "evaluate"}
    assert private and not received & private
    assert received == set(server.shared_names)


def test_personalized_weights_stay_in_range_and_change(scenarios):
    server = _federation(scenarios, fed_rounds=3, eval_step=3)
    seen = []
    server.fit(verbose=False, callback_fn=lambda r, s: seen.append(
        {c: dict(w) for c, w in server.strategy.weights.items()}))
    assert set(seen[-1]) == set(server.clients)
    values = [v for w in seen[-1].values() for v in w.values()]
    assert all(0.0 <= v <= 1.0 for v in values)
    groups = next(iter(seen[-1].values()))
    assert any(g.startswith("experts.") for g in groups) and any(g.startswith("towers.") for g in groups)
    assert seen[1] != seen[2] and any(v != 0.1 for v in values)  # learnt after round 0
    # each round's history holds the strategy's report: update cosines and the weights' means
    reports = [record["strategy"] for record in server.history]
    assert len(reports) == 3 and reports[0]["clients"] == list(server.clients)
    n = len(server.clients)
    cosine = np.array(reports[-1]["expert_cosine"])
    assert cosine.shape == (n, n) and np.allclose(np.diag(cosine), 1) and (np.abs(cosine) <= 1 + 1e-9).all()
    assert set(reports[-1]["a"]) == set(server.clients) and all(0 <= v <= 1 for v in reports[-1]["b"].values())
    from recbole_cmr.federated.server import round_summary

    assert round_summary(server)["history"][-1]["strategy"] == reports[-1]
    # the clients hold their own shared parameters now
    personal = server.personal
    a, b = list(personal)[:2]
    name = next(n for n in personal[a] if n.startswith("experts.shared."))
    assert not torch.equal(personal[a][name], personal[b][name])


def test_personalized_update_rule_matches_a_hand_computation():
    """θᵢ = startᵢ + Δᵢ + aᵢ·Δ_ca for an expert, Δᵢ + bᵢ·softmax(Δᵢ·Δ_allᵀ/√d)·Δ_all for a tower
    layer, FedAvg for the rest, and aᵢ's momentum-SGD step from the next update, on hand-made
    updates of two clients (orthogonal expert updates: w = (1/2, 1/2) by symmetry); in round 1
    only client a trains, from its own personalized start."""
    settings = {"ca_alpha": 0.4, "pf_weight_init": 0.1, "pf_weight_lr": 0.01, "pf_weight_momentum": 0.9}
    alpha, a0, lr = settings["ca_alpha"], settings["pf_weight_init"], settings["pf_weight_lr"]
    expert, tower, gate = "experts.shared.0.linear_0.weight", "towers.0.linear_0.weight", "gates.0.weight"
    strategy = PersonalizedConflictAverse(settings)
    zero = torch.zeros(2)
    current = {expert: zero, tower: zero, gate: zero}
    moves = {"a": {expert: [1.0, 0.0], tower: [1.0, 0.0], gate: [2.0, 0.0]},
             "b": {expert: [0.0, 1.0], tower: [0.0, 2.0], gate: [0.0, 4.0]}}
    counts = {"a": 1, "b": 3}
    strategy.configure_round(0, current, {"a": current, "b": current})
    uniform, own = strategy.aggregate(0, [(c, {n: torch.tensor(v) for n, v in moves[c].items()},
                                           counts[c]) for c in ("a", "b")])
    g0 = np.array([0.5, 0.5])
    ca = g0 * (1 + alpha) / (1 + alpha ** 2)  # (g0 + c/||Gw|| Gw) / (1 + α²) with Gw = g0
    assert set(uniform) == {gate} and set(own["a"]) == set(own["b"]) == {expert, tower}
    # the round's report: orthogonal expert updates (cosine 0), the weights they were mixed with
    assert strategy.round_report() == {"clients": ["a", "b"], "expert_cosine": [[1.0, 0.0], [0.0, 1.0]],
                                       "expert_cosine_by_group": {"experts.shared.0": 0.0},
                                       "a": {"a": a0, "b": a0}, "b": {"a": a0, "b": a0}}
    assert np.allclose(uniform[gate], (1 * np.array([2.0, 0.0]) + 3 * np.array([0.0, 4.0])) / 4)
    for c in ("a", "b"):
        assert np.allclose(own[c][expert], np.array(moves[c][expert]) + a0 * ca, atol=1e-6)
        G = np.array([moves["a"][tower], moves["b"][tower]])
        scores = G @ np.array(moves[c][tower]) / np.sqrt(2)
        attention = np.exp(scores) / np.exp(scores).sum()
        assert np.allclose(own[c][tower], np.array(moves[c][tower]) + a0 * attention @ G, atol=1e-6)
    # round 1: a alone, from its own start; its weight learns from Δ_a¹ · (the Δ_ca it was given)
    start_a = {**current, **uniform, **own["a"]}
    step = np.array([1.0, 1.0])
    strategy.configure_round(1, {**current, **uniform}, {"a": start_a})
    uniform1, own1 = strategy.aggregate(1, [("a", {expert: start_a[expert] + torch.tensor(step),
                                                   tower: start_a[tower], gate: start_a[gate]}, 1)])
    a1 = a0 + lr * float(step @ ca)  # a - lr·(momentum·0 + grad), grad = -Δ_a¹ · Δ_ca
    assert strategy.weights["a"]["experts.shared.0"] == pytest.approx(a1)
    ca1 = step * (1 + alpha) / (1 + alpha ** 2)  # one client: w = (1), Gw = g0 = Δ_a¹
    assert np.allclose(own1["a"][expert], start_a[expert].numpy() + step + a1 * ca1, atol=1e-6)
    assert strategy.round_report()["a"] == {"a": pytest.approx(a1)}  # after this round's step
    assert set(own1) == {"a"} and torch.equal(uniform1[gate], start_a[gate])


def test_every_client_starts_and_validates_from_the_current_global_state(scenarios, monkeypatch):
    """``fed_client_fraction: 0.5``: two of the four scenarios train per round. What the strategy
    aggregates alike for all (embeddings, gates: all but the expert and tower groups) is sent
    with one value to every client, selected or not: the starts of every round's fits and the
    parameters every client is validated with agree, and they moved after round 0."""
    sent = []
    deliver = FederatedServer.deliver

    def spy(self, batches):
        for method in ("fit", "evaluate"):
            args = {cid: a for cid, calls in batches.items() for m, a in calls if m == method}
            if args:
                sent.append((method, {cid: {n: t.clone() for n, t in a[0].items()} for cid, a in args.items()}))
        return deliver(self, batches)

    monkeypatch.setattr(FederatedServer, "deliver", spy)
    server = _federation(scenarios, fed_rounds=2, fed_client_fraction=0.5, eval_step=1)
    initial = dict(server.global_params)
    server.fit(verbose=False)
    strategy = server.strategy
    grouped = starting_with(server.shared_names, [strategy.pf_expert_group, strategy.pf_tower_layer])
    uniform = [n for n in server.shared_names if n not in grouped]
    assert uniform and [len(p) for m, p in sent if m == "fit"] == [2, 2]
    assert [len(p) for m, p in sent if m == "evaluate"] == [4, 4]
    for method, params in sent:
        first = next(iter(params.values()))
        for n in uniform:
            assert all(torch.equal(p[n], first[n]) for p in params.values()), (method, n)
    after_round_0 = sent[1][1]
    assert any(not torch.equal(next(iter(after_round_0.values()))[n], initial[n]) for n in uniform)


class _Interrupt(Exception):
    pass


def test_resumed_pfmsmtrec_run_equals_an_uninterrupted_one(scenarios, tmp_path):
    settings = {**scenarios, "fed_rounds": 2}
    full = _federation(settings, checkpoint_file=str(tmp_path / "full.pth"))
    full.fit(verbose=False)
    expected = full.evaluate()

    def stop(round_idx, score):
        if round_idx == 0:
            raise _Interrupt

    cut = str(tmp_path / "cut.pth")
    interrupted = _federation(settings, checkpoint_file=cut)
    with pytest.raises(_Interrupt):
        interrupted.fit(verbose=False, callback_fn=stop)
    resumed = _federation(settings)
    resumed.resume_checkpoint(cut)
    assert resumed.strategy.weights == interrupted.strategy.weights
    resumed.fit(verbose=False)
    assert resumed.evaluate() == expected
    assert resumed.strategy.weights == full.strategy.weights


def test_pf_msmtrec_alias_runs_end_to_end(scenarios):
    result = _run("PF-MSMTrec", scenarios, fed_rounds=1)
    assert result["model"] == "PFMSMTrec" and result["train_mode"] == "federated"
    assert {"auc_click", "auc_ctcvr"} <= set(result["test_result"])


# ---- Ali-CCP through the converter: benchmark files per scenario ---------------------------
def test_ali_ccp_scenarios_load_as_recbole_benchmark_files(tmp_path):
    from conftest import shared_data

    from recbole_cmr import get_model
    from recbole_cmr.data.convert import convert_aliccp

    src = shared_data("ctr_samples")
    out = convert_aliccp(src / "ali_ccp_train_sample.csv", src / "ali_ccp_val_sample.csv",
                         src / "ali_ccp_test_sample.csv", tmp_path / "data")
    settings = {**CTR_FAST, "data_path": str(tmp_path / "data")}
    config = Config(model="MMoE", dataset="ali-ccp", config_dict=settings)
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    assert dataset.markets == ["scenario1", "scenario2", "scenario3"]
    for market in dataset.markets:
        for split, loaders_of in zip(("train", "valid", "test"), loaders):
            rows = len(pd.read_csv(out / f"{market}.{split}.inter", sep="\t"))
            assert loaders_of[market]._dataset.inter_num == rows
    model = get_model("MMoE")(config, loaders[0]["scenario1"]._dataset)
    assert "D508" in model.float_field_names and "101" in model.token_field_names
    assert not {"click", "purchase"} & set(model.float_field_names + model.token_field_names)
    # the sample is too small for AUC: a valid split without purchases is NaN every epoch
    with pytest.raises(ValueError, match=r"No epoch of market \[scenario1\] validated with a "
                                         r"finite auc"):
        run_recbole_cmr(model="MMoE", dataset="ali-ccp", config_dict=settings)


def test_hyper_tuning_runs_pf_msmtrec_trials(scenarios, tmp_path):
    from recbole_cmr.hyper_tuning import run_hyper

    params = tmp_path / "params.hyper"
    params.write_text("ca_alpha choice [0.0,0.4]\n")
    best, result, (best_json, trials_csv) = run_hyper(
        "PF-MSMTrec", "mlsc", str(params), algo="exhaustive",
        config_dict={**scenarios, "fed_rounds": 1}, output_dir=str(tmp_path / "hyper"))
    trials = pd.read_csv(trials_csv)
    assert len(trials) == 2 and best["ca_alpha"] in (0.0, 0.4)
    assert result["best_valid_score"] == pytest.approx(result["best_valid_result"]["auc"])


def test_scenario_field_splits_one_file_like_one_file_per_scenario(scenarios, tmp_path):
    """``scenario_field``: one ``mlone.inter`` with a scenario column (and one ``mlone.user``)
    gives the markets, rows and numbers of one file per scenario."""
    src, target = tmp_path / "data" / "mlsc", tmp_path / "data" / "mlone"
    target.mkdir()
    markets = ["25to34", "35to44", "45plus", "under25"]
    inters = [pd.read_csv(src / f"{m}.inter", sep="\t", dtype=str).assign(**{"scenario:token": m})
              for m in markets]
    pd.concat(inters).to_csv(target / "mlone.inter", sep="\t", index=False)
    pd.concat([pd.read_csv(src / f"{m}.user", sep="\t", dtype=str) for m in markets]).to_csv(
        target / "mlone.user", sep="\t", index=False)
    shutil.copy(src / "mlsc.item", target / "mlone.item")
    one_file = {**scenarios, "scenario_field": "scenario", "epochs": 1,
                "load_col": {**scenarios["load_col"],
                             "inter": [*scenarios["load_col"]["inter"], "scenario"]}}
    split = run_recbole_cmr(model="MMoE", dataset="mlone", config_dict=one_file, saved=False)
    per_file = _run("MMoE", scenarios, epochs=1)
    assert list(split["per_market"]) == markets
    assert split["test_result"] == per_file["test_result"]
    with pytest.raises(ValueError, match=r"does not load scenario_field \[scenario\]"):
        run_recbole_cmr(model="MMoE", dataset="mlone", saved=False,
                        config_dict={**one_file, "load_col": scenarios["load_col"]})
    with pytest.raises(ValueError, match=r"markets \['south'\] .* not values of scenario_field"):
        run_recbole_cmr(model="MMoE", dataset="mlone", saved=False,
                        config_dict={**one_file, "markets": ["south"]})


def test_scenario_experts_shared_with_personalized_weights(scenarios):
    """``scenario_experts: personalized``: the scenario-specific experts go to the server (BN
    stays), and each client gets back its own trained experts plus ``a_i · Δ_ca``: after round 0
    (``a_i`` = ``pf_weight_init``, every client started from the same values) the server's value
    minus the client's update is one and the same non-zero tensor for every client, and the
    clients' experts stay apart (not averaged)."""
    config = Config(model="PFMSMTrec", dataset="mlsc", config_dict={
        **scenarios, "fed_rounds": 1, "scenario_experts": "personalized"})
    train, valid, test = data_preparation(config, create_dataset(config))
    server = Wire(config, build_clients(config, train, valid, test))
    model = next(iter(server.clients.values())).model
    bn = {f"{m}.{n}" for m, module in model.named_modules()
          if isinstance(module, torch.nn.BatchNorm1d) for n in module.state_dict()}
    scenario = {f"experts.scenario.{n}" for n in model.experts["scenario"].state_dict()} - bn
    server.fit(verbose=False)
    received = set().union(*(_tensor_names(r) for _, replies in server.received
                             for r in replies.values()))
    assert scenario <= received and not received & bn
    updates = {cid: reply[0] for method, replies in server.received if method == "fit"
               for cid, reply in replies.items()}
    for name in sorted(scenario):
        moves = [server.personal[cid][name].double() - updates[cid][name].double() for cid in updates]
        assert moves[0].abs().max() > 0
        assert all(torch.allclose(m, moves[0], atol=1e-7) for m in moves[1:])
        values = [server.personal[cid][name] for cid in updates]
        assert not torch.equal(values[0], values[1])


@pytest.mark.parametrize("extra, message", [
    ({"scenario_experts": "shared"}, r"scenario_experts \[shared\] must be one of"),
    ({"scenario_experts": "personalized", "fed_strategy": "fedavg"},
     r"needs|only fed_strategy: pfmsmtrec with personalized_experts: True"),
    ({"scenario_experts": "personalized", "personalized_experts": False},
     r"personalized_experts: False would average them"),
    ({"scenario_experts": "personalized", "template_scenario_params": ["experts.scenario.*"]},
     r"template_scenario_params is read only with scenario_experts: local"),
    ({"scenario_experts": "personalized", "train_mode": "pooled"},
     r"scenario_experts is not read by train_mode pooled"),
])
def test_scenario_sharing_needs_the_personalized_rule(scenarios, extra, message):
    with pytest.raises(ValueError, match=message):
        _one_client(scenarios, **extra)
