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
    for name in ("run_recbole_cmr", "objective_function", "load_data_and_model", "Config",
                 "create_dataset", "data_preparation", "get_model", "get_trainer"):
        assert callable(getattr(recbole_cmr, name))


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
