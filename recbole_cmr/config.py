"""``Config``: RecBole's configurator with the plugin's yaml files and model look-up."""

import glob
import os
import sys
from functools import lru_cache

from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_cmr import compat  # noqa: F401  (numpy aliases before RecBole's own shim runs)
from recbole_cmr.settings import (check_settings, recbole_model_settings, recbole_properties,
                                  yaml_keys)
from recbole_cmr.utils import canonical_model_name, get_model, resource_path


class Config(RecBoleConfig):
    """RecBole's ``Config`` that also reads recbole_cmr's ``properties/``.

    Internal load order (later wins): RecBole's overall, model, sample and dataset yaml and its
    quick-start file for the model type, then the plugin's ``properties/overall.yaml``,
    ``properties/model/<Model>.yaml`` and ``properties/dataset/<dataset>.yaml``. External
    settings keep RecBole's precedence: config files < ``config_dict`` < command line.
    A dataset that is not under ``data_path`` but ships with the package (``dataset/``) is found
    there.

    ``argv`` (a list of ``--key=value`` strings) replaces ``sys.argv`` as the command line.
    Before RecBole sets its defaults and the device, a setting that nothing defines (``--epocs``:
    "did you mean `epochs`?"; ``extra_settings`` lists a user's own), that only other plugin
    models read (``--model=SASRec --market_softmax=True``), or that has a wrong type or range
    (``--fed_rounds=0``) is an error (:mod:`recbole_cmr.settings`); so is one that the run's
    ``train_mode`` does not read (``--train_mode=local --fed_rounds=10``).
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None,
                 argv=None):
        self._argv = None if argv is None else [str(a) for a in argv]
        super().__init__(model, dataset, config_file_list, config_dict)
        check_mode_settings(self)

    def _load_cmd_line(self):
        if self._argv is None:
            return super()._load_cmd_line()
        saved, sys.argv = sys.argv, ["recbole_cmr", *self._argv]
        try:
            return super()._load_cmd_line()
        finally:
            sys.argv = saved

    def _external(self, key, value):
        """``value`` if given, else the setting from files/dict/command line (RecBole's error)."""
        if value is not None:
            return value
        if key not in self.external_config_dict:
            raise KeyError(
                f"{key} need to be specified in at least one of the these ways: "
                "[model variable, config file, config dict, command line] "
            )
        return self.external_config_dict[key]

    def _get_model_and_dataset(self, model, dataset):
        model = self._external("model", model)
        if isinstance(model, str):
            model = canonical_model_name(model)
            if "model" in self.external_config_dict:
                self.external_config_dict["model"] = model
            model_class = get_model(model)
        else:
            model_class, model = model, model.__name__
        return model, model_class, self._external("dataset", dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        # A RecBole model's own setting keeps its value: the plugin's overall.yaml (e.g. the
        # federated strategies' ``tau``) must not override MacridVAE's ``tau``.
        own = {k: self.internal_config_dict[k] for k in recbole_model_settings(model)}
        properties = resource_path("properties")
        for file in [
            os.path.join(properties, "overall.yaml"),
            os.path.join(properties, "model", model + ".yaml"),
            os.path.join(properties, "dataset", dataset + ".yaml"),
        ]:
            if os.path.isfile(file):
                config_dict = self._update_internal_config_dict(file)
                if file.endswith(os.path.join("dataset", dataset + ".yaml")) and config_dict:
                    self.parameters["Dataset"] += [
                        k for k in config_dict if k not in self.parameters["Dataset"]
                    ]
            if file.endswith("overall.yaml"):
                self.internal_config_dict.update(own)
        if self._is_sequential_ce(model_class):
            # RecBole refuses negative sampling with CE; make `--model=SASRec` work as is.
            self.internal_config_dict["train_neg_sample_args"] = None

    def _is_sequential_ce(self, model_class):
        loss_type = self.internal_config_dict.get("loss_type")
        loss_type = self.external_config_dict.get("loss_type", loss_type)
        return model_class.type == ModelType.SEQUENTIAL and loss_type == "CE"

    def _set_default_parameters(self):
        check_model_settings(self.model, self.external_config_dict)
        check_settings(self)
        super()._set_default_parameters()
        data_path = self.final_config_dict["data_path"]
        packaged = resource_path("dataset", self.dataset)
        if (
            "data_path" not in self.external_config_dict
            and not os.path.isdir(data_path)
            and os.path.isdir(packaged)
        ):
            self.final_config_dict["data_path"] = packaged


@lru_cache(maxsize=None)
def plugin_model_settings():
    """``{key: (models...)}`` for the settings that only recbole_cmr's model yaml files define
    (not RecBole's yaml files, not the plugin's overall.yaml)."""
    shared = set()
    for path in glob.glob(recbole_properties("**", "*.yaml"), recursive=True):
        shared |= yaml_keys(path)
    properties = resource_path("properties")
    shared |= yaml_keys(os.path.join(properties, "overall.yaml"))
    owners = {}
    for path in sorted(glob.glob(os.path.join(properties, "model", "*.yaml"))):
        model = os.path.splitext(os.path.basename(path))[0]
        for key in yaml_keys(path) - shared:
            owners.setdefault(key, []).append(model)
    return {key: tuple(models) for key, models in owners.items()}


def check_model_settings(model, settings):
    """Raise ValueError for a setting in ``settings`` that ``model`` does not read because only
    other recbole_cmr models define it (it would be silently ignored)."""
    owners = plugin_model_settings()
    for key in settings:
        models = owners.get(key)
        if models and model not in models:
            raise ValueError(
                f"{key} is a setting of {', '.join(models)}; model {model} does not read it. "
                f"Drop it, or run a model that has it (e.g. --model={models[0]})."
            )


# Server-side settings of the federated strategies (Flower's names); every ``fed_*`` key too.
FEDERATED_SETTINGS = ("server_learning_rate", "server_momentum", "eta", "beta_1", "beta_2", "tau",
                      "eta_l", "proximal_mu", "scenario_experts")
# Settings of a fine-tuning stage (train_mode transfer; pooled or federated with finetune: True).
FINETUNE_SETTINGS = ("finetune_params", "finetune_lr_scale", "finetune_keep_pretrained",
                     "pretrain_learning_rate_decay")


def reading_modes(key, finetune):
    """The train modes that read ``key`` (with ``finetune`` as set), or None for a setting every
    mode reads."""
    if key.startswith("fed_") or key in FEDERATED_SETTINGS:
        return ("federated",)
    if key in FINETUNE_SETTINGS:
        return ("transfer",) + (("pooled", "federated") if finetune else ())
    return {"pretrained": ("pooled", "transfer"), "pooled_markets": ("pooled",),
            "finetune_markets": ("pooled",) if finetune else (),
            "source_market": ("pooled", "transfer"),
            "finetune": ("pooled", "federated")}.get(key)


def unread_mode_settings(config, keys):
    """``{key: modes that read it}`` for each of ``keys`` that ``config``'s ``train_mode`` does
    not read; a key holding None or its default value reads as unset."""
    mode, finetune = config["train_mode"], bool(config["finetune"])
    own = recbole_model_settings(config["model"])  # e.g. MacridVAE's tau: the model reads it
    unread = {}
    for key in [k for k in keys if k not in own]:
        modes = reading_modes(key, finetune)
        if key == "finetune":  # local never fine-tunes, transfer always does
            if mode in modes or bool(config[key]) == (mode == "transfer"):
                continue
        elif modes is None or mode in modes or config[key] is None or \
                config[key] == config.internal_config_dict.get(key):
            continue
        unread[key] = modes
    return unread


def check_mode_settings(config):
    """Raise ValueError for a setting the user set that the run's ``train_mode`` does not read
    (it would be silently ignored), naming the modes that read it."""
    unread = unread_mode_settings(config, config.external_config_dict)
    if unread:
        key, modes = next(iter(unread.items()))
        raise ValueError(f"{key} is not read by train_mode {config['train_mode']}: {_reader_hint(key, modes)}. "
                         "Drop it, or change train_mode.")


def _reader_hint(key, modes):
    if key == "finetune":
        return "transfer always fine-tunes and local never does; set it with pooled or federated"
    if key == "finetune_markets":
        return "only train_mode pooled with finetune: True reads it"
    if key in FINETUNE_SETTINGS:
        return "it is a fine-tuning setting: train_mode transfer, or pooled / federated with finetune: True"
    return f"only train_mode {' / '.join(modes)} reads it"


def mode_settings(model, dataset, settings):
    """``settings`` less the keys the run's train mode does not read: for harnesses whose shared
    settings serve models of every train mode (e.g. a round budget)."""
    mode, finetune = _train_mode(model, dataset, settings.get("train_mode"))
    finetune = bool(settings.get("finetune", finetune))
    return {k: v for k, v in settings.items()
            if (modes := reading_modes(k, finetune)) is None or mode in modes}


@lru_cache(maxsize=None)
def _train_mode(model, dataset, train_mode=None):
    """``(train_mode, finetune)`` of ``model`` on ``dataset`` by its yaml (``train_mode`` given)."""
    config = Config(model=model, dataset=dataset, argv=[],
                    config_dict={"train_mode": train_mode} if train_mode else {})
    return config["train_mode"], bool(config["finetune"])
