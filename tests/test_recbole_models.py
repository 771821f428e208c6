"""Smoke run of every model, as RecBole's ``tests/model/test_model_auto.py``: every RecBole model
class and every recbole_cmr model trains one epoch, validates, saves its checkpoint, reloads it
and tests through the plugin's ``objective_function``, so a break of today's stack (numpy,
scipy, torch, pandas) shows up as a named failing model.

Models are found as RecBole's ``get_model`` finds them: ``<kind>_recommender/<name lower>.py``
defining class ``<name>``. A model that needs a package neither RecBole nor the plugin installs
(dgl, faiss, lightgbm, xgboost, ...: the run raises ``ModuleNotFoundError`` for it) is skipped
with that reason. A defect of RecBole 1.2.1 itself (``RECBOLE_BUGS``) is a strict expected
failure: it fails once the model runs, so the mark goes.
"""

import ast
import importlib.util
import pkgutil
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import recbole_cmr  # noqa: F401  (the stack fixes)
from recbole_cmr.quick_start import objective_function
from recbole_cmr.utils import resource_path

# The tiny atomic dataset every RecBole model runs on.
N_USERS, N_ITEMS, PER_USER = 30, 120, 10  # CPR models rank 100 reranker candidates: > 100 items
N_EXTRA_ENTITIES, N_RELATIONS, VECTOR_DIM = 10, 2, 8
ONE_EPOCH = {"epochs": 1, "pretrain_epochs": 1, "save_step": 1, "show_progress": False,
             "state": "ERROR", "train_batch_size": 64, "eval_batch_size": 256,
             "MAX_ITEM_LIST_LENGTH": 5}
BY_PACKAGE = {
    # RecBole's test_model_auto gives its context-aware models a label from the rating; the
    # float item field is embedded (DSSM counts every float field as embedded).
    "context_aware_recommender": {"threshold": {"rating": 4}, "numerical_features": ["price"]},
}
# Pretrained knowledge-graph vectors, set up as RecBole's KSR / GRU4RecKG docs say, with
# sequential.yaml's split (RecBole does not load it for them) and, for their CE loss, no negative
# sampling (the plugin's Config sets that by itself, RecBole's does not).
pytestmark = pytest.mark.usefixtures("shared_text_embeddings")  # MiniLM encodes once per run

KG_SEQUENTIAL = {"alias_of_entity_id": ["ent_id"], "alias_of_relation_id": ["rel_id"],
                 "preload_weight": {"ent_id": "ent_vec", "rel_id": "rel_vec"},
                 "additional_feat_suffix": ["ent_feature", "rel_feature"],
                 "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
                 "train_neg_sample_args": None}
BY_MODEL = {
    "KSR": {**KG_SEQUENTIAL, "kg_embedding_size": VECTOR_DIM},
    "GRU4RecKG": {**KG_SEQUENTIAL, "embedding_size": VECTOR_DIM},
    "KTUP": {"train_rec_step": 1, "train_kg_step": 1},  # as RecBole's own test
}
# Expected failures, ``model: (error, reason)``. RecBole 1.2.1 defects of its own, on any stack:
RECBOLE_BUGS = {
    "KSR": (RuntimeError, "RecBole 1.2.1 keeps KSR's preloaded relation vectors in float64 "
                          "(np.zeros) and multiplies them with float32 states (float != double)"),
}
# Plugin models run on a copy of the shipped data set their method is built for, cut to its
# first users per market; the data set's yaml (properties/dataset) applies as in any run.
PLUGIN_DATASETS = {
    "ANT": "movielens-markets", "FeCoSR": "xmrec-mini", "FedAvgSASRec": "xmrec-mini",
    "PretrainFinetune": "xmrec-mini", "EntityDNN": "ml100k-entities", "MKT": "ml100k-entities",
    "PLE": "ml100k-entities", "SharedBottom": "ml100k-entities", "MMoE": "ml100k-scenarios",
    "PFMSMTrec": "ml100k-scenarios",
}
PLUGIN_MARKETS = {"xmrec-mini": ["in", "jp"], "movielens-markets": ["ml100k", "east", "south"]}
USERS_PER_MARKET = 12
PLUGIN_FAST = {"MAX_ITEM_LIST_LENGTH": 10, "train_batch_size": 512}
FEDERATED_FAST = {"fed_rounds": 1}


