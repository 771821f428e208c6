"""Every fix recbole 1.2.1 needs on today's stack, and nothing else. ``import recbole_cmr``
installs them for the whole process, so RecBole's own ``run_recbole`` / ``load_data_and_model``
work too.

* numpy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``, which RecBole's
  ``Config.compatibility_settings`` reads, ``np.float``/``np.bool``, which its metrics,
  ``Interaction`` and ``HyperTuning`` use, and ``np.bool8``, which ray 2.6.3 (imported by
  ``recbole.quick_start``) uses. :func:`install_numpy_aliases` puts them back; with setuptools
  < 81 (pinned: ray imports ``pkg_resources``) ``from recbole.quick_start import run_recbole``
  then imports.
* scipy's ``dok_matrix`` keeps its entries in ``_dict`` and has no ``_update`` any more (scipy
  1.17 here), with which LightGCN, NGCF, NCL, GCMC, SpectralCF, KGIN and MCCLK build their
  graphs: :func:`install_scipy_dok_update` puts it back (the unchecked dict update it was).
  (KGAT builds its graph with dgl, which neither RecBole nor the plugin installs.)
* torch >= 2.6 loads checkpoints with ``weights_only=True``. RecBole 1.2.1 writes its Trainer's
  checkpoints with pickle protocol 4, which the weights-only unpickler cannot read at all, and
  pickles its whole ``Config`` (a class, a yaml loader, enums) and any ``other_parameter``
  (tensors, numpy arrays, scipy matrices, submodules, a defaultdict). :func:`install_checkpoint_fixes`
  makes every RecBole checkpoint written after the import load with ``weights_only=True``, so
  no file is ever loaded with ``weights_only=False`` and nothing in a checkpoint can run code,
  whoever wrote it:

  - ``Trainer._save_checkpoint`` writes torch's default protocol (2) and
    :func:`other_parameter_state`: submodules left out (their weights are in ``state_dict``;
    FDSA, DIN, DIEN, GRU4RecF and SASRecF list one), a defaultdict (RippleNet) as a dict. The
    plugin's trainer stores ``other_parameter`` the same way;
  - a ``Config`` pickles as :func:`restore_config` and plain data. restore_config rebuilds only
    RecBole's or recbole_cmr's ``Config`` class, re-creates its yaml loader and looks its model
    class up by name in RecBole's (or the plugin's) own model modules (``None`` when there is
    none, e.g. a model class passed in by hand: nothing reads it after ``Config.__init__``); it
    runs none of ``Config.__init__`` (reads no file, sets up no device or process group);
  - ``torch.serialization.add_safe_globals`` allows exactly (:func:`checkpoint_globals`):
    restore_config, the three enums a Config holds (ModelType, InputType, EvaluatorType), numpy's
    array, matrix and scalar reconstruction with its dtype classes, and scipy's csr / csc / coo /
    lil matrices (the ``other_parameter`` of EASE, ItemKNN, SLIMElastic, AsymKNN). Each builds
    data only.

  Why not ``weights_only=False`` for the files this process wrote: ``load_data_and_model``
  loads files of earlier processes, which need the safe path anyway, and one path serves both.
  What a file still decides is data: its Config's ``data_path``, ``checkpoint_dir``,
  ``device``... (RecBole keeps its settings in the checkpoint): load files whose settings you
  trust. A checkpoint RecBole wrote without this import (protocol 4) cannot be loaded safely;
  torch says so, and :func:`load_checkpoint` names the way out. The plugin's own checkpoints hold
  plain data (:func:`checkpoint_safe`) and load with :func:`load_checkpoint`.
* pandas 3 breaks RecBole's token_seq handling and ``fillna(inplace=True)``: pandas is pinned
  ``<3`` in setup.py. hyperopt is pinned to 0.2.5 (RecBole's exhaustive search needs it).
* ``recbole/model/sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)``
  when imported, for the whole process: every model then records a stack trace per operation and
  checks every gradient, which makes SASRec train about 1.7 x slower on CPU (same numbers).
  :func:`import_models_keeping_anomaly_mode` imports RecBole's models and restores the mode the
  process had (call ``torch.autograd.set_detect_anomaly(True)`` afterwards to debug a NaN).
* RecBole's evaluation ``Collector.get_data_struct`` calls ``.cpu()`` on the int and Counter it
  stores for ItemCoverage, GiniIndex, AveragePopularity and TailPercentage, so those metrics crash;
  the plugin's trainers use ``recbole_cmr.trainer.Collector``, which passes them through.
"""

