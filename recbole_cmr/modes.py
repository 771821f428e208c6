"""Train modes as stages: a first stage, then a per-market stage.

=============  ==========================================  ===========================================
``train_mode``  first stage                                 per-market stage
=============  ==========================================  ===========================================
``local``       none                                        fit a fresh model on the market
``pooled``      one model on the pooled markets             (``finetune: True``) fine-tune its copy
``federated``   rounds over every market (``federated``)    (``finetune: True``) fine-tune its copy
``transfer``    one model on the source market(s)           fine-tune its copy on every other market
=============  ==========================================  ===========================================

Every fine-tuned model is a market's own copy made by :func:`market_model` (seeded from the
market's own seed, deep-copied, re-pointed at the market with ``use_market``), in every mode and on
a Flower node alike, so no mode can forget a step and one market's numbers do not depend on which
markets were fine-tuned before it.

Each mode returns ``{market: {"valid", "test", "per_user", "checkpoint", ...}}`` (``per_user``: the
trainer's ``last_per_user`` of the test, each test user's metric values, for paired comparisons
of runs); ``info`` receives what the run's summary needs besides (``default_valid``: the markets
the macro is over by default).
"""

import copy
from logging import getLogger

from recbole.utils import init_seed, set_color

from recbole_cmr.compat import load_checkpoint
from recbole_cmr.data import pooled_train_data
from recbole_cmr.federated import train_federated
from recbole_cmr.federated.client import client_seed
from recbole_cmr.trainer import check_lr_decay, finetune_trainer, keep_pretrained, new_market_trainer
from recbole_cmr.utils import get_model, get_trainer

TRAIN_MODES = ("local", "pooled", "federated", "transfer")


def check_train_mode(config):
    """Raise ValueError unless ``train_mode`` is one of :data:`TRAIN_MODES`."""
    if config["train_mode"] not in TRAIN_MODES:
        raise ValueError(f"train_mode [{config['train_mode']}] must be one of {list(TRAIN_MODES)}.")


def use_market(model, dataset):
    """Point ``model`` at the market(s) of ``dataset`` (a training split): its softmax mask, S²CE
    neighbours, active catalogue (``model.use_market``); plain RecBole models have nothing to
    re-point. Returns ``model``."""
    if hasattr(model, "use_market"):
        model.use_market(dataset)
    return model


def market_model(config, base, market, train, stage="finetune"):
    """``market``'s own copy of ``base`` for ``stage``.

    Seeds every random generator from the market's own seed (``client_seed(seed, market,
    stage)``, as a federated client on its own machine would), deep-copies ``base`` and re-points
    the copy at the market (:func:`use_market`).

    Args:
        config (Config): the run's settings (``seed``, ``reproducibility``).
        base (AbstractRecommender): the first stage's model; left untouched.
        market (str): the market the copy is for.
        train (dict[str, TrainDataLoader]): ``{market: loader}``; ``train[market]`` is used.
        stage (str): the stage the copy is made for (part of its seed).
    """
    init_seed(client_seed(config["seed"], market, stage), config["reproducibility"])
    return use_market(copy.deepcopy(base), train[market]._dataset)


def log_market(market, stage=""):
    getLogger().info(set_color(f"======== market {market} {stage}========", "yellow"))


def fit_and_test(config, trainer, market, train, valid, test, saved, verbose):
    """RecBole's fit on one market, then its test: ``{valid, test, per_user, checkpoint}``."""
    best_valid = trainer.fit(train[market], valid[market], verbose=verbose, saved=saved,
                             show_progress=config["show_progress"])[1]
    tested = trainer.evaluate(test[market], load_best_model=saved, show_progress=config["show_progress"])
    return {
        "valid": best_valid,
        "test": tested,
        "per_user": trainer.last_per_user,
        "checkpoint": trainer.saved_model_file if saved else None,
    }