def _folder(package):
    return importlib.util.find_spec(package).submodule_search_locations[0]


def _syntax_tree(path):
    with warnings.catch_warnings():  # RecBole's docstrings hold invalid escapes
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(Path(path).read_text(encoding="utf-8"))


def model_files(root):
    """``[(kind package, model name)]`` of every model file below ``root`` (``recbole.model``:
    ``<kind>_recommender/<name lower>.py`` defining class ``<name>``), read without importing
    them (exlib_recommender does not import without lightgbm)."""
    models = []
    for package in pkgutil.iter_modules([_folder(root)]):
        if package.ispkg:
            folder = _folder(f"{root}.{package.name}")
            for info in pkgutil.iter_modules([folder]):
                tree = _syntax_tree(Path(folder, info.name + ".py"))
                models += [(package.name, n.name) for n in tree.body
                           if isinstance(n, ast.ClassDef) and n.name.lower() == info.name]
    return models


def _run_or_skip(model, run):
    """``run()``; a ``ModuleNotFoundError`` for a package that is not installed skips the test."""
    try:
        return run()
    except ModuleNotFoundError as err:
        package = (err.name or "").split(".")[0]
        if not package or package.startswith("recbole") or importlib.util.find_spec(package):
            raise
        pytest.skip(f"{model} needs {package}, which neither RecBole nor recbole_cmr installs")


