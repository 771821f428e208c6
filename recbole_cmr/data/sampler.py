"""RecBole's samplers restricted to one market's catalogue."""

import numpy as np
from recbole.sampler import RepeatableSampler, Sampler


class CatalogueSamplerMixin:
    """Uniform negatives drawn from ``catalogue`` (item ids of one market) instead of all items.

    ``catalogue=None`` keeps RecBole's own sampling (used when the market holds every item, so a
    single-market run draws exactly the negatives plain RecBole draws). Popularity sampling needs
    no change: RecBole already draws it from the items in the market's interactions.
    """

    def __init__(self, *args, catalogue=None, **kwargs):
        self.catalogue = None if catalogue is None else np.asarray(catalogue, dtype=np.int64)
        super().__init__(*args, **kwargs)

    def get_used_ids(self):
        """RecBole's used ids, checked against the market's catalogue.

        RecBole's own guard compares a user's items with the global item count; over one
        market's catalogue, a user who has every catalogue item would make the sampler loop
        forever (it resamples until it draws an unused item).
        """
        used = super().get_used_ids()
        if self.catalogue is None:
            return used
        last = used[self.phases[-1]] if isinstance(used, dict) else used
        catalogue = set(self.catalogue.tolist())
        full = [u for u, items in enumerate(last) if len(items) >= len(catalogue) and catalogue <= items]
        if full or len(catalogue) < 2:
            market = getattr((getattr(self, "datasets", None) or [None])[0], "market", "?")
            raise ValueError(
                f"Market [{market}]: {len(full)} user(s) (e.g. internal id {full[:3]}) have "
                f"interacted with every one of the market's {len(catalogue)} items, so no negative "
                "item can be sampled for them (training negatives or uni/pop evaluation). Filter "
                "them with user_inter_num_interval, or evaluate that market with full ranking "
                "(eval_args mode: full)."
            )
        return used

    def _uni_sampling(self, sample_num):
        if self.catalogue is None:
            return super()._uni_sampling(sample_num)
        return self.catalogue[np.random.randint(0, len(self.catalogue), sample_num)]


class MarketSampler(CatalogueSamplerMixin, Sampler):
    """RecBole's ``Sampler`` (negatives exclude all the user's items) over one market."""


class MarketRepeatableSampler(CatalogueSamplerMixin, RepeatableSampler):
    """RecBole's ``RepeatableSampler`` (negatives exclude the positive only) over one market."""


def _create_sampler(dataset, built, distribution, repeatable, alpha, catalogue, base=None):
    if distribution == "none":
        return None
    if base is not None:
        base.set_distribution(distribution)
        return base
    phases = ["train", "valid", "test"]
    if repeatable:
        return MarketRepeatableSampler(phases, dataset, distribution, alpha, catalogue=catalogue)
    return MarketSampler(phases, built, distribution, alpha, catalogue=catalogue)


def create_market_samplers(config, dataset, built, catalogue=None):
    """RecBole's ``create_samplers`` for one market: ``(train, valid, test)`` samplers or None."""
    args = [config[f"{p}_neg_sample_args"] for p in ("train", "valid", "test")]
    repeatable = config["repeatable"]
    base = _create_sampler(
        dataset, built, args[0]["distribution"], repeatable, args[0]["alpha"], catalogue
    )
    samplers = [base.set_phase("train") if base else None]
    for phase, arg in zip(("valid", "test"), args[1:]):
        sampler = _create_sampler(
            dataset, built, arg["distribution"], repeatable, 1.0, catalogue, base=base
        )
        samplers.append(sampler.set_phase(phase) if sampler else None)
    return tuple(samplers)
