"""Quick start: ``run_recbole_cmr``, ``objective_function`` and ``load_data_and_model``.

``train_mode`` chooses how markets are trained:

* ``local``: one model per market, trained on that market only;
* ``pooled``: one model trained on the training data of all markets;
* ``federated``: one model per market, trained in rounds whose shared parameters are aggregated
  by a server that never sees interactions (``recbole_cmr.federated``), then, with
  ``finetune: True``, fine-tuned locally in each market;
* ``transfer``: one-to-one transfer, pretrained on ``source_market`` and fine-tuned on each other
  market.

Either way each market is validated and tested by RecBole's Evaluator on its own loaders, and the
result holds every market and the macro average.
"""

import copy
import logging
import sys
from logging import getLogger

from recbole.utils import calculate_valid_score, init_seed, set_color

from recbole_cmr.compat import load_checkpoint
from recbole_cmr.config import Config
from recbole_cmr.data import create_dataset, data_preparation, pooled_train_data
from recbole_cmr.federated import train_federated
from recbole_cmr.federated.client import client_seed
from recbole_cmr.results import format_table, init_run_logger, results_frame, save_results
from recbole_cmr.trainer import (check_lr_decay, finetune_trainer, keep_pretrained, macro_average,
                                 new_market_trainer)
from recbole_cmr.utils import get_model, get_trainer

TRAIN_MODES = ("local", "pooled", "federated", "transfer")


def _check_train_mode(config):
    if config["train_mode"] not in TRAIN_MODES:
        raise ValueError(f"train_mode [{config['train_mode']}] must be one of {list(TRAIN_MODES)}.")


def _fit_and_test(config, trainer, market, train, valid, test, saved, verbose):
    """RecBole's fit on one market, then its test: ``{valid, test, checkpoint}``."""
    best_valid = trainer.fit(train[market], valid[market], verbose=verbose, saved=saved,
                             show_progress=config["show_progress"])[1]
    return {
        "valid": best_valid,
        "test": trainer.evaluate(test[market], load_best_model=saved,
                                 show_progress=config["show_progress"]),
        "checkpoint": trainer.saved_model_file if saved else None,
    }


def _log_market(market, stage=""):
    getLogger().info(set_color(f"======== market {market} {stage}========", "yellow"))


def _train_local(config, train, valid, test, saved, verbose, info=None):
    """One model per market. Returns ``{market: {valid, test, checkpoint}}``."""
    per_market = {}
    for market in train:
        _log_market(market)
        model, trainer = new_market_trainer(config, train[market]._dataset, market, [market])
        if market == next(iter(train)) and verbose:
            getLogger().info(model)
        per_market[market] = _fit_and_test(config, trainer, market, train, valid, test, saved, verbose)
    return per_market


def _finetune_local(config, models, train, valid, test, saved, verbose, seeded=False):
    """Fine-tune each market's pretrained model on that market (see ``finetune_trainer``);
    ``seeded``: each market from its own seed (``client_seed``), as a federated client would on
    its own machine."""
    per_market = {}
    for market, model in models.items():
        _log_market(market, "fine-tuning ")
        if seeded:
            init_seed(client_seed(config["seed"], market, "finetune"), config["reproducibility"])
        trainer = finetune_trainer(config, model, f"{market}-finetuned", [market])
        keep = config["finetune_keep_pretrained"]
        before = keep_pretrained(trainer, valid[market], saved, config["show_progress"]) if keep else None
        per_market[market] = _fit_and_test(config, trainer, market, train, valid, test, saved, verbose)
        if keep:
            per_market[market]["kept_pretrained"] = bool(trainer.best_valid_score == before)
    return per_market


def _train_federated(config, train, valid, test, saved, verbose, info=None):
    """Federated pretraining over all markets, then (``finetune: True``) local fine-tuning.

    With fine-tuning, each market also records its federated (pre-fine-tuning) results under
    ``federated``. ``info["federated_rounds"]`` gets the rounds' summary (best round, wall time,
    macro valid score per round).
    """
    models, rounds = {}, {}
    federated = train_federated(config, train, valid, test, saved, verbose,
                                resume_file=config["fed_resume"], models_out=models,
                                pretrained_file=config["fed_pretrained"], rounds_out=rounds)
    if info is not None:
        info["federated_rounds"] = rounds
    if not config["finetune"]:
        return federated
    per_market = _finetune_local(config, models, train, valid, test, saved, verbose, seeded=True)
    for market, result in per_market.items():
        result["federated"] = federated[market]
    return per_market


