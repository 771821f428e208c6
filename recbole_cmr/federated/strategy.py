"""Aggregation strategies: small objects that see named tensors and sample counts, nothing else.

The interface maps one-to-one onto Flower's ``Strategy.aggregate_fit``::

    strategy.aggregate(round, [(client_id, update, num_examples), ...]) -> dict[str, Tensor]

``update`` is a client's ``{parameter name: tensor}`` of the *shared* parameters (new values, not
deltas) and ``num_examples`` its number of training interactions. Which parameters are shared is
chosen by name patterns (:func:`select_shared`), never by a strategy.
"""

import abc

import torch

from recbole_cmr.utils import matching

_STRATEGIES = {}


def register_strategy(name):
    """Class decorator: make a :class:`Strategy` available as ``fed_strategy: <name>``."""

    def register(cls):
        _STRATEGIES[name.lower()] = cls
        return cls

    return register


def get_strategy(name):
    """The :class:`Strategy` class registered as ``name`` (case-insensitive).

    Raises:
        ValueError: no strategy of that name.
    """
    try:
        return _STRATEGIES[str(name).lower()]
    except KeyError:
        raise ValueError(
            f"Unknown fed_strategy [{name}]; known strategies: {sorted(_STRATEGIES)}."
        ) from None


def select_shared(state_dict, shared=("*",), local=()):
    """Names of the parameters that cross the market boundary.

    A name is shared when it matches a ``shared`` pattern and no ``local`` pattern (e.g.
    ``local=["*LayerNorm*"]`` keeps normalisation layers local, as in FedBN). Patterns are fnmatch
    globs (``"*norm*"``, case-sensitive) or Python regexes matched against the whole name
    (``r"trm_encoder\\.layer\\.\\d+\\..*"``).

    Args:
        state_dict (Mapping[str, Tensor]): a model's ``state_dict()`` (only its keys are read).
        shared (Sequence[str]): patterns of shared parameters.
        local (Sequence[str]): patterns of parameters that stay on the client.

    Returns:
        list[str]: the shared names, in ``state_dict`` order.
    """
    kept_local = set(matching(state_dict, local))
    return [n for n in matching(state_dict, shared) if n not in kept_local]


class Strategy(abc.ABC):
    """Base class of aggregation strategies (subclass and register with :func:`register_strategy`).

    Args:
        config (Config, optional): the run's settings, for strategies that have some.
    """

    def __init__(self, config=None):
        self.config = config

    @abc.abstractmethod
    def aggregate(self, round, results):
        """Combine the clients' updates into the new global shared parameters.

        Args:
            round (int): 0-based round index.
            results (list[tuple[str, dict[str, Tensor], int]]): ``(client_id, update,
                num_examples)``; every update holds the same names and shapes, and only finite
                values (the server drops the others before calling this).

        Returns:
            dict[str, Tensor]: the new global value of each name, same shape and dtype.
        """


def weighted_mean(tensors, weights):
    """``sum_i w_i * t_i`` with ``weights`` summing to 1, computed in float64.

    Args:
        tensors (list[Tensor]): same shape ``[*]`` and dtype each.
        weights (list[float]): one weight per tensor.

    Returns:
        Tensor: shape ``[*]``, the dtype of ``tensors[0]`` (integers are rounded).
    """
    total = sum(w * t.double() for w, t in zip(weights, tensors))
    dtype = tensors[0].dtype
    if not (dtype.is_floating_point or dtype.is_complex):
        total = total.round()
    return total.to(dtype)


@register_strategy("fedavg")
class FedAvg(Strategy):
    """FedAvg (McMahan et al., 2017): the mean of the updates weighted by ``num_examples``.

    With ``num_examples`` all zero the updates are averaged with equal weights.
    """

    def aggregate(self, round, results):
        if not results:
            raise ValueError(f"Round {round}: nothing to aggregate.")
        counts = [n for _, _, n in results]
        total = sum(counts)
        weights = [n / total for n in counts] if total > 0 else [1 / len(counts)] * len(counts)
        names = list(results[0][1])
        for client_id, update, _ in results:
            if set(update) != set(names):
                raise ValueError(
                    f"Round {round}: client [{client_id}] sent parameters {sorted(update)}, "
                    f"expected {sorted(names)}."
                )
        return {
            name: weighted_mean([update[name] for _, update, _ in results], weights)
            for name in names
        }
