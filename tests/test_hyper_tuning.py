"""RecBole's HyperTuning driving the plugin's objective function."""

import pandas as pd
from recbole.trainer import HyperTuning

from recbole_cmr import objective_function
from recbole_cmr.hyper_tuning import run_hyper


def test_objective_returns_what_hypertuning_reads(two_markets):
    result = objective_function({**two_markets, "model": "SASRec", "dataset": "xm2"}, saved=False)
    assert result["model"] == "SASRec"
    assert result["valid_score_bigger"] is True
    assert result["best_valid_score"] == result["best_valid_result"]["ndcg@10"]
    assert set(result["test_result"]) == {"hit@10", "ndcg@10", "mrr@10"}


def test_two_trials_write_best_params_and_trial_table(two_markets, tmp_path):
    params = tmp_path / "params.hyper"
    params.write_text("learning_rate choice [0.01,0.001]\n")
    best, result, (best_json, trials_csv) = run_hyper(
        "SASRec", "xm2", str(params), algo="exhaustive", config_dict=two_markets,
        output_dir=str(tmp_path / "hyper"),
    )
    assert best["learning_rate"] in (0.01, 0.001)
    trials = pd.read_csv(trials_csv)
    assert len(trials) == 2
    assert trials["best_valid_score"].max() == result["best_valid_score"]
    assert "best_params" in open(best_json).read()


def test_recbole_hypertuning_random_search(two_markets, tmp_path):
    params = tmp_path / "params.hyper"
    params.write_text("hidden_dropout_prob uniform 0.1,0.5\n")
    fixed = {**two_markets, "model": "SASRec", "dataset": "xm2", "epochs": 1}
    hp = HyperTuning(lambda d, f: objective_function({**fixed, **d}, f), params_file=str(params),
                     algo="random", max_evals=2)
    hp.run()
    assert len(hp.params2result) == 2
