"""Per-user test values in every run's result (issue 39, paired comparisons of runs): each test
user's ranking metrics at every ``topk``, or each labeled row's label and score for CTR metrics,
with the user's token, in every train mode, in-process and over a Flower message."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recbole_cmr import Config, create_dataset, data_preparation, run_recbole_cmr

DECIMALS = 6  # metric_decimal_place of these runs: the reported means are rounded to it
ROUNDING = 0.5 * 10 ** -DECIMALS + 1e-6  # the reported rounding plus float32 summation


def _run(model, dataset, settings, **extra):
    return run_recbole_cmr(model=model, dataset=dataset, saved=False,
                           config_dict={**settings, "metric_decimal_place": DECIMALS, **extra})


def _test_users(model, dataset, settings, **extra):
    """``{market: sorted user tokens of its test rows}``, from the data the run splits."""
    config = Config(model=model, dataset=dataset, config_dict={**settings, **extra})
    _, _, test = data_preparation(config, create_dataset(config))
    users = {}
    for market, loader in test.items():
        data = loader._dataset
        users[market] = sorted(data.id2token(data.uid_field, data.inter_feat[data.uid_field].numpy()))
    return users


def _check_ranking(result, test_users):
    """Every market's per-user ndcg/hit/mrr@10: one value per test user (token), whose mean is
    the reported test value."""
    for market, entry in result["per_market"].items():
        per_user = entry["per_user"]
        assert sorted(per_user["user"]) == test_users[market]
        for metric in ("ndcg@10", "hit@10", "mrr@10"):
            values = np.asarray(per_user[metric])
            assert np.array_equal(np.float32(values), values) and len(values) == len(per_user["user"])
            assert float(values.mean()) == pytest.approx(entry["test"][metric], abs=ROUNDING), (market, metric)


def _by_user(per_user, metric):
    return dict(zip(per_user["user"], np.asarray(per_user[metric], dtype=np.float64)))


def test_local_runs_keep_each_test_users_values_pairable_across_seeds(two_markets):
    first = _run("SASRec", "xm2", two_markets, epochs=1, seed=1)
    second = _run("SASRec", "xm2", two_markets, epochs=1, seed=2)
    users = _test_users("SASRec", "xm2", two_markets)
    _check_ranking(first, users)
    _check_ranking(second, users)
    for market in users:
        a = _by_user(first["per_market"][market]["per_user"], "ndcg@10")
        b = _by_user(second["per_market"][market]["per_user"], "ndcg@10")
        assert set(a) == set(b) and len(a) == len(users[market])  # one value per user, paired
        paired = np.mean([a[u] - b[u] for u in a])
        reported = first["per_market"][market]["test"]["ndcg@10"] - second["per_market"][market]["test"]["ndcg@10"]
        assert paired == pytest.approx(reported, abs=2 * ROUNDING)
    assert "per_user" not in first["test_result"]  # RecBole's result dicts are unchanged
    assert all(set(e["test"]) == set(first["test_result"]) for e in first["per_market"].values())


def test_the_results_json_keeps_each_markets_values_on_one_line(two_markets):
    result = _run("SASRec", "xm2", two_markets, epochs=1)
    json_path, csv_path = result["results_files"]
    text = open(json_path).read()
    saved = json.loads(text)
    for market, entry in result["per_market"].items():
        kept = saved["per_market"][market]["per_user"]
        assert kept["user"] == entry["per_user"]["user"]
        assert np.array_equal(np.float32(kept["ndcg@10"]), np.float32(entry["per_user"]["ndcg@10"]))
        assert sum('"per_user"' in line for line in text.splitlines()) == len(result["per_market"])
    assert "per_user" not in open(csv_path).read()


def test_federated_runs_keep_each_test_users_values(two_markets):
    settings = {**two_markets, "train_mode": "federated", "fed_rounds": 2}
    result = _run("FedAvgSASRec", "xm2", settings)
    _check_ranking(result, _test_users("FedAvgSASRec", "xm2", settings))


@pytest.mark.parametrize("finetune", [False, True])
def test_pooled_runs_keep_each_markets_own_user_tokens(two_markets, finetune):
    """Pooled training prefixes user ids with their market to keep markets apart; the per-user
    values name each market's own users, so a pooled run pairs with a local or federated one."""
    settings = {**two_markets, "train_mode": "pooled", "finetune": finetune}
    result = _run("SASRec", "xm2", settings, epochs=1)
    users = _test_users("SASRec", "xm2", two_markets)  # a local run's tokens
    _check_ranking(result, users)
    assert not any(":" in u for u in users["in"])  # the tokens tell the two apart


def test_ctr_runs_keep_each_rows_label_and_score_per_task(scenarios):
    """MMoE (two tasks): each test row's user, label and score per task, whose AUC is the
    reported AUC of that task."""
    result = _run("MMoE", "mlsc", scenarios, epochs=1)
    users = _test_users("MMoE", "mlsc", scenarios)
    for market, entry in result["per_market"].items():
        per_user = entry["per_user"]
        assert sorted(per_user["user"]) == users[market]
        for task in ("click", "ctcvr"):
            label, score = per_user[f"label_{task}"], per_user[f"score_{task}"]
            assert len(label) == len(score) == len(per_user["user"])
            assert roc_auc_score(label, score) == pytest.approx(entry["test"][f"auc_{task}"], abs=ROUNDING)


def test_per_user_values_cross_a_flower_message():
    """A client's ``evaluate(..., per_user=True)`` reply, encoded as a Flower message and
    decoded, keeps every token and value."""
    pytest.importorskip("flwr")
    from recbole_cmr.federated.flower import decode, encode

    values = {"user": ["u1", "u2", "u3"], "ndcg@10": np.float32([0.5, 0.0, 1 / 3]).tolist()}
    reply = ({"ndcg@10": 0.2778}, values)
    assert decode(encode(reply)) == reply
