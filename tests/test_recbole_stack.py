"""``import recbole_cmr`` fixes RecBole itself on today's stack (recbole_cmr/compat.py): RecBole's
own quick start runs and reloads its checkpoints with ``weights_only=True``, which still refuses
anything but the data RecBole's checkpoints hold; scipy's dok matrices build RecBole's graphs."""

import collections
import copy
import glob
import pickle
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import recbole_cmr  # noqa: F401  (the stack fixes)
from recbole_cmr import compat
from recbole_cmr.config import Config as PluginConfig
from conftest import SHIPPED

QUICK = {"epochs": 1, "show_progress": False, "state": "ERROR", "train_batch_size": 512}


@pytest.fixture
def jp(tmp_path):
    """Settings of a plain RecBole data set ``jp`` (the shipped xmrec-mini market) under tmp_path."""
    (tmp_path / "data" / "jp").mkdir(parents=True)
    shutil.copy(SHIPPED / "jp.inter", tmp_path / "data" / "jp" / "jp.inter")
    return {**QUICK, "data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved")}


def _only_checkpoint(settings):
    files = glob.glob(f"{settings['checkpoint_dir']}/*.pth")
    assert len(files) == 1, files
    return files[0]


def test_recbole_run_recbole_and_load_data_and_model_after_the_import(jp):
    """RecBole's quick start imports (ray 2.6.3 on numpy 2), its Trainer reloads the best
    checkpoint it wrote, and ``load_data_and_model`` rebuilds config, data and model from it: the
    model tests to the very numbers of the run."""
    from recbole.quick_start import load_data_and_model, run_recbole
    from recbole.utils import get_trainer

    result = run_recbole(model="BPR", dataset="jp", config_dict=jp)
    config, model, _, _, _, test = load_data_and_model(_only_checkpoint(jp))
    assert (config["model"], config["dataset"], config.model_class) == ("BPR", "jp", model.__class__)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    assert trainer.evaluate(test, load_best_model=False) == result["test_result"]


def test_recbole_checkpoint_loads_weights_only_with_its_config(jp):
    """A RecBole checkpoint holds its Config; ``torch.load`` (``weights_only=True``, as a later
    process loads it) gives back an equal Config that works (yaml loader, model class)."""
    from recbole.config import Config
    from recbole.quick_start import run_recbole

    run_recbole(model="BPR", dataset="jp", config_dict=jp)
    checkpoint = torch.load(_only_checkpoint(jp), weights_only=True)
    original = Config(model="BPR", dataset="jp", config_dict=jp)
    config = checkpoint["config"]
    assert type(config) is Config and config.final_config_dict == original.final_config_dict
    assert config.model_class is original.model_class and config.yaml_loader is original.yaml_loader


@pytest.mark.parametrize("config_class", ["recbole", "plugin"])
def test_config_copies_and_pickles_keep_every_setting(jp, config_class):
    from recbole.config import Config

    cls = Config if config_class == "recbole" else PluginConfig
    config = cls(model="BPR", dataset="jp", config_dict=jp)
    for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert type(copied) is cls and copied.final_config_dict == config.final_config_dict
        assert vars(copied) == vars(config)


class _Calls:
    """Pickles as a call of ``function(*args)``: what a malicious checkpoint holds."""

    def __init__(self, function, *args):
        self.call = function, args

    def __reduce__(self):
        return self.call


def _saved(tmp_path, obj, **kwargs):
    path = tmp_path / "checkpoint.pth"
    torch.save(obj, path, **kwargs)
    return path


def test_weights_only_loading_still_refuses_code(tmp_path):
    """The allow-list opens no call: a pickled call of anything else is refused, and
    ``restore_config`` builds RecBole's and the plugin's Config classes only."""
    with pytest.raises(pickle.UnpicklingError, match="print"):
        torch.load(_saved(tmp_path, {"config": _Calls(print, "pwned")}), weights_only=True)
    with pytest.raises(pickle.UnpicklingError, match=r"not \[subprocess.Popen\]"):
        torch.load(_saved(tmp_path, _Calls(compat.restore_config, "subprocess.Popen", {})),
                   weights_only=True)


def test_checkpoint_recbole_wrote_without_the_fixes_is_refused_with_a_way_out(jp, tmp_path):
    """RecBole 1.2.1 alone writes pickle protocol 4, which weights-only loading cannot read."""
    from recbole.config import Config

    path = _saved(tmp_path, {"config": Config(model="BPR", dataset="jp", config_dict=jp)},
                  pickle_protocol=4)
    with pytest.raises(ValueError, match=r"without `import recbole_cmr`.*weights_only=False"):
        compat.load_checkpoint(path)


def test_other_parameter_keeps_data_and_leaves_modules_to_the_state_dict(tmp_path):
    """What RecBole models keep besides their weights (scipy / numpy matrices, RippleNet's
    defaultdict) round-trips weights-only; submodules are left out (their weights are in
    ``state_dict``)."""

    class Model(torch.nn.Module):
        other_parameter_name = ["matrix", "similarity", "ripple", "layer"]

        def __init__(self):
            super().__init__()
            self.matrix = sp.random(4, 3, density=0.5, format="csr", random_state=0)
            self.similarity = np.asmatrix(np.arange(9.0).reshape(3, 3))
            self.ripple = collections.defaultdict(list, {1: [torch.arange(2)]})
            self.layer = torch.nn.Linear(2, 2)

        def other_parameter(self):
            return {key: getattr(self, key) for key in self.other_parameter_name}

    model = Model()
    state = compat.other_parameter_state(model)
    assert set(state) == {"matrix", "similarity", "ripple"}
    loaded = torch.load(_saved(tmp_path, state), weights_only=True)
    assert (loaded["matrix"] != model.matrix).nnz == 0 and type(loaded["matrix"]) is sp.csr_matrix
    assert type(loaded["similarity"]) is np.matrix and (loaded["similarity"] == model.similarity).all()
    assert type(loaded["ripple"]) is dict and torch.equal(loaded["ripple"][1][0], model.ripple[1][0])


def test_dok_matrix_takes_entries_as_recbole_graph_models_give_them():
    """LightGCN, NGCF, NCL, GCMC, SpectralCF, KGIN and MCCLK fill their adjacency matrix with
    ``dok_matrix._update({(row, col): value})``."""
    matrix = sp.dok_matrix((3, 4), dtype=np.float32)
    matrix._update({(0, 1): 1, (2, 3): 1})
    assert matrix.nnz == 2
    assert np.array_equal(matrix.toarray(), np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]))
