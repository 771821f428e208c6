"""The package as a user meets it: any working directory, packaged yaml and default dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import recbole_cmr
from recbole_cmr.utils import resource_path

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--markets=['in']", "--epochs=1", "--show_progress=False", "--hidden_size=16",
         "--inner_size=32", "--n_layers=1"]


def test_properties_and_default_dataset_are_found():
    assert os.path.isfile(os.path.join(resource_path("properties"), "overall.yaml"))
    markets = sorted(p.stem for p in Path(resource_path("dataset", "xmrec-mini")).glob("*.inter"))
    assert markets == ["ca", "de", "fr", "in", "jp", "mx", "uk"]
    movielens = Path(resource_path("dataset", "movielens-markets"))
    assert sorted(p.stem for p in movielens.glob("*.inter")) == ["central", "east", "ml100k", "south", "west"]
    assert (movielens / "movielens-markets.item").is_file()
    for model in ("FeCoSR", "FedAvgSASRec", "PretrainFinetune"):
        assert os.path.isfile(os.path.join(resource_path("properties"), "model", model + ".yaml"))


def test_public_api():
    """The names RecBole users know, each doing the plugin-aware thing."""
    from recbole.config import Config as RecBoleConfig
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    from recbole_cmr.model.sequential_recommender.fecosr import FeCoSR
    from recbole_cmr.trainer import MultiMarketTrainerMixin

    assert set(recbole_cmr.__all__) == {
        "Config", "MultiMarketDataset", "create_dataset", "data_preparation", "get_model",
        "get_trainer", "load_data_and_model", "objective_function", "run_recbole_cmr"}
    assert recbole_cmr.get_model("FeCoSR") is FeCoSR  # the plugin's own model first
    assert recbole_cmr.get_model("SASRec") is SASRec  # then RecBole's
    trainer = recbole_cmr.get_trainer(FeCoSR.type, "FeCoSR")
    assert issubclass(trainer, MultiMarketTrainerMixin) and issubclass(trainer, Trainer)
    config = recbole_cmr.Config(model="FeCoSR", dataset="xmrec-mini", config_dict={"markets": ["in"]})
    assert isinstance(config, RecBoleConfig) and config["train_mode"] == "federated"
    assert config["data_path"] == resource_path("dataset", "xmrec-mini")  # the shipped data
    dataset = recbole_cmr.create_dataset(config)
    assert isinstance(dataset, recbole_cmr.MultiMarketDataset) and dataset.markets == ["in"]
    train, valid, test = recbole_cmr.data_preparation(config, dataset)
    assert list(train) == list(valid) == list(test) == ["in"]


def _run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_module_entry_point_runs_the_default_dataset_from_any_directory(tmp_path):
    done = _run(["-m", "recbole_cmr", *QUICK], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = list((tmp_path / "log" / "SASRec").glob("SASRec-xmrec-mini-*.results.json"))
    assert len(results) == 1
    assert set(json.loads(results[0].read_text())["per_market"]) == {"in"}


def test_run_script_from_another_directory(tmp_path):
    done = _run([str(REPO / "run_recbole_cmr.py"), "--model=GRU4Rec", *QUICK], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| macro" in done.stdout + done.stderr


ANOMALY_PROBE = """
import sys, torch
import recbole_cmr
from recbole_cmr import compat

recbole_cmr.get_model("SINE")  # the plain import, first in the process
print(torch.is_anomaly_enabled())

def forget_recbole_models():  # so that the next import runs RecBole's module code again
    for name in [m for m in sys.modules if m.startswith("recbole.model.sequential_recommender")]:
        del sys.modules[name]

for before in (False, True):
    torch.autograd.set_detect_anomaly(before)
    forget_recbole_models()
    import recbole.model.sequential_recommender  # RecBole's sine.py switches anomaly mode on here
    print(torch.is_anomaly_enabled())
    torch.autograd.set_detect_anomaly(before)
    forget_recbole_models()
    compat.import_models_keeping_anomaly_mode()
    print(torch.is_anomaly_enabled())
"""


def test_anomaly_mode_that_recbole_sine_turns_on_is_off_after_import(tmp_path):
    # A fresh process: the anomaly mode is process-wide, and RecBole's import sets it once. Off
    # after the plain import; then, for a process that had it off and one that had it on (a user
    # debugging a NaN), RecBole's import turns it on and the fix restores what the process had.
    probe = _run(["-c", ANOMALY_PROBE], tmp_path)
    assert probe.stdout.split() == ["False", "True", "False", "True", "True"], probe.stderr[-3000:]


def test_main_reads_every_setting_from_the_argv_it_is_given(two_markets, monkeypatch, tmp_path):
    """``main(argv)`` parses ``argv`` (not ``sys.argv``): ``--topk=[5]`` there shapes the metrics,
    and a ``--topk`` on the process's own command line is ignored."""
    import yaml

    from recbole_cmr.__main__ import main

    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({**two_markets, "epochs": 1}))
    monkeypatch.setattr(sys, "argv", ["pytest", "--topk=[20]", "--seed=99"])
    result = main(["--model=SASRec", "--dataset=xm2", f"--config_files={settings}", "--topk=[5]",
                   "--valid_metric=NDCG@5", "--seed=7"])
    assert set(result["test_result"]) == {"hit@5", "ndcg@5", "mrr@5"}
    saved = json.loads(open(result["results_files"][0]).read())
    assert saved["test_result"] == dict(result["test_result"])
    again = recbole_cmr.run_recbole_cmr(model="SASRec", dataset="xm2", config_file_list=[str(settings)],
                                        argv=["--topk=[5]", "--valid_metric=NDCG@5", "--seed=7"],
                                        saved=False)
    assert again["per_market"]["jp"]["test"] == result["per_market"]["jp"]["test"]


def test_command_line_default_dataset_follows_the_model_type(monkeypatch):
    """``python run_recbole_cmr.py --model=PF-MSMTrec`` runs on the shipped CTR data set, a
    sequential model on xmrec-mini; an explicit --dataset always wins."""
    import recbole_cmr.__main__ as cli
    import recbole_cmr.quick_start as quick_start

    assert cli.default_dataset("PF-MSMTrec") == "ml100k-scenarios"
    assert cli.default_dataset("DeepFM") == "ml100k-scenarios"
    assert cli.default_dataset("SASRec") == "xmrec-mini"
    assert cli.default_dataset("MKT") == cli.default_dataset("SharedBottom") == "ml100k-entities"
    calls = []
    monkeypatch.setattr(quick_start, "run_recbole_cmr", lambda **kw: calls.append(kw))
    cli.main(["--model=PFMSMTrec"])
    cli.main(["--model=MMoE", "--dataset=ali-ccp"])
    assert [c["dataset"] for c in calls] == ["ml100k-scenarios", "ali-ccp"]
