"""``create_dataset`` / ``data_preparation`` returning RecBole loaders per market."""

from logging import getLogger

import numpy as np
from recbole.data.dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader
from recbole.data.interaction import cat_interactions
from recbole.data.utils import get_dataloader
from recbole.sampler import KGSampler, RepeatableSampler, Sampler
from recbole.utils import ModelType, set_color

from recbole_cmr.data.dataloader import (MarketFullSortEvalDataLoader, MarketNegSampleEvalDataLoader,
                                         check_mask_history_items)
from recbole_cmr.data.dataset import MultiMarketDataset
from recbole_cmr.data.sampler import create_market_samplers


def create_dataset(config):
    """Load the markets of ``config['dataset']`` as a :class:`MultiMarketDataset`.

    Markets share item ids (and token vocabularies) unless ``train_mode`` is ``local``, where
    each market keeps plain RecBole's ids; user ids are made disjoint across markets when
    ``train_mode`` is ``pooled``.
    """
    check_knowledge_train_mode(config)
    return MultiMarketDataset(config, global_users=config["train_mode"] == "pooled",
                              shared_ids=config["train_mode"] != "local")


def check_knowledge_train_mode(config):
    """A knowledge-aware model (``ModelType.KNOWLEDGE``) cannot train federated: RecBole trains it
    with a ``KnowledgeBasedDataLoader`` (two loaders, no ``generator`` of its own, which a
    federated client saves and restores) and KG trainer steps that drop a client's FedProx loss."""
    if config["train_mode"] == "federated" and config["MODEL_TYPE"] == ModelType.KNOWLEDGE:
        raise ValueError(
            f"train_mode federated cannot train model [{config['model']}]: it is knowledge-aware "
            "(ModelType.KNOWLEDGE), and federated clients do not run RecBole's knowledge-graph "
            "loaders and trainers; use train_mode local, pooled or transfer.")


def _foreign_items(item_num, catalogue):
    """Item ids (1..item_num-1) absent from ``catalogue``, shape ``[n_foreign]``."""
    return np.setdiff1d(np.arange(1, item_num), catalogue)


def market_loaders(config, dataset, built, catalogue, item_num):
    """RecBole's train/valid/test loaders for one market's ``built`` splits.

    Negatives come from the market's ``catalogue`` and full ranking masks foreign items (and,
    with ``mask_history_items``, each row's input sequence).
    """
    check_mask_history_items(config)  # also when no phase ranks fully: an error, not ignored
    for split in built:  # for the catalogue-size metrics (MultiMarketTrainerMixin.evaluate)
        split.market_catalogue, split.market_train = catalogue, built[0]
    foreign = _foreign_items(item_num, catalogue)
    restrict = catalogue if len(foreign) else None
    samplers = create_market_samplers(config, dataset, built, restrict)
    loaders = [train_loader(config, built[0], samplers[0], dataset)]
    for phase, split, sampler in zip(("valid", "test"), built[1:], samplers[1:]):
        loader_class = get_dataloader(config, phase)
        if loader_class is FullSortEvalDataLoader:
            loaders.append(MarketFullSortEvalDataLoader(config, split, sampler))
        elif loader_class is NegSampleEvalDataLoader:
            loaders.append(MarketNegSampleEvalDataLoader(config, split, sampler))
        else:
            loaders.append(loader_class(config, split, sampler, shuffle=False))
    return loaders


def train_loader(config, split, sampler, kg_dataset):
    """RecBole's training loader of ``split`` (its ``data_preparation``): for a knowledge-aware
    model a ``KnowledgeBasedDataLoader``, whose ``KGSampler`` draws negative tail entities over
    ``kg_dataset``'s knowledge graph (a built dataset: the market, or the pooled split)."""
    loader_class = get_dataloader(config, "train")
    if config["MODEL_TYPE"] != ModelType.KNOWLEDGE:
        return loader_class(config, split, sampler, shuffle=config["shuffle"])
    args = config["train_neg_sample_args"]
    kg_sampler = KGSampler(kg_dataset, args["distribution"], args["alpha"])
    return loader_class(config, split, sampler, kg_sampler, shuffle=True)


def data_preparation(config, dataset):
    """Split each market by RecBole's ``eval_args`` and build its RecBole loaders.

    Returns:
        tuple of three ``dict[str, DataLoader]`` (train, valid, test), keyed by market.
    """
    train, valid, test = {}, {}, {}
    for market, built in dataset.build().items():
        train[market], valid[market], test[market] = market_loaders(
            config, dataset.market_datasets[market], built, dataset.catalogue(market),
            dataset.market_datasets[market].item_num,
        )
    _log_loaders(config)
    return train, valid, test


def pooled_train_data(config, train_data):
    """One RecBole ``TrainDataLoader`` over the training splits of all markets.

    Args:
        train_data (dict[str, TrainDataLoader]): per-market loaders (user ids must be global).
    """
    splits = [loader._dataset for loader in train_data.values()]
    pooled = splits[0].copy(cat_interactions([s.inter_feat for s in splits]))
    pooled.market = "pooled"
    catalogues = [getattr(s, "market_catalogue", None) for s in splits]
    if all(c is not None for c in catalogues):
        pooled.market_catalogue = np.unique(np.concatenate(catalogues))
    args = config["train_neg_sample_args"]
    sampler = None
    if args is not None and args["distribution"] != "none":
        if config["repeatable"]:
            sampler = RepeatableSampler(["train"], pooled, args["distribution"], args["alpha"])
        else:
            sampler = Sampler(["train"], [pooled], args["distribution"], args["alpha"])
        sampler = sampler.set_phase("train")
    return train_loader(config, pooled, sampler, pooled)


def _log_loaders(config):
    logger = getLogger()
    logger.info(
        set_color("[Training]: ", "pink") + set_color("train_batch_size", "cyan") + " = "
        + set_color(f'[{config["train_batch_size"]}]', "yellow")
        + set_color(" train_neg_sample_args", "cyan") + ": "
        + set_color(f'[{config["train_neg_sample_args"]}]', "yellow")
    )
    logger.info(
        set_color("[Evaluation]: ", "pink") + set_color("eval_batch_size", "cyan") + " = "
        + set_color(f'[{config["eval_batch_size"]}]', "yellow")
        + set_color(" eval_args", "cyan") + ": "
        + set_color(f'[{config["eval_args"]}]', "yellow")
    )
