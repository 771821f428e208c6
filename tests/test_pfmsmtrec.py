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
    tower_attention,
)
from recbole_cmr.utils import matching

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


def test_template_masks_exactly_its_patterns(scenarios):
    server = _federation(scenarios, fed_rounds=1)
    config = server.config
    for client in server.clients.values():
        names = list(client.model.state_dict())
        parts = client.model.template_parts(config)
        scenario_part = matching(names, ["experts.scenario.*"])
        bn = matching(names, ["*.bn_*"])
        assert parts["scenario"] == scenario_part and scenario_part
        assert set(client.local_names) == set(scenario_part) | set(bn)
        assert client.shared_names == [n for n in names if n not in set(scenario_part) | set(bn)]
        assert matching(client.shared_names, ["experts.shared.*"]) and \
            matching(client.shared_names, ["experts.task_1.*"])
        assert not set(parts["global"]) & set(parts["task"])
    # the ablations: no template -> plain experts, all shared but BN; no FedBN -> BN shared
    plain = _federation(scenarios, fed_rounds=1, parameter_template=False, fed_bn=False)
    client = next(iter(plain.clients.values()))
    assert client.local_names == [] and not matching(client.shared_names, ["experts.scenario.*"])
    assert len(client.model.experts["shared"]) == 8


class Spy(PersonalizedConflictAverse):
    """Records the names the server hands to the strategy."""

    received = []

    def aggregate(self, round, results):
        Spy.received.extend(name for _, update, _ in results for name in update)
        return super().aggregate(round, results)


def test_scenario_parts_and_bn_never_reach_the_server(scenarios):
    Spy.received = []
    config = Config(model="PFMSMTrec", dataset="mlsc", config_dict={**scenarios, "fed_rounds": 2})
    server = _federation(scenarios, strategy=Spy(config), fed_rounds=2)
    server.fit(verbose=False)
    assert Spy.received
    assert not matching(Spy.received, ["experts.scenario.*", "*.bn_*"])
    assert matching(Spy.received, ["experts.shared.*"]) and matching(Spy.received, ["towers.*"])


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
    # the clients hold their own shared parameters now
    personal = server.personal
    a, b = list(personal)[:2]
    name = next(n for n in personal[a] if n.startswith("experts.shared."))
    assert not torch.equal(personal[a][name], personal[b][name])


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