def source_markets(config, train):
    """The markets of ``source_market`` (one name or a list; checked), else the market with the
    most training interactions."""
    named = config["source_market"]
    if named is None:
        return [max(train, key=lambda m: train[m]._dataset.inter_num)]
    named = [named] if isinstance(named, str) else list(named)
    unknown = [m for m in named if m not in train]
    if unknown or not named:
        raise ValueError(f"source_market {unknown or named} is not one of the markets {list(train)}.")
    return named


def _first_stage(config, train, valid, test, markets, valid_markets, tag, saved, verbose):
    """One model trained on the training rows of ``markets`` (pooled when several) and selected by
    the macro valid score over ``valid_markets``, or loaded from ``pretrained``.

    Returns:
        tuple: ``(model, {market: {valid, test, checkpoint}})`` for every market of ``test``.
    """
    single = len(markets) == 1 and list(valid_markets) == list(markets)
    data = train[markets[0]] if len(markets) == 1 else pooled_train_data(config, {m: train[m] for m in markets})
    model, trainer = new_market_trainer(config, data._dataset, tag, list(test))
    pretraining = config["train_mode"] == "transfer" or config["finetune"]
    if pretraining and config["pretrain_learning_rate_decay"] is not None:
        trainer.lr_decay = check_lr_decay(config, "pretrain_learning_rate_decay")
    if verbose:
        getLogger().info(model)
    if config["pretrained"]:
        _load_pretrained(config, model, trainer)
    else:
        checks = valid[markets[0]] if single else {m: valid[m] for m in valid_markets}
        trainer.fit(data, checks, verbose=verbose, saved=saved, show_progress=config["show_progress"])
    loaded = saved or bool(config["pretrained"])
    progress = config["show_progress"]
    tests = {m: trainer.evaluate(test[m], load_best_model=loaded and i == 0, show_progress=progress)
             for i, m in enumerate(test)}
    best = {markets[0]: trainer.best_valid_result} if single and not config["pretrained"] else \
        (getattr(trainer, "best_valid_per_market", None) or {})
    valids = {m: best.get(m) or trainer.evaluate(valid[m], load_best_model=False, show_progress=progress)
              for m in test}
    checkpoint = config["pretrained"] or (trainer.saved_model_file if saved else None)
    return model, {m: {"valid": valids[m], "test": tests[m], "checkpoint": checkpoint} for m in test}


def _train_transfer(config, train, valid, test, saved, verbose, info=None):
    """Transfer: train on the source market(s) (pooled when several, e.g. ANT's auxiliary
    domains), fine-tune a copy on each other market (the targets).

    Each source keeps its own results, plus ``after_transfer``: its test results under each
    target's fine-tuned model (the source degradation that one-to-one transfer causes).
    """
    sources = source_markets(config, train)
    _log_market(", ".join(sources), "(source) ")
    model, per_market = _first_stage(config, train, valid, {m: test[m] for m in sources}, sources,
                                     sources, "-".join(sources), saved, verbose)
    targets = {m: copy.deepcopy(model) for m in train if m not in sources}
    for market, target in targets.items():
        if hasattr(target, "use_market"):  # e.g. market_softmax: the target's own item mask
            target.use_market(train[market]._dataset)
    per_market.update(_finetune_local(config, targets, train, valid, test, saved, verbose))
    if info is not None:
        info["transfer_targets"] = list(targets)  # what the run's valid score is over by default
    for source in sources:
        per_market[source]["after_transfer"] = {}
        for market, target in targets.items():
            if hasattr(target, "use_market"):  # e.g. ANT scores only its market's items
                target.use_market(train[source]._dataset)
            per_market[source]["after_transfer"][market] = trainer_for(config, target).evaluate(
                test[source], load_best_model=False)
    return per_market


def trainer_for(config, model):
    """A plugin trainer around an existing ``model`` (for evaluation)."""
    return get_trainer(config["MODEL_TYPE"], config["model"])(config, model)