def _write(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Data path of dataset ``tiny``: ratings with time, user and item features, a knowledge
    graph (every item an entity) and pretrained entity / relation vectors, as RecBole's atomic
    files (``tiny`` is also the only market's name for the plugin)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("recbole_models")
    folder = root / "tiny"
    folder.mkdir()
    pairs = [(u, i) for u in range(1, N_USERS + 1)
             for i in rng.choice(N_ITEMS, PER_USER, replace=False) + 1]
    _write(folder / "tiny.inter", ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
           [(u, i, rng.integers(1, 6), t) for t, (u, i) in enumerate(pairs)])
    _write(folder / "tiny.user", ["user_id:token", "age:token", "gender:token"],
           [(u, rng.integers(1, 5), rng.choice(["F", "M"])) for u in range(1, N_USERS + 1)])
    _write(folder / "tiny.item", ["item_id:token", "price:float", "class:token_seq"],
           [(i, round(rng.uniform(1, 100), 2), " ".join(map(str, rng.choice(5, 2, replace=False))))
            for i in range(1, N_ITEMS + 1)])
    entities = [f"e{i}" for i in range(1, N_ITEMS + N_EXTRA_ENTITIES + 1)]
    relations = [f"r{r}" for r in range(N_RELATIONS)]
    _write(folder / "tiny.link", ["item_id:token", "entity_id:token"],
           [(i, f"e{i}") for i in range(1, N_ITEMS + 1)])
    _write(folder / "tiny.kg", ["head_id:token", "relation_id:token", "tail_id:token"],
           [(f"e{i}", r, rng.choice(entities)) for i in range(1, N_ITEMS + 1) for r in relations])
    for name, ids in (("ent", entities), ("rel", relations)):
        _write(folder / f"tiny.{name}_feature", [f"{name}_id:token", f"{name}_vec:float_seq"],
               [(i, " ".join(f"{v:.3f}" for v in rng.standard_normal(VECTOR_DIM))) for i in ids])
    return root


def _settings(tiny, tmp_path, package, model):
    return {**ONE_EPOCH, **BY_PACKAGE.get(package, {}), **BY_MODEL.get(model, {}), "model": model,
            "dataset": "tiny", "data_path": str(tiny), "load_col": None,
            "checkpoint_dir": str(tmp_path / "saved")}


def _assert_tested(results, model):
    """Each ``{metric: value}`` of ``results`` holds numbers."""
    assert results, model
    for result in results:
        assert result and all(isinstance(v, float) for v in result.values()), (model, result)


def _param(package, model, expected):
    """A test case; ``expected`` (``(error, reason)`` or None) marks it a strict expected failure."""
    marks = [pytest.mark.xfail(raises=expected[0], reason=expected[1], strict=True)] if expected else []
    return pytest.param(package, model, id=model, marks=marks)


@pytest.mark.parametrize("package,model", [
    _param(package, model, RECBOLE_BUGS.get(model))
    for package, model in model_files("recbole.model")])
def test_recbole_model_runs_through_the_plugin(tiny, tmp_path, package, model):
    """One epoch of each RecBole model; the test reloads the best checkpoint (saved=True)."""
    result = _run_or_skip(model, lambda: objective_function(
        config_dict=_settings(tiny, tmp_path, package, model), saved=True))
    _assert_tested([m["test"] for m in result["per_market"].values()], model)


def _read(path):
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def _keep(path, target, field, values):
    """Write the rows of atomic file ``path`` whose ``field`` is in ``values`` to ``target``."""
    frame = _read(path)
    frame[frame[field].isin(values)].to_csv(target / path.name, sep="\t", index=False)


def _first_users(shipped, target, markets):
    """Copy the shipped data set ``shipped`` to ``target`` with only the first users of each of
    ``markets`` (every market when None): their ``.inter`` and ``.user`` rows and the ``.item``
    rows of the items they rated; other data files are copied whole."""
    target.mkdir(parents=True)
    items = set()
    for file in Path(shipped).glob("*.inter"):
        if markets is None or file.stem in markets:
            users = sorted(_read(file)["user_id:token"].unique())[:USERS_PER_MARKET]
            _keep(file, target, "user_id:token", users)
            items |= set(_read(target / file.name)["item_id:token"])
            if file.with_suffix(".user").exists():
                _keep(file.with_suffix(".user"), target, "user_id:token", users)
    for file in Path(shipped).iterdir():
        if file.suffix == ".item":
            _keep(file, target, "item_id:token", items)
        elif file.suffix not in (".inter", ".user", ".md"):
            shutil.copy(file, target / file.name)


@pytest.fixture(scope="module")
def shipped_cuts(tmp_path_factory):
    """Data path holding a cut of each shipped data set the plugin models use."""
    root = tmp_path_factory.mktemp("plugin_models")
    for name in sorted(set(PLUGIN_DATASETS.values())):
        _first_users(resource_path("dataset", name), root / name, PLUGIN_MARKETS.get(name))
    return root


def test_every_plugin_model_has_a_data_set():
    models = {model for _, model in model_files("recbole_cmr.model")}
    assert models == set(PLUGIN_DATASETS), "list each plugin model (and only those) in PLUGIN_DATASETS"


def _federated(model):
    with open(resource_path("properties", "model", f"{model}.yaml"), encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get("train_mode") == "federated"


@pytest.mark.parametrize("model", [pytest.param(m, id=m) for _, m in model_files("recbole_cmr.model")])
def test_plugin_model_runs_in_its_train_mode(shipped_cuts, tmp_path, model):
    """One epoch (one federated round) of each plugin model in its yaml's train mode."""
    result = _run_or_skip(model, lambda: objective_function(config_dict={
        **ONE_EPOCH, **PLUGIN_FAST, **(FEDERATED_FAST if _federated(model) else {}),
        "model": model, "dataset": PLUGIN_DATASETS[model], "data_path": str(shipped_cuts),
        "checkpoint_dir": str(tmp_path / "saved"), "text_cache_dir": str(shipped_cuts / "text_cache"),
    }, saved=True))
    _assert_tested([m["test"] for m in result["per_market"].values()], model)
