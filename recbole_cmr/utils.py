"""Model and trainer look-up (the plugin first, RecBole as fallback), packaged paths, atomic
checkpoint writes, and the one check of parameter-name pattern settings (:func:`check_patterns`)."""

import contextlib
import fnmatch
import importlib
import os
import re
import tempfile
from logging import getLogger

import torch

from recbole.utils import get_model as get_recbole_model
from recbole.utils import get_trainer as get_recbole_trainer

_PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__))
_MODEL_SUBMODULES = ["sequential_recommender", "context_aware_recommender", "general_recommender"]


def resource_path(*parts):
    """Path of a packaged resource folder (``properties``, ``dataset``).

    In an installed wheel they live inside the package; in a source checkout at the repo's top.
    """
    installed = os.path.join(_PACKAGE_DIR, *parts)
    if os.path.exists(installed):
        return installed
    return os.path.join(os.path.dirname(_PACKAGE_DIR), *parts)


def save_atomic(obj, path):
    """``torch.save(obj, path)`` through a temp file in the same folder and ``os.replace``.

    A write cut short (killed process, full disk) leaves the previous file at ``path`` whole and
    no partial file behind, so a run can always resume from its last complete checkpoint.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _model_module(model_name):
    """The plugin module that would hold ``model_name`` (lower-cased file name), or None."""
    for submodule in _MODEL_SUBMODULES:
        module_path = f"recbole_cmr.model.{submodule}.{model_name.lower()}"
        try:
            if importlib.util.find_spec(module_path) is not None:
                return importlib.import_module(module_path)
        except ModuleNotFoundError:
            continue
    return None


def _unknown_model(model_name, module=None):
    hint = ""
    if module is not None:
        names = [n for n in dir(module) if n.lower() == model_name.lower()]
        hint = f" Did you mean [{names[0]}]?" if names else ""
    return ValueError(
        f"Unknown model [{model_name}]: it is neither a recbole_cmr model nor a RecBole model."
        f"{hint} Model names are case-sensitive, e.g. --model=SASRec, --model=GRU4Rec, --model=BPR."
    )


# Names a paper uses that are not Python identifiers -> the model class.
MODEL_ALIASES = {"PF-MSMTrec": "PFMSMTrec"}


def canonical_model_name(model_name):
    """``model_name`` with paper spellings resolved (``PF-MSMTrec`` -> ``PFMSMTrec``)."""
    return MODEL_ALIASES.get(model_name, model_name)


def get_model(model_name):
    """Return the model class named ``model_name``: recbole_cmr's own first, then RecBole's.

    Raises:
        ValueError: no such model in either package.
    """
    model_name = canonical_model_name(model_name)
    module = _model_module(model_name)
    if module is not None:
        if hasattr(module, model_name):
            return getattr(module, model_name)
        raise _unknown_model(model_name, module)
    try:
        return get_recbole_model(model_name)
    except AttributeError:  # right file, wrong capitalisation
        import sys

        recbole_module = next(
            (m for n, m in sys.modules.items()
             if n.startswith("recbole.model.") and n.endswith("." + model_name.lower())),
            None,
        )
        raise _unknown_model(model_name, recbole_module) from None
    except (ValueError, ModuleNotFoundError) as err:
        # RecBole's search ends in exlib_recommender, which needs lightgbm and xgboost installed.
        if isinstance(err, ModuleNotFoundError) and model_name.lower() in {"lightgbm", "xgboost"}:
            raise
        raise _unknown_model(model_name) from None


def get_trainer(model_type, model_name):
    """Return the trainer class for a model, with the plugin's multi-market and checkpoint fixes.

    Looks for ``recbole_cmr.trainer.<Model>Trainer`` first, then RecBole's choice
    (``<Model>Trainer`` / by model type / ``Trainer``), which is wrapped by
    :func:`recbole_cmr.trainer.plugin_trainer`.
    """
    from recbole_cmr import trainer as plugin_trainers

    own = getattr(plugin_trainers, model_name + "Trainer", None)
    if own is not None:
        return own
    try:
        multi_task = bool(getattr(get_model(model_name), "multi_task", False))
    except ValueError:
        multi_task = False
    return plugin_trainers.plugin_trainer(get_recbole_trainer(model_type, model_name), multi_task)


def _matches(name, pattern):
    """True when ``name`` matches ``pattern`` as an fnmatch pattern or as a full regex."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # e.g. "*LayerNorm*" is a glob, not a regex
        return False


