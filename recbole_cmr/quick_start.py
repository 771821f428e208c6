"""Quick start: ``run_recbole_cmr``, ``objective_function`` and ``load_data_and_model``.

``train_mode`` chooses how markets are trained:

* ``local``: one model per market, trained on that market only;
* ``pooled``: one model trained on the training data of all markets;
* ``federated``: one model per market, trained in rounds whose shared parameters are aggregated
  by a server that never sees interactions (``recbole_cmr.federated``), then, with
  ``finetune: True``, fine-tuned locally in each market;
* ``transfer``: one-to-one transfer, pretrained on ``source_market`` and fine-tuned on each other
  market.

The modes themselves live in :mod:`recbole_cmr.modes`. Either way each market is validated and
tested by RecBole's Evaluator on its own loaders, and the result holds every market and the macro
average.
"""

import logging
import os
import sys
from logging import getLogger

from recbole.utils import calculate_valid_score, init_seed, set_color

from recbole_cmr.compat import load_checkpoint
from recbole_cmr.config import Config
from recbole_cmr.data import create_dataset, data_preparation, pooled_train_data
from recbole_cmr.modes import check_train_mode, train_markets, use_market
from recbole_cmr.results import (FILE_ONLY, discard_run_files, init_run_logger, results_text,
                                 save_results)
from recbole_cmr.trainer import macro_average
from recbole_cmr.utils import get_model

# Bad settings, files and checkpoints: the plugin raises these with a message saying what to fix.
# A run that fails with one leaves no files; the command line prints it as one line. Any other
# exception is a bug.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


def summarise(config, per_market, default_valid=None):
    """The dict RecBole's HyperTuning reads (macro over markets), plus the per-market results.
    The valid and test macros are over ``valid_markets``, else ``default_valid`` (the markets a
    transfer or a pooled run fine-tunes: tuning it tunes its adaptation), else every market."""
    chosen = config["valid_markets"] or default_valid  # e.g. the target entity: what HyperTuning optimises
    chosen = [chosen] if isinstance(chosen, str) else chosen
    chosen = [m for m in per_market if not chosen or m in chosen]
    valids = {m: per_market[m]["valid"] for m in chosen}
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
        "test_result": macro_average({m: per_market[m]["test"] for m in chosen}),
        "per_market": per_market,
    }


def _prepare(config):
    """Check the mode, load the dataset and split it: where bad input fails.
    Returns ``(dataset, (train, valid, test))``."""
    check_train_mode(config)
    dataset = create_dataset(config)
    return dataset, data_preparation(config, dataset)


def _train(config, data, saved=True, verbose=True):
    per_market, info = train_markets(config, *data, saved, verbose)
    default_valid = info.pop("default_valid", None)
    return {**summarise(config, per_market, default_valid), **info}


def _run(config, saved=True, verbose=True):
    dataset, data = _prepare(config)
    getLogger().info(dataset)
    return _train(config, data, saved, verbose)


def report(config, result, log_path):
    """Print the results table on stdout, log it to the run's log file, and save it (JSON, CSV)
    beside that file."""
    frame, text = results_text(result, config["valid_metric"].lower(), config["metric_decimal_place"] or 4)
    title, table = text.split("\n", 1)
    logger = getLogger()
    logger.info(set_color(title, "yellow") + "\n" + table, extra={FILE_ONLY: True})
    print(text, flush=True)  # on stdout whatever the log level; logs are on stderr
    rounds = result.get("federated_rounds")
    if rounds and rounds["best_round"] is not None:
        ended = " (the round budget fed_rounds ended them, not early stopping)" if rounds.get("budget_ended") else ""
        logger.info(set_color("Federated stage", "blue") + f": best round {rounds['best_round']} "
                    f"of {rounds['rounds']} (0-based){ended}, rounds took {rounds['rounds_wall_s'] / 60:.1f} min")
    paths = save_results(result, frame, log_path)
    result["results_files"] = list(paths)
    logger.info(set_color("Results saved to", "blue") + f": {paths[0]}, {paths[1]}")


def run_recbole_cmr(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
                    argv=None):
    """Train and evaluate ``model`` on every market of ``dataset``.

    Settings come as in RecBole (config files < ``config_dict`` < command line); ``argv``, a list
    of ``--key=value`` strings, stands for the command line instead of ``sys.argv``.

    Returns:
        dict: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result`` and
        ``test_result`` (macro averages over markets, as RecBole's ``run_recbole`` returns them),
        ``model``, ``per_market`` (``{market: {"valid", "test", "per_user", "checkpoint"}}``;
        ``per_user``: each test user's token (``user``) and values of the ranking metrics at every
        ``topk`` (``ndcg@10``, ...), or each labeled row's ``label`` and ``score`` for value
        metrics, ``[n_rows]`` lists of float32 values, for paired comparisons of runs),
        ``results_files`` (the saved JSON and CSV table) and, for federated training,
        ``federated_rounds`` (``best_round``, ``rounds``, ``rounds_wall_s`` and the per-round
        ``history`` of macro valid score, train loss and seconds).
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list,
                    config_dict=config_dict, argv=argv)
    init_seed(config["seed"], config["reproducibility"])
    log_path = init_run_logger(config)
    try:
        loaded, data = _prepare(config)  # bad input fails here, before the config dump
        logger = getLogger()
        logger.info(sys.argv)
        logger.info(config)
        logger.info(loaded)
        result = _train(config, data, saved=saved)
    except USER_ERRORS:
        discard_run_files(log_path)  # a run failing on bad input leaves no files
        raise
    report(config, result, log_path)
    return result


def objective_function(config_dict=None, config_file_list=None, saved=True, argv=None, trial=None):
    """Objective for RecBole's ``HyperTuning``: one quiet run, returning the dict it reads.

    ``argv`` (``--key=value`` strings) stands for the command line instead of ``sys.argv``.
    ``trial``: a name for this run among a search's trials; with ``resume_dir`` set (however it
    was given) the run keeps its state in ``<resume_dir>/<trial>``, so every trial of a search
    continues from its own state when the search is started again."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list, argv=argv)
    init_seed(config["seed"], config["reproducibility"])
    logging.basicConfig(level=logging.ERROR)
    config["show_progress"] = False
    if trial is not None and config["resume_dir"]:
        config["resume_dir"] = os.path.join(config["resume_dir"], trial)
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
    config = Config(model=checkpoint["model"], dataset=checkpoint["dataset"], config_dict=config_dict,
                    argv=[])  # the checkpoint's settings: never the calling script's command line
    init_seed(config["seed"], config["reproducibility"])
    init_run_logger(config)
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    train, valid, test = ({m: d[m] for m in checkpoint["markets"]} for d in loaders)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, next(iter(train.values()))._dataset)
    if len(train) > 1:  # a pooled first stage: all its markets
        use_market(model, pooled_train_data(config, train)._dataset)
    if "stage" in checkpoint and hasattr(model, "set_stage"):
        model.set_stage(checkpoint["stage"])  # e.g. FeCoSR after fine-tuning: adapter applied
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model.to(config["device"]), dataset, train, valid, test
