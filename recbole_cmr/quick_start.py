"""Quick start: ``run_recbole_cmr``, ``objective_function`` and ``load_data_and_model``.

``train_mode`` chooses how markets are trained:

* ``local``: one model per market, trained on that market only;
* ``pooled``: one model trained on the training data of all markets.

Either way each market is validated and tested by RecBole's Evaluator on its own loaders, and the
result holds every market and the macro average.
"""

import logging
import os
import sys
from logging import getLogger

from recbole.utils import calculate_valid_score, init_logger, init_seed, set_color

from recbole_cmr.compat import load_checkpoint
from recbole_cmr.config import Config
from recbole_cmr.data import create_dataset, data_preparation, pooled_train_data
from recbole_cmr.results import format_table, log_file_path, results_frame, save_results
from recbole_cmr.trainer import macro_average
from recbole_cmr.utils import get_model, get_trainer

TRAIN_MODES = ("local", "pooled")


def _check_train_mode(config):
    if config["train_mode"] not in TRAIN_MODES:
        raise ValueError(f"train_mode [{config['train_mode']}] must be one of {list(TRAIN_MODES)}.")


def _checkpoint_file(config, tag):
    from recbole.utils import get_local_time

    name = f"{config['model']}-{config['dataset']}-{tag}-{get_local_time()}.pth"
    return os.path.join(config["checkpoint_dir"], name)


def _new_trainer(config, dataset, tag, markets):
    """Seed, build the model on ``dataset`` and its trainer, as RecBole's run_recbole does."""
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.saved_model_file = _checkpoint_file(config, tag)
    trainer.checkpoint_info = {
        "dataset": config["dataset"],
        "data_path": os.path.dirname(os.path.abspath(config["data_path"])),
        "train_mode": config["train_mode"],
        "markets": list(markets),
    }
    return model, trainer


def _train_local(config, train, valid, test, saved, verbose):
    """One model per market. Returns ``{market: {valid, test, checkpoint}}``."""
    per_market = {}
    for market in train:
        getLogger().info(set_color(f"======== market {market} ========", "yellow"))
        model, trainer = _new_trainer(config, train[market]._dataset, market, [market])
        if market == next(iter(train)) and verbose:
            getLogger().info(model)
        best_valid = trainer.fit(
            train[market], valid[market], verbose=verbose, saved=saved,
            show_progress=config["show_progress"],
        )[1]
        per_market[market] = {
            "valid": best_valid,
            "test": trainer.evaluate(test[market], load_best_model=saved,
                                     show_progress=config["show_progress"]),
            "checkpoint": trainer.saved_model_file if saved else None,
        }
    return per_market


def _train_pooled(config, train, valid, test, saved, verbose):
    """One model on all markets' training data, validated on the macro average."""
    pooled = pooled_train_data(config, train)
    model, trainer = _new_trainer(config, pooled._dataset, "pooled", list(train))
    if verbose:
        getLogger().info(model)
    trainer.fit(pooled, valid, verbose=verbose, saved=saved, show_progress=config["show_progress"])
    tests = trainer.evaluate(test, load_best_model=saved, show_progress=config["show_progress"])
    best_valid = trainer.best_valid_per_market or {m: None for m in test}
    checkpoint = trainer.saved_model_file if saved else None
    return {m: {"valid": best_valid[m], "test": tests[m], "checkpoint": checkpoint} for m in test}


def _summarise(config, per_market):
    """The dict RecBole's HyperTuning reads (macro over markets), plus the per-market results."""
    valids = {m: r["valid"] for m, r in per_market.items()}
    macro_valid = None if None in valids.values() else macro_average(valids)
    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "train_mode": config["train_mode"],
        "best_valid_score": (
            calculate_valid_score(macro_valid, config["valid_metric"].lower()) if macro_valid else None
        ),
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": macro_valid,
        "test_result": macro_average({m: r["test"] for m, r in per_market.items()}),
        "per_market": per_market,
    }


def _run(config, saved=True, verbose=True):
    _check_train_mode(config)
    dataset = create_dataset(config)
    getLogger().info(dataset)
    train, valid, test = data_preparation(config, dataset)
    trainer_fn = _train_local if config["train_mode"] == "local" else _train_pooled
    return _summarise(config, trainer_fn(config, train, valid, test, saved, verbose))


def _report(config, result):
    """Print the results table and save it (JSON, CSV) beside the log file."""
    valid_metric = config["valid_metric"].lower()
    macro = {"valid": result["best_valid_result"], "test": result["test_result"]}
    frame = results_frame(result["per_market"], macro, valid_metric)
    table = format_table(frame, config["metric_decimal_place"] or 4)
    logger = getLogger()
    logger.info(
        set_color(f"{config['model']} ({config['train_mode']}) on {config['dataset']}: test results "
                  f"per market, model selected by valid {valid_metric}", "yellow") + "\n" + table
    )
    log_path = log_file_path()
    if log_path:
        paths = save_results(result, frame, log_path)
        result["results_files"] = list(paths)
        logger.info(set_color("Results saved to", "blue") + f": {paths[0]}, {paths[1]}")


def run_recbole_cmr(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True):
    """Train and evaluate ``model`` on every market of ``dataset``.

    Returns:
        dict: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result`` and
        ``test_result`` (macro averages over markets, as RecBole's ``run_recbole`` returns them),
        ``model``, ``per_market`` (``{market: {"valid", "test", "checkpoint"}}``) and
        ``results_files`` (the saved JSON and CSV table).
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list,
                    config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)
    result = _run(config, saved=saved)
    _report(config, result)
    return result


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """Objective for RecBole's ``HyperTuning``: one quiet run, returning the dict it reads."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    init_seed(config["seed"], config["reproducibility"])
    logging.basicConfig(level=logging.ERROR)
    config["show_progress"] = False
    return _run(config, saved=saved, verbose=False)


def load_data_and_model(model_file, config_dict=None):
    """Rebuild config, data and model from a recbole_cmr checkpoint.

    Args:
        model_file (str): a checkpoint written by ``run_recbole_cmr``.
        config_dict (dict, optional): settings that override the checkpoint's, e.g. another
            evaluation protocol ``{"eval_args": {..., "mode": {"valid": "full", "test": "uni99"}}}``.

    Returns:
        tuple: ``(config, model, dataset, train_data, valid_data, test_data)``; the loaders are
        ``{market: loader}`` dicts for the markets the model was trained on.
    """
    checkpoint = load_checkpoint(model_file)
    config_dict = {**checkpoint["config"], "data_path": checkpoint["data_path"], **(config_dict or {})}
    config = Config(model=checkpoint["model"], dataset=checkpoint["dataset"], config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    train, valid, test = ({m: d[m] for m in checkpoint["markets"]} for d in loaders)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, next(iter(train.values()))._dataset)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model.to(config["device"]), dataset, train, valid, test