def _train_pooled(config, train, valid, test, saved, verbose, info=None):
    """One model on the training data of all markets (or of ``pooled_markets``), validated on the
    macro average over ``valid_markets``; with ``finetune: True`` a copy of it is then
    fine-tuned on each of ``finetune_markets`` (as after federated pretraining), which also
    record their pooled results under ``pooled``. ``pretrained`` loads a pooled run's
    checkpoint instead of training (e.g. MKT's stage 2 alone)."""
    selected = {key: _market_subset(config, key, list(train))
                for key in ("pooled_markets", "valid_markets", "finetune_markets")}
    model, per_market = _first_stage(config, train, valid, test, selected["pooled_markets"],
                                     selected["valid_markets"], "pooled", saved, verbose)
    if not config["finetune"]:
        return per_market
    copies = {m: copy.deepcopy(model) for m in selected["finetune_markets"]}
    tuned = _finetune_local(config, copies, train, valid, test, saved, verbose)
    for market, result in tuned.items():
        result["pooled"] = per_market[market]
    return {**per_market, **tuned}


def _market_subset(config, key, markets):
    """The markets ``config[key]`` names (checked), all ``markets`` when unset."""
    named = config[key]
    if named is None:
        return markets
    named = [named] if isinstance(named, str) else list(named)
    unknown = [m for m in named if m not in markets]
    if unknown or not named:
        raise ValueError(f"{key} {named} must name markets of dataset [{config['dataset']}] "
                         f"(its markets: {markets}).")
    return named


def _load_pretrained(config, model, trainer):
    """Load ``pretrained`` (weights only) into ``model`` as the first stage's result."""
    path = config["pretrained"]
    checkpoint = load_checkpoint(path)
    if checkpoint.get("model") != config["model"]:
        raise ValueError(f"pretrained {path} holds a {checkpoint.get('model')} model, "
                         f"not {config['model']}.")
    if "stage" in checkpoint and hasattr(model, "set_stage"):
        model.set_stage(checkpoint["stage"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    trainer.saved_model_file = path
    getLogger().info(set_color("First stage loaded from", "blue") + f": {path}")


def _summarise(config, per_market, default_valid=None):
    """The dict RecBole's HyperTuning reads (macro over markets), plus the per-market results.
    The valid and test macros are over ``valid_markets``, else ``default_valid`` (a transfer run's
    targets: tuning a transfer tunes its adaptation), else every market."""
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


def _run(config, saved=True, verbose=True):
    _check_train_mode(config)
    dataset = create_dataset(config)
    getLogger().info(dataset)
    train, valid, test = data_preparation(config, dataset)
    trainer_fn = {"local": _train_local, "pooled": _train_pooled,
                  "federated": _train_federated, "transfer": _train_transfer}
    info = {}
    per_market = trainer_fn[config["train_mode"]](config, train, valid, test, saved, verbose, info)
    return {**_summarise(config, per_market, info.get("transfer_targets")), **info}


def _report(config, result, log_path):
    """Print the results table and save it (JSON, CSV) beside the run's log file."""
    valid_metric = config["valid_metric"].lower()
    macro = {"valid": result["best_valid_result"], "test": result["test_result"]}
    frame = results_frame(result["per_market"], macro, valid_metric)
    table = format_table(frame, config["metric_decimal_place"] or 4)
    logger = getLogger()
    logger.info(
        set_color(f"{config['model']} ({config['train_mode']}) on {config['dataset']}: test results "
                  f"per market, model selected by valid {valid_metric}", "yellow") + "\n" + table
    )
    rounds = result.get("federated_rounds")
    if rounds and rounds["best_round"] is not None:
        logger.info(set_color("Federated stage", "blue") + f": best round {rounds['best_round']} "
                    f"of {rounds['rounds']} (0-based), rounds took {rounds['rounds_wall_s'] / 60:.1f} min")
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
        ``model``, ``per_market`` (``{market: {"valid", "test", "checkpoint"}}``),
        ``results_files`` (the saved JSON and CSV table) and, for federated training,
        ``federated_rounds`` (``best_round``, ``rounds``, ``rounds_wall_s`` and the per-round
        ``history`` of macro valid score, train loss and seconds).
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list,
                    config_dict=config_dict, argv=argv)
    init_seed(config["seed"], config["reproducibility"])
    log_path = init_run_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)
    result = _run(config, saved=saved)
    _report(config, result, log_path)
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
    init_run_logger(config)
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    train, valid, test = ({m: d[m] for m in checkpoint["markets"]} for d in loaders)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, next(iter(train.values()))._dataset)
    if len(train) > 1 and hasattr(model, "use_market"):  # a pooled first stage: all its markets
        model.use_market(pooled_train_data(config, train)._dataset)
    if "stage" in checkpoint and hasattr(model, "set_stage"):
        model.set_stage(checkpoint["stage"])  # e.g. FeCoSR after fine-tuning: adapter applied
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model.to(config["device"]), dataset, train, valid, test
