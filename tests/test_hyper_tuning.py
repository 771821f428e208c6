"""RecBole's HyperTuning driving the plugin's objective function."""

import re

import pandas as pd
import pytest
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
    """Each trial's row is what a plain run with its settings gives, and the best one is kept."""
    import json

    alone = {lr: objective_function({**two_markets, "model": "SASRec", "dataset": "xm2",
                                     "learning_rate": lr}, saved=False)["best_valid_score"]
             for lr in (0.01, 0.001)}
    assert alone[0.01] != alone[0.001]
    params = tmp_path / "params.hyper"
    params.write_text("learning_rate choice [0.01,0.001]\n")
    best, result, (best_json, trials_csv) = run_hyper(
        "SASRec", "xm2", str(params), algo="exhaustive", config_dict=two_markets,
        output_dir=str(tmp_path / "hyper"),
    )
    trials = pd.read_csv(trials_csv)
    scores = {float(p.split(":")[1].strip(" ,")): s
              for p, s in zip(trials["params"], trials["best_valid_score"])}
    assert scores == pytest.approx(alone)
    assert best["learning_rate"] == max(alone, key=alone.get)
    saved = json.load(open(best_json))
    assert saved["best_params"] == best and saved["best_valid_score"] == pytest.approx(max(alone.values()))


def test_recbole_hypertuning_random_search(two_markets, tmp_path):
    params = tmp_path / "params.hyper"
    params.write_text("hidden_dropout_prob uniform 0.1,0.5\n")
    fixed = {**two_markets, "model": "SASRec", "dataset": "xm2", "epochs": 1}
    hp = HyperTuning(lambda d, f: objective_function({**fixed, **d}, f), params_file=str(params),
                     algo="random", max_evals=2)
    hp.run()
    assert len(hp.params2result) == 2
    dropouts = [float(p.split(":")[1]) for p in hp.params2result]
    assert all(0.1 <= d <= 0.5 for d in dropouts) and dropouts[0] != dropouts[1]
    for params, result in hp.params2result.items():  # each trial is the run of its settings
        alone = objective_function({**fixed, "hidden_dropout_prob": float(params.split(":")[1])},
                                   saved=False)
        assert result["best_valid_result"] == alone["best_valid_result"]


def test_main_passes_its_settings_to_every_trial_and_ignores_the_process_argv(two_markets, tmp_path,
                                                                              monkeypatch):
    """``main(argv)``: a ``--key=value`` that is not a search option is a setting of every trial;
    the process's own command line (here pytest's, plus a bogus setting) is never read."""
    import json

    import yaml

    from recbole_cmr.hyper_tuning import main

    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(yaml.safe_dump(two_markets))
    params = tmp_path / "params.hyper"
    params.write_text("learning_rate choice [0.01]\n")
    monkeypatch.setattr("sys.argv", ["pytest", "--epochs=abc"])
    main(["--model=SASRec", "--dataset=xm2", f"--params_file={params}", f"--config_files={fixed}",
          f"--output_dir={tmp_path / 'hyper'}", "--epochs=1", "--hidden_size=16"])
    trial = json.load(open(tmp_path / "hyper" / "SASRec-xm2.best.json"))
    settings = {**two_markets, "model": "SASRec", "dataset": "xm2", "learning_rate": 0.01}
    with_argv = objective_function({**settings, "epochs": 1, "hidden_size": 16}, saved=False, argv=[])
    without = objective_function(settings, saved=False, argv=[])
    assert with_argv["best_valid_score"] != without["best_valid_score"]
    assert trial["best_valid_score"] == pytest.approx(with_argv["best_valid_score"])


def test_a_searched_setting_fixed_on_the_command_line_is_an_error(two_markets, tmp_path):
    params = tmp_path / "params.hyper"
    params.write_text("learning_rate choice [0.01,0.001]\n")
    with pytest.raises(ValueError, match="learning_rate is searched .* and also set on the command line"):
        run_hyper("SASRec", "xm2", str(params), config_dict=two_markets,
                  output_dir=str(tmp_path / "hyper"), argv=["--learning_rate=0.1"])


def test_trial_names_are_folder_names_and_tell_trials_apart():
    from recbole_cmr.hyper_tuning import trial_name

    names = [trial_name(p) for p in ({"x": "a/b"}, {"x": "a-b"}, {"x": [1, 2]}, {"x": "[1, 2]"},
                                     {"learning_rate": 0.001, "hidden_size": 64},
                                     {"y": "v" * 200}, {"y": "v" * 201})]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._=-]{1,89}", n) for n in names)
    assert names[4].startswith("hidden_size=64_learning_rate=0.001-")
    assert trial_name({"b": 1, "a": 2}) == trial_name({"a": 2, "b": 1})