def matching(names, patterns):
    """The ``names`` that match any of ``patterns`` (fnmatch globs or regexes), in order."""
    return [n for n in names if any(_matches(n, p) for p in patterns)]


def as_patterns(value):
    """A pattern setting's value as a list: ``None`` -> ``[]``, one string -> ``[string]``."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _suggestion(names, pattern, select=matching):
    """A pattern in the parameters' own capitalisation that ``select`` matches, or None.

    ``"*norm*"`` against ``trm_encoder.layer.0.output.LayerNorm.weight`` gives ``"*LayerNorm*"``:
    each literal piece of the pattern becomes the dotted name part holding it.
    """
    near = [n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower())]
    if not near:
        return None
    suggestion = pattern
    for piece in (p for p in re.split(r"[*?\[\]]+", pattern) if p):
        parts = [p for p in re.split(r"[.]", near[0]) if piece.lower() in p.lower()]
        if parts:
            suggestion = suggestion.replace(piece, parts[0], 1)
        else:
            start = near[0].lower().index(piece.lower())
            suggestion = suggestion.replace(piece, near[0][start:start + len(piece)], 1)
    return suggestion if select(names, [suggestion]) else None


def name_families(names):
    """Globs that together match ``names``, one per module kind: the last dotted part and every
    number become ``*`` (``experts.task_1.0.bn_0.weight`` -> ``experts.task_*.*.bn_*.*``).

    Returns:
        list[str]: the distinct globs, in ``names`` order.
    """
    families = []
    for name in names:
        family = re.sub(r"\d+", "*", name.rsplit(".", 1)[0]) + ".*" if "." in name else name
        if family not in families:
            families.append(family)
    return families


def check_patterns(names, patterns, key, select=matching, strict=True):
    """Check that each pattern of the setting ``key`` selects at least one of ``names``.

    The one check of every pattern-valued setting (``fed_*_params``, ``finetune_params``,
    PF-MSMTrec's ``template_scenario_params``, ``fed_bn_params``, ``pf_*``): a pattern that
    selects nothing is an error naming the setting, the pattern and what would match (a
    same-spelling suggestion, else globs of the parameters' names).

    Args:
        names (Sequence[str]): the parameter names the setting applies to.
        patterns (Sequence[str]): the setting's patterns.
        key (str): the setting (for the message).
        select (callable): ``select(names, [pattern]) -> list[str]``; default :func:`matching`
            (fnmatch globs or full regexes).
        strict (bool): raise; False (a yaml default that another setting makes match nothing,
            e.g. FeCoSR's ``*adapter*`` with ``adaptation: False``) logs a warning instead.

    Returns:
        list[str]: ``patterns``.

    Raises:
        ValueError: ``strict`` and a pattern selects none of ``names``.
    """
    names = list(names)
    for pattern in patterns:
        if select(names, [pattern]):
            continue
        suggestion, families = _suggestion(names, pattern, select), name_families(names)
        hint = (f'did you mean "{suggestion}"? (matching is case-sensitive)' if suggestion else
                f"the parameters are {families[:12]}{' ...' if len(families) > 12 else ''}")
        message = f'{key}: pattern "{pattern}" matches no parameter of the model; {hint}'
        if strict:
            raise ValueError(message)
        getLogger().warning(message)
    return list(patterns)


def pattern_setting(config, key, names, select=matching):
    """The patterns of setting ``key`` (:func:`as_patterns`), checked by :func:`check_patterns`
    against ``names``: strictly when the user set ``key``, with a warning for a yaml default."""
    return check_patterns(names, as_patterns(config[key]), key, select, strict=user_set(config, key))


def user_set(config, key):
    """True when ``key`` was set by the user (config file, dict or command line), not a yaml default."""
    return key in getattr(config, "external_config_dict", {})
