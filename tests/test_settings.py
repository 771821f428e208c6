"""Settings are checked for spelling, type and range when the Config is made (issue 38, 4-6)."""

import glob
import os

import pytest

from recbole_cmr import Config
from recbole_cmr.utils import resource_path

PLUGIN_MODELS = sorted(os.path.splitext(os.path.basename(p))[0] for p in
                       glob.glob(os.path.join(resource_path("properties", "model"), "*.yaml")))


def _config(argv, model="SASRec", dataset="xmrec-mini", **settings):
    return Config(model=model, dataset=dataset, config_dict=settings, argv=argv)


def _one_line_error(argv, match, **kwargs):
    with pytest.raises(ValueError, match=match) as raised:
        _config(argv, **kwargs)
    assert "\n" not in str(raised.value)
    return str(raised.value)


@pytest.mark.parametrize("argv, near", [
    (["--epocs=3"], "epochs"),
    (["--learnig_rate=0.01"], "learning_rate"),
    (["--fed_round=3", "--train_mode=federated"], "fed_rounds"),
])
def test_a_misspelled_setting_is_an_error_with_the_nearest_name(argv, near):
    key = argv[0][2:].split("=")[0]
    message = _one_line_error(argv, rf"^{key} is not a setting of RecBole, its models, the datasets")
    assert f"did you mean `{near}`?" in message and f"extra_settings: [{key}]" in message


def test_a_misspelled_model_setting_gets_the_models_name():
    assert _config(["--n_layers=3"])["n_layers"] == 3  # SASRec's
    _one_line_error(["--n_layer=3"], r"^n_layer is not a setting.*did you mean `n_layers`\?")


def test_recbole_launcher_settings_are_an_error():
    _one_line_error(["--nproc=2"], r"^nproc is a setting of RecBole's multi-process launcher")


def test_extra_settings_lets_a_users_own_keys_through():
    config = _config(["--my_key=1", "--my_other=abc"], extra_settings=["my_key", "my_other"])
    assert config["my_key"] == 1 and config["my_other"] == "abc"
    _one_line_error(["--my_key=1", "--my_other=abc"], r"^my_other is not a setting",
                    extra_settings=["my_key"])
    _one_line_error([], r"^extra_settings='my_key' is not a list of setting names",
                    extra_settings="my_key")


@pytest.mark.parametrize("argv, message", [
    (["--fed_rounds=0"], "fed_rounds=0 is out of range: expected an int >= 1."),
    (["--fed_rounds=-3"], "fed_rounds=-3 is out of range: expected an int >= 1."),
    (["--fed_rounds=abc"], "fed_rounds='abc' is not an int: expected an int >= 1."),
    (["--fed_rounds=2.5"], "fed_rounds=2.5 is not an int: expected an int >= 1."),
    (["--learning_rate=0"], "learning_rate=0 is out of range: expected a float > 0."),
    (["--learning_rate=abc"], "learning_rate='abc' is not a float: expected a float > 0."),
    (["--epochs=-1"], "epochs=-1 is out of range: expected an int >= 0."),
    (["--epochs=True"], "epochs=True is not an int: expected an int >= 0."),
    (["--train_batch_size=0"], "train_batch_size=0 is out of range: expected an int >= 1."),
    (["--eval_batch_size=abc"], "eval_batch_size='abc' is not an int: expected an int >= 1."),
    (["--topk=[10,0]"], "topk=[10, 0] is out of range: expected an int or list of int >= 1."),
    (["--topk=ten"], "topk='ten' is not an int or list of int: expected an int or list of int >= 1."),
    (["--stopping_step=-1"], "stopping_step=-1 is out of range: expected an int >= 0."),
    (["--eval_step=x"], "eval_step='x' is not an int: expected an int >= 0."),
    (["--hidden_dropout_prob=1.0"], "hidden_dropout_prob=1.0 is out of range: expected a float in [0, 1)."),
    (["--eta_l=-0.1"], "eta_l=-0.1 is out of range: expected a float > 0."),
    (["--fed_client_fraction=abc"], "fed_client_fraction='abc' is not a float: expected a float."),
    (["--market_softmax=1"], "market_softmax=1 is not a bool: expected a bool."),
    (["--fed_local_params=abc"], "fed_local_params='abc' is not a list: expected a list."),
])
def test_a_wrong_type_or_range_is_one_line_naming_setting_value_and_expectation(argv, message):
    raised = _one_line_error(argv, None, model="FedAvgSASRec")
    assert raised == message


def test_valid_values_of_the_checked_settings_are_accepted():
    config = _config(["--fed_rounds=1", "--learning_rate=1", "--epochs=0", "--topk=5",
                      "--fed_client_fraction=1"], model="FedAvgSASRec", eta_l=None)
    assert (config["fed_rounds"], config["learning_rate"], config["epochs"]) == (1, 1, 0)
    assert config["topk"] == [5] and config["eta_l"] is None


def test_a_recbole_models_own_setting_is_checked_too():
    """MacridVAE's ``tau`` (its temperature) and SASRec's sizes: RecBole's defaults fit."""
    assert _config([], model="MacridVAE", tau=1)["tau"] == 1
    _one_line_error([], r"^tau=0 is out of range: expected a float > 0\.$", model="MacridVAE", tau=0)
    _one_line_error(["--n_heads=0"], r"^n_heads=0 is out of range: expected an int >= 1\.$")


def test_every_recbole_model_default_fits_the_schema():
    import yaml
    from recbole.config import Config as RecBoleConfig

    from recbole_cmr.settings import SCHEMA, check_value, recbole_properties

    loader = RecBoleConfig._build_yaml_loader(None)  # reads 1e-12 as a float, as Config does
    for path in glob.glob(recbole_properties("model", "*.yaml")):
        with open(path, encoding="utf-8") as f:
            defaults = yaml.load(f, Loader=loader) or {}
        for key in set(defaults) & set(SCHEMA):
            check_value(key, defaults[key], *SCHEMA[key])


@pytest.mark.parametrize("model", [*PLUGIN_MODELS, "SASRec", "BPR", "DeepFM"])
def test_every_models_defaults_pass_the_checks(model):
    from recbole_cmr.settings import value_specs

    config = _config([], model=model)
    checked = [k for k in value_specs(config) if k in config.final_config_dict]
    assert "learning_rate" in checked and "epochs" in checked