def train_local(config, train, valid, test, saved, verbose, info):
    """One model per market, each as plain RecBole would train it on that market alone."""
    per_market = {}
    for market in train:
        log_market(market)
        model, trainer = new_market_trainer(config, train[market]._dataset, market, [market])
        if market == next(iter(train)) and verbose:
            getLogger().info(model)
        per_market[market] = fit_and_test(config, trainer, market, train, valid, test, saved, verbose)
    return per_market


def finetune_local(config, bases, train, valid, test, saved, verbose, models_out=None):
    """Fine-tune each market's copy (:func:`market_model`) of ``bases[market]`` on that market
    (see ``finetune_trainer``).

    Args:
        bases (dict[str, AbstractRecommender]): ``{market: first-stage model}``; not changed.
        models_out (dict, optional): filled with ``{market: fine-tuned model}``.

    Returns:
        dict: ``{market: {valid, test, checkpoint[, kept_pretrained]}}``.
    """
    per_market = {}
    for market, base in bases.items():
        log_market(market, "fine-tuning ")
        model = market_model(config, base, market, train)
        trainer = finetune_trainer(config, model, f"{market}-finetuned", [market])
        keep = config["finetune_keep_pretrained"]
        before = keep_pretrained(trainer, valid[market], saved, config["show_progress"]) if keep else None
        per_market[market] = fit_and_test(config, trainer, market, train, valid, test, saved, verbose)
        if keep:
            per_market[market]["kept_pretrained"] = bool(trainer.best_valid_score == before)
        if models_out is not None:
            models_out[market] = model
    return per_market


def train_federated_mode(config, train, valid, test, saved, verbose, info):
    """Federated pretraining over all markets, then (``finetune: True``) local fine-tuning.

    With fine-tuning, each market also records its federated (pre-fine-tuning) results under
    ``federated``. ``info["federated_rounds"]`` gets the rounds' summary (best round, wall time,
    macro valid score per round).
    """
    models, rounds = {}, {}
    federated = train_federated(config, train, valid, test, saved, verbose,
                                resume_file=config["fed_resume"], models_out=models,
                                pretrained_file=config["fed_pretrained"], rounds_out=rounds)
    info["federated_rounds"] = rounds
    if not config["finetune"]:
        return federated
    per_market = finetune_local(config, models, train, valid, test, saved, verbose)
    for market, result in per_market.items():
        result["federated"] = federated[market]
    return per_market


def source_markets(config, markets):
    """The markets of ``source_market`` (one name or a list; checked), else the market with the
    most training interactions.

    Args:
        markets (dict[str, TrainDataLoader]): ``{market: training loader}``.
    """
    named = config["source_market"]
    if named is None:
        return [max(markets, key=lambda m: markets[m]._dataset.inter_num)]
    named = [named] if isinstance(named, str) else list(named)
    unknown = [m for m in named if m not in markets]
    if unknown or not named:
        raise ValueError(f"source_market {unknown or named} is not one of the markets {list(markets)}.")
    return named


