"""RecBole's samplers restricted to one market's catalogue."""

import numpy as np
import torch
from recbole.sampler import RepeatableSampler, Sampler
from recbole.sampler.sampler import AbstractSampler


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


def _resample(sampler, values, check, rejected):
    """RecBole's rejection loop: redraw ``values[check]`` with ``sampler.sampling`` until no
    redrawn value is rejected; ``rejected(positions, drawn)`` is a bool array over ``check``."""
    while len(check) > 0:
        values[check] = drawn = sampler.sampling(len(check))
        check = check[rejected(check, drawn)]
    return values


def _user_negatives(sampler, user, items, num):
    """One user's negatives exactly as ``sampler.sample_by_user_ids(users, items, num)`` draws
    them (the same ``sampling`` calls, so the same values for the same numpy random state), for
    RecBole's ``Sampler`` and ``RepeatableSampler``, without their per-call set and array copies.

    Args:
        user (int): the user's id.
        items (np.ndarray): ``[n]`` the user's positive items.

    Returns:
        np.ndarray: ``[n * num]`` int64, RecBole's order.
    """
    total = len(items) * num
    if isinstance(sampler, RepeatableSampler):
        if len(items) == 1:  # RecBole's one-key branch: reject the positive
            values = sampler.sampling(total)
            return _resample(sampler, values, np.flatnonzero(values == items[0]),
                             lambda check, drawn: drawn == items[0])
        owner = np.tile(items, num)  # each position's positive (RecBole's tiled keys)
        return _resample(sampler, np.zeros(total, dtype=np.int64), np.arange(total),
                         lambda check, drawn: drawn == owner[check])
    used = np.fromiter(sampler.used_ids[user], dtype=np.int64)
    values = sampler.sampling(total)
    return _resample(sampler, values, np.flatnonzero(np.isin(values, used)),
                     lambda check, drawn: np.isin(drawn, used))


def _draws_as_recbole(sampler):
    """True when ``sampler`` samples by user with RecBole 1.2.1's own ``Sampler`` or
    ``RepeatableSampler`` code (which :func:`_user_negatives` reproduces)."""
    kind = type(sampler)
    return (kind.sample_by_key_ids is AbstractSampler.sample_by_key_ids
            and (kind.sample_by_user_ids is Sampler.sample_by_user_ids
                 or kind.sample_by_user_ids is RepeatableSampler.sample_by_user_ids))


def negatives_by_user(sampler, users, items, counts, num):
    """Each user's sampled negatives as RecBole's evaluation loader draws them: one
    ``sample_by_user_ids`` call per user, in order.

    Args:
        users (np.ndarray): ``[n_pos]`` user ids, users contiguous.
        items (np.ndarray): ``[n_pos]`` positive item ids.
        counts (np.ndarray): ``[n_users]`` rows per user.
        num (int): negatives per row.

    Returns:
        torch.LongTensor: ``[n_pos * num]``, user by user, each user's in RecBole's order (the
        k-th negative of all the user's rows, then the (k+1)-th).
    """
    bounds = np.cumsum(np.r_[0, counts])
    if _draws_as_recbole(sampler):
        draws = [_user_negatives(sampler, users[a], items[a:b], num)
                 for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        draws = [np.asarray(sampler.sample_by_user_ids(users[a:b], items[a:b], num))
                 for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.from_numpy(np.concatenate(draws).astype(np.int64))
