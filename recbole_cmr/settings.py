"""Settings checked before anything is built.

Spelling: every setting a user gives (config files, ``config_dict``, command line) is one that
RecBole (its ``properties/`` yaml files, models' included, and :data:`RECBOLE_UNLISTED`),
recbole_cmr (``overall.yaml``, a model yaml), a dataset yaml (RecBole's or recbole_cmr's, any
dataset) defines, or one the user lists in ``extra_settings``; anything else is a ValueError
with a "did you mean" hint.

Type and range: each key of :data:`SCHEMA` has its type and range; every other number, bool or
list that recbole_cmr's ``overall.yaml`` or the model's yaml defines keeps its default's type.
"""

import difflib
import glob
import math
import os
from functools import lru_cache

import yaml

from recbole_cmr.utils import resource_path

# Settings RecBole reads that none of its yaml files define.
RECBOLE_UNLISTED = frozenset({
    "model", "dataset",  # Config's arguments, also given as settings
    "config_files",      # run_recbole's command line (--config_files), read by Config too
    "encoding",          # Dataset: the atomic files' text encoding
    "tail_ratio",        # TailPercentage metric
})
# Settings of RecBole's multi-process launcher (run_recbole(nproc=...)), which recbole_cmr
# does not have: RecBole's Config reads them only when that launcher sets local_rank.
DISTRIBUTED = frozenset({"nproc", "world_size", "offset", "ip", "port", "local_rank"})
OPT_OUT = "extra_settings"


# ranges: (test, text)
AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
POSITIVE = (lambda v: v > 0, "> 0")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")

# key -> (type, range, None allowed); type is int, float (an int is fine), bool or list.
SCHEMA = {
    # RecBole's, as recbole_cmr uses them (epochs 0: evaluate the initial model)
    "epochs": (int, AT_LEAST_0, False),
    "train_batch_size": (int, AT_LEAST_1, False),
    "eval_batch_size": (int, AT_LEAST_1, False),
    "learning_rate": (float, POSITIVE, False),
    "weight_decay": (float, AT_LEAST_0, False),
    "stopping_step": (int, AT_LEAST_0, False),
    "eval_step": (int, AT_LEAST_0, False),
    "topk": ("int or list of int", AT_LEAST_1, False),
    "seed": (int, None, False),
    "MAX_ITEM_LIST_LENGTH": (int, AT_LEAST_1, False),
    # model sizes and dropouts (RecBole's and recbole_cmr's models: every default fits)
    **{k: (int, AT_LEAST_1, False) for k in (
        "hidden_size", "inner_size", "embedding_size", "n_layers", "n_heads", "n_experts")},
    **{k: (float, FRACTION, False) for k in (
        "hidden_dropout_prob", "attn_dropout_prob", "dropout_prob", "adaptor_dropout")},
    # recbole_cmr's (fed_client_fraction, fed_min_clients, *learning_rate_decay: checked where
    # they are read, as they depend on the markets / train mode)
    "fed_rounds": (int, AT_LEAST_1, False),
    "fed_local_epochs": (int, AT_LEAST_1, False),
    "fed_local_steps": (int, AT_LEAST_1, True),
    "fed_rep_head_epochs": (int, AT_LEAST_0, False),
    "history_max_len": (int, AT_LEAST_1, False),
    "image_feature_dim": (int, AT_LEAST_1, False),
    "target_text_feature_dim": (int, AT_LEAST_1, False),
    "price_buckets": (int, AT_LEAST_1, False),
    "text_batch_size": (int, AT_LEAST_1, False),
    "finetune_lr_scale": (float, AT_LEAST_0, False),
    "server_learning_rate": (float, POSITIVE, True),
    "server_momentum": (float, FRACTION, True),
    "eta": (float, POSITIVE, True),
    "beta_1": (float, FRACTION, True),
    "beta_2": (float, FRACTION, True),
    "tau": (float, POSITIVE, True),
    "eta_l": (float, POSITIVE, True),
    "proximal_mu": (float, AT_LEAST_0, True),
}


def check_settings(config):
    """Raise ValueError (one line) for a misspelled, unknown or out-of-range setting.

    Args:
        config: a :class:`recbole_cmr.config.Config` whose ``external_config_dict``,
            ``internal_config_dict`` and ``final_config_dict`` are loaded (before RecBole's
            defaults, the device and the samplers are set up).
    """
    check_known_settings(config)
    check_setting_values(config)


# ---- where settings are defined --------------------------------------------------------------


def recbole_properties(*parts):
    """A path under RecBole's ``properties/`` folder."""
    import recbole

    return os.path.join(os.path.dirname(recbole.__file__), "properties", *parts)


def yaml_keys(path):
    """The top-level keys of the yaml file ``path`` (none if it is missing or not yaml)."""
    if not os.path.isfile(path):
        return set()
    with open(path, encoding="utf-8") as f:
        try:
            return set(yaml.safe_load(f) or {})
        except yaml.YAMLError:
            return set()