def first_stage(config, train, valid, test, markets, valid_markets, tag, saved, verbose):
    """One model trained on the training rows of ``markets`` (pooled when several) and selected by
    the macro valid score over ``valid_markets``, or loaded from ``pretrained``.

    Returns:
        tuple: ``(model, {market: {valid, test, per_user, checkpoint}})`` for every market of
        ``test``.
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
        load_pretrained(config, model, trainer)
    else:
        checks = valid[markets[0]] if single else {m: valid[m] for m in valid_markets}
        trainer.fit(data, checks, verbose=verbose, saved=saved, show_progress=config["show_progress"])
    loaded = saved or bool(config["pretrained"])
    progress = config["show_progress"]
    tests = trainer.evaluate(test, load_best_model=loaded, show_progress=progress)
    per_user = trainer.last_per_user
    best = {markets[0]: trainer.best_valid_result} if single and not config["pretrained"] else \
        (getattr(trainer, "best_valid_per_market", None) or {})
    valids = {m: best.get(m) or trainer.evaluate(valid[m], load_best_model=False, show_progress=progress)
              for m in test}
    checkpoint = config["pretrained"] or (trainer.saved_model_file if saved else None)
    return model, {m: {"valid": valids[m], "test": tests[m], "per_user": per_user[m], "checkpoint": checkpoint}
                   for m in test}


def train_transfer(config, train, valid, test, saved, verbose, info):
    """Transfer: train on the source market(s) (pooled when several, e.g. ANT's auxiliary
    domains), fine-tune a copy on each other market (the targets).

    Each source keeps its own results, plus ``after_transfer``: its test results under each
    target's fine-tuned model (the source degradation that one-to-one transfer causes), and
    ``after_transfer_per_user``: each of these evaluations' per-user values (as ``per_user``).
    """
    sources = source_markets(config, train)
    log_market(", ".join(sources), "(source) ")
    model, per_market = first_stage(config, train, valid, {m: test[m] for m in sources}, sources,
                                    sources, "-".join(sources), saved, verbose)
    targets = [m for m in train if m not in sources]
    tuned = {}
    per_market.update(finetune_local(config, {m: model for m in targets}, train, valid, test, saved,
                                     verbose, models_out=tuned))
    info["default_valid"] = targets  # what the run's valid score is over by default
    for source in sources:
        after, values = {}, {}
        for market, target in tuned.items():
            trainer = trainer_for(config, use_market(target, train[source]._dataset))
            after[market] = trainer.evaluate(test[source], load_best_model=False)
            values[market] = trainer.last_per_user
        per_market[source].update(after_transfer=after, after_transfer_per_user=values)
    return per_market


def trainer_for(config, model):
    """A plugin trainer around an existing ``model`` (for evaluation)."""
    return get_trainer(config["MODEL_TYPE"], config["model"])(config, model)


def finetuned_markets(config, markets):
    """The markets whose copy of the pooled model is fine-tuned: ``finetune_markets``, else every
    market, except the source(s) for a model that cannot fine-tune on its source
    (``finetunes_source = False``, e.g. MKT, whose second stage learns the target only)."""
    if config["finetune_markets"] is not None:
        return market_subset(config, "finetune_markets", markets)
    if getattr(get_model(config["model"]), "finetunes_source", True):
        return markets
    sources = [config["source_market"]] if isinstance(config["source_market"], str) \
        else list(config["source_market"] or [])
    if not sources:
        raise ValueError(f"model {config['model']} fine-tunes only its target markets: set "
                         "source_market (or finetune_markets) to say which market is the source.")
    market_subset(config, "source_market", markets)
    return [m for m in markets if m not in sources]


def train_pooled(config, train, valid, test, saved, verbose, info):
    """One model on the training data of all markets (or of ``pooled_markets``), validated on the
    macro average over ``valid_markets``; with ``finetune: True`` a copy of it is then
    fine-tuned on each of :func:`finetuned_markets` (as after federated pretraining), which also
    record their pooled results under ``pooled`` and are the run's macro by default.
    ``pretrained`` loads a pooled run's checkpoint instead of training (e.g. MKT's stage 2 alone)."""
    markets = list(train)
    pooled = market_subset(config, "pooled_markets", markets)
    model, per_market = first_stage(config, train, valid, test, pooled,
                                    market_subset(config, "valid_markets", markets), "pooled", saved,
                                    verbose)
    if not config["finetune"]:
        return per_market
    targets = finetuned_markets(config, markets)
    tuned = finetune_local(config, {m: model for m in targets}, train, valid, test, saved, verbose)
    for market, result in tuned.items():
        result["pooled"] = per_market[market]
    info["default_valid"] = targets
    return {**per_market, **tuned}


def market_subset(config, key, markets):
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


def load_pretrained(config, model, trainer):
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


MODES = {"local": train_local, "pooled": train_pooled, "federated": train_federated_mode,
         "transfer": train_transfer}


def train_markets(config, train, valid, test, saved=True, verbose=True):
    """Run ``config["train_mode"]``.

    Returns:
        tuple: ``(per_market, info)`` (see the module docstring).
    """
    check_train_mode(config)
    info = {}
    per_market = MODES[config["train_mode"]](config, train, valid, test, saved, verbose, info)
    return per_market, info
