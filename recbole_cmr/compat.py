"""Every fix recbole 1.2.1 needs on today's stack, and nothing else.

* numpy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``, which RecBole's
  ``Config.compatibility_settings`` reads, and ``np.float``/``np.bool``, which its metrics,
  ``Interaction`` and ``HyperTuning`` use. :func:`install_numpy_aliases` puts them back.
* torch >= 2.6 loads checkpoints with ``weights_only=True``; RecBole pickles its whole ``Config``
  into every checkpoint, so its ``Trainer.evaluate(load_best_model=True)`` fails. The plugin's
  checkpoints hold plain data only (:func:`checkpoint_safe`) and load with
  :func:`load_checkpoint` (``weights_only=True``).
* ``recbole.quick_start`` imports ray 2.6.3, which does not import with numpy 2; the plugin has
  its own quick start and never imports that module.
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

import enum
import warnings

import numpy as np
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
    """Hide warnings recbole 1.2.1 triggers on every run with current torch/pandas."""
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\..*is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\..*")


def import_models_keeping_anomaly_mode():
    """Import ``recbole.model.sequential_recommender`` without the anomaly mode SINE turns on."""
    enabled = torch.is_anomaly_enabled()
    import recbole.model.sequential_recommender  # noqa: F401

    torch.autograd.set_detect_anomaly(enabled)


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
    """Load a recbole_cmr checkpoint with ``weights_only=True``.

    Raises a ``ValueError`` that says what to do when the file is a plain RecBole checkpoint
    (which pickles the whole Config object and cannot be loaded safely).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file [{path}] does not exist.") from None
    except Exception as err:  # torch raises UnpicklingError subclasses that differ across versions
        if "Weights only load failed" not in str(err):
            raise
        raise ValueError(
            f"[{path}] is not a recbole_cmr checkpoint: it pickles Python objects (plain RecBole "
            "checkpoints hold the whole Config) and cannot be loaded with weights_only=True. "
            "Re-train through recbole_cmr, or load it yourself with "
            "torch.load(path, weights_only=False) if you trust the file."
        ) from None


install_numpy_aliases()
silence_known_warnings()
import_models_keeping_anomaly_mode()