@lru_cache(maxsize=None)
def recbole_model_settings(model):
    """The settings RecBole's own yaml for ``model`` defines (none for a plugin model)."""
    return frozenset(yaml_keys(recbole_properties("model", f"{model}.yaml")))


# ---- spelling --------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def shared_settings():
    """Settings every model and dataset knows: RecBole's overall, dataset, quick-start and model
    yaml, every dataset and model yaml of recbole_cmr, its overall.yaml, :data:`RECBOLE_UNLISTED`.

    A setting of another model is known (harnesses and test fixtures give one set of sizes to
    models of several kinds); one that only other recbole_cmr models define is an error of its
    own (:func:`recbole_cmr.config.check_model_settings`).
    """
    recbole = recbole_properties()
    files = [os.path.join(recbole, "overall.yaml"),
             *glob.glob(os.path.join(recbole, "quick_start_config", "*.yaml")),
             *glob.glob(os.path.join(recbole, "model", "*.yaml")),
             *glob.glob(os.path.join(resource_path("properties", "model"), "*.yaml")),
             *[p for p in glob.glob(os.path.join(recbole, "dataset", "*.yaml"))
               if not os.path.basename(p).endswith("url.yaml")],  # url.yaml: dataset names
             *glob.glob(os.path.join(resource_path("properties", "dataset"), "*.yaml")),
             resource_path("properties", "overall.yaml")]
    keys = set(RECBOLE_UNLISTED)
    for path in files:
        keys |= yaml_keys(path)
    return frozenset(keys)


def extra_settings(config):
    """The user's own setting names (``extra_settings``), checked to be a list of names."""
    extra = config.final_config_dict.get(OPT_OUT) or []
    if not isinstance(extra, (list, tuple)) or not all(isinstance(k, str) for k in extra):
        raise ValueError(f"{OPT_OUT}={extra!r} is not a list of setting names: expected e.g. "
                         f"{OPT_OUT}: [my_key].")
    return set(extra)


def check_known_settings(config):
    """Raise ValueError for a user setting that nothing defines, with the nearest known name."""
    known = shared_settings() | set(config.internal_config_dict) | extra_settings(config)
    for key in config.external_config_dict:
        if key in DISTRIBUTED:
            raise ValueError(f"{key} is a setting of RecBole's multi-process launcher "
                             "(run_recbole(nproc=...)), which recbole_cmr does not use: drop it.")
        if key not in known:
            raise ValueError(f"{key} is not a setting of RecBole, its models, the datasets or "
                             f"recbole_cmr{_hint(key, known)}; for a setting of "
                             f"your own, list it in {OPT_OUT}: [{key}].")


def _hint(key, known):
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


# ---- type and range --------------------------------------------------------------------------


def check_setting_values(config):
    """Raise ValueError for a setting whose value has the wrong type or is out of range."""
    settings = config.final_config_dict
    for key, spec in value_specs(config).items():
        if key in settings:
            check_value(key, settings[key], *spec)


def value_specs(config):
    """``{key: (type, range, None allowed)}``: :data:`SCHEMA`, and the default's type for every
    other number, bool or list of recbole_cmr's overall.yaml and ``config``'s model yaml."""
    properties = resource_path("properties")
    defaults = yaml_keys(os.path.join(properties, "overall.yaml")) | \
        yaml_keys(os.path.join(properties, "model", f"{config.model}.yaml"))
    specs = {}
    for key in defaults:
        kind = _kind(config.internal_config_dict.get(key))  # as RecBole's yaml loader read it
        if kind is not None:
            specs[key] = (kind, None, True)
    specs.update(SCHEMA)
    return specs


def _kind(value):
    for kind in (bool, int, float, list):
        if isinstance(value, kind):
            return kind
    return None


def check_value(key, value, kind, valid_range, none_ok):
    """Raise ValueError naming ``key``, ``value`` and what is expected, unless ``value`` is a
    ``kind`` in ``valid_range`` (or None with ``none_ok``)."""
    if value is None and none_ok:
        return
    expected = _expected(kind, valid_range)
    values = _values(value, kind)
    if values is None:
        raise ValueError(f"{key}={value!r} is not {_article(kind)}: expected {expected}.")
    if valid_range is not None and not all(valid_range[0](v) for v in values):
        raise ValueError(f"{key}={value!r} is out of range: expected {expected}.")


def _values(value, kind):
    """The numbers of ``value`` to range-check, or None if it is not a ``kind``."""
    if kind == "int or list of int":
        items = value if isinstance(value, list) and value else [value]
        return items if all(_is(v, int) for v in items) else None
    return [value] if _is(value, kind) else None


def _is(value, kind):
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and not math.isnan(value)
    return isinstance(value, kind)


def _article(kind):
    name = kind if isinstance(kind, str) else kind.__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _expected(kind, valid_range):
    return _article(kind) + (f" {valid_range[1]}" if valid_range else "")