import collections
import copyreg
import enum
import functools
import pickle
import warnings

import numpy as np
import scipy.sparse as sp
import torch

_NUMPY_ALIASES = {
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
    "float": np.float64,
    "int": np.int_,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "bool": np.bool_,
    "bool8": np.bool_,
    "long": np.int_,
    "unicode": np.str_,
}


def install_numpy_aliases():
    """Define the numpy 1.x names recbole 1.2.1 still uses, where numpy 2 no longer has them."""
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def silence_known_warnings():
    """Hide warnings recbole 1.2.1 triggers on every run with current torch/pandas (and ray
    2.6.3, which imports ``pkg_resources``, when ``recbole.quick_start`` is imported)."""
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\..*is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\..*")
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)


def _dok_update(self, data):
    """``dok_matrix._update`` as scipy had it: put ``{(row, col): value}`` entries, unchecked."""
    self._dict.update(data)


def install_scipy_dok_update():
    """Give ``scipy.sparse.dok_matrix`` back the ``_update`` RecBole's graph models call."""
    if not hasattr(sp.dok_matrix, "_update"):
        sp.dok_matrix._update = _dok_update


def import_models_keeping_anomaly_mode():
    """Import ``recbole.model.sequential_recommender`` without the anomaly mode SINE turns on."""
    enabled = torch.is_anomaly_enabled()
    import recbole.model.sequential_recommender  # noqa: F401

    torch.autograd.set_detect_anomaly(enabled)


def _class_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _config_classes():
    """``{name: class}`` of the Config classes :func:`restore_config` rebuilds."""
    from recbole.config import Config
    from recbole_cmr.config import Config as PluginConfig

    return {_class_name(c): c for c in (Config, PluginConfig)}


def _config_model_class(config):
    """The model class ``config.model`` names (the plugin's look-up for the plugin's Config,
    RecBole's for RecBole's), or None where it names none (a model class passed in by hand)."""
    from recbole_cmr.config import Config as PluginConfig

    if isinstance(config, PluginConfig):
        from recbole_cmr.utils import get_model
    else:
        from recbole.utils import get_model
    try:
        return get_model(config.model)
    except (ValueError, ImportError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def _yaml_loader(config_class):
    """``config_class``'s yaml loader, built once (building one adds a resolver to yaml's
    FullLoader class, so a deepcopy of a Config would otherwise add one more each time)."""
    return object.__new__(config_class)._build_yaml_loader()


def restore_config(class_name, state):
    """Rebuild a RecBole ``Config`` from the plain data a checkpoint holds (see the module
    docstring: no ``Config.__init__`` runs, no settings file is read).

    Args:
        class_name (str): ``recbole.config.configurator.Config`` or ``recbole_cmr.config.Config``.
        state (dict): the Config's attributes but ``yaml_loader`` and ``model_class``.
    """
    classes = _config_classes()
    if class_name not in classes:
        raise pickle.UnpicklingError(
            f"restore_config rebuilds {' and '.join(classes)} only, not [{class_name}]."
        )
    config = object.__new__(classes[class_name])
    config.__dict__.update(state)
    config.yaml_loader = _yaml_loader(type(config))
    config.model_class = _config_model_class(config)
    return config


def _reduce_config(config):
    """``Config.__reduce__``: :func:`restore_config` with the Config's plain attributes (a
    subclass restore_config does not know pickles as Python pickles it)."""
    name = _class_name(type(config))
    if name not in _config_classes():
        return copyreg.__newobj__, (type(config),), vars(config)
    state = {k: v for k, v in vars(config).items() if k not in ("yaml_loader", "model_class")}
    return restore_config, (name, state)


def other_parameter_state(model):
    """``model.other_parameter()`` as a checkpoint stores it: submodules are left out (their
    weights are in ``model.state_dict()``; ``load_other_parameter`` sets only what it gets) and a
    ``defaultdict`` (RippleNet's ripple set, read only at the keys it was built with) is stored
    as a dict, which the weights-only unpickler can fill."""
    other = model.other_parameter() or {}
    return {k: dict(v) if isinstance(v, collections.defaultdict) else v
            for k, v in other.items() if not isinstance(v, torch.nn.Module)}


def _save_recbole_checkpoint(self, epoch, verbose=True, **kwargs):
    """RecBole's ``Trainer._save_checkpoint``, written with torch's default pickle protocol (2,
    which ``weights_only=True`` reads; RecBole writes 4) and :func:`other_parameter_state`."""
    from recbole.utils import set_color

    if not self.config["single_spec"] and self.config["local_rank"] != 0:
        return
    saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
    state = {
        "config": self.config,
        "epoch": epoch,
        "cur_step": self.cur_step,
        "best_valid_score": self.best_valid_score,
        "state_dict": self.model.state_dict(),
        "other_parameter": other_parameter_state(self.model),
        "optimizer": self.optimizer.state_dict(),
    }
    torch.save(state, saved_model_file)
    if verbose:
        self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")


def checkpoint_globals():
    """What ``weights_only=True`` loading may build besides torch's own: exactly what RecBole's
    checkpoints hold (module docstring)."""
    from recbole.utils import EvaluatorType, InputType, ModelType

    numpy_dtypes = [getattr(np.dtypes, name) for name in np.dtypes.__all__]
    return [
        restore_config, ModelType, InputType, EvaluatorType,
        np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.matrix,
        np.dtype, *numpy_dtypes, sp.csr_matrix, sp.csc_matrix, sp.coo_matrix, sp.lil_matrix,
    ]


def install_checkpoint_fixes():
    """Make RecBole's checkpoints load with ``weights_only=True`` (module docstring)."""
    from recbole.config import Config
    from recbole.trainer import Trainer

    Config.__reduce__ = _reduce_config
    Trainer._save_checkpoint = _save_recbole_checkpoint
    torch.serialization.add_safe_globals(checkpoint_globals())


def checkpoint_safe(value):
    """Turn ``value`` into data that ``torch.load(weights_only=True)`` accepts.

    Tensors, numbers, strings, ``None`` and containers of them pass; numpy scalars become Python
    numbers, enums their name, anything else its ``str``.
    """
    if isinstance(value, np.generic):  # before float: np.float64 subclasses float
        return value.item()
    if isinstance(value, (torch.Tensor, str, bool, int, float)) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {str(k): checkpoint_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [checkpoint_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return str(value)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True``: the plugin's, or RecBole's written after
    ``import recbole_cmr`` (module docstring).

    Raises a ``ValueError`` that says what to do when the file holds more (a checkpoint RecBole
    wrote without the import: pickle protocol 4, its Config pickled whole), and one naming the
    file when it is no checkpoint at all or a damaged one (text, empty, truncated).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file [{path}] does not exist.") from None
    except Exception as err:  # torch raises UnpicklingError subclasses that differ across versions
        if "Weights only load failed" not in str(err):
            raise ValueError(f"[{path}] is not a recbole_cmr checkpoint or is damaged (torch.load: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no data'}"
                             "): use the .pth file a run wrote, complete.") from None
        raise ValueError(
            f"[{path}] holds Python objects that weights_only=True loading refuses (e.g. RecBole "
            "wrote it without `import recbole_cmr`): re-train after `import recbole_cmr`, or load "
            "it yourself with torch.load(path, weights_only=False) if you trust the file."
        ) from None


install_numpy_aliases()
silence_known_warnings()
install_scipy_dok_update()
import_models_keeping_anomaly_mode()
install_checkpoint_fixes()

