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

    def configure_round(self, round, global_params):
        """Called with the global shared parameters each round before they are broadcast
        (Flower's ``configure_fit`` receives them too). Stateless strategies ignore it.

        Args:
            round (int): 0-based round index.
            global_params (dict[str, Tensor]): the values the clients start this round from.
        """

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
    return cast_like(sum(w * t.double() for w, t in zip(weights, tensors)), tensors[0].dtype)


def cast_like(total, dtype):
    """A float64 aggregate ``total`` back to ``dtype`` (integer tensors are rounded first)."""
    if not (dtype.is_floating_point or dtype.is_complex):
        total = total.round()
    return total.to(dtype)


def example_weights(counts):
    """``counts`` normalised to sum to 1; equal weights when they are all zero."""
    total = sum(counts)
    return [n / total for n in counts] if total > 0 else [1 / len(counts)] * len(counts)


@register_strategy("fedavg")
class FedAvg(Strategy):
    """FedAvg (McMahan et al., 2017): the mean of the updates weighted by ``num_examples``.

    With ``num_examples`` all zero the updates are averaged with equal weights.
    """

    def aggregate(self, round, results):
        names = check_results(round, results)
        weights = example_weights([n for _, _, n in results])
        return {
            name: weighted_mean([update[name] for _, update, _ in results], weights)
            for name in names
        }


def check_results(round, results):
    """The parameter names of ``results``; raises ValueError if empty or the clients' names differ."""
    if not results:
        raise ValueError(f"Round {round}: nothing to aggregate.")
    names = list(results[0][1])
    for client_id, update, _ in results:
        if set(update) != set(names):
            raise ValueError(
                f"Round {round}: client [{client_id}] sent parameters {sorted(update)}, "
                f"expected {sorted(names)}."
            )
    return names


def rowwise_mean(tensors, counts, current):
    """Per row (dim 0), the ``counts``-weighted mean of the tensors that changed that row.

    Args:
        tensors (list[Tensor]): the clients' values, shape ``[R, *]`` each (a scalar is one row).
        counts (list[int]): one weight per tensor (all zero: equal weights).
        current (Tensor): the value the clients started from, shape ``[R, *]``.

    Returns:
        Tensor: shape ``[R, *]``, dtype of ``current``; a row no client changed keeps ``current``.
    """
    stack = torch.stack([t.double() for t in tensors])  # [C, R, *]
    base = current.double()
    rows = stack.reshape(len(tensors), base.shape[0] if base.dim() else 1, -1)  # [C, R, D]
    changed = (rows != base.reshape(1, rows.shape[1], -1)).any(-1)  # [C, R]
    w = torch.tensor(example_weights(counts), dtype=torch.float64)[:, None] * changed  # [C, R]
    denom = w.sum(0)  # [R]
    mean = (w[:, :, None] * rows).sum(0) / denom.clamp_min(1e-300)[:, None]  # [R, D]
    mean = torch.where(denom[:, None] > 0, mean, base.reshape(rows.shape[1], -1))
    return cast_like(mean.reshape(base.shape), current.dtype)


@register_strategy("fedavg_rows")
class FedAvgRows(Strategy):
    """FedAvg per row: each row (dim 0) of a tensor is averaged, weighted by ``num_examples``,
    over the clients that changed that row only; a row nobody changed keeps its global value.

    Meant for item embedding tables trained with ``market_softmax: True``: a market then leaves
    the rows of items it has no interactions with bit-identical, so an item's row is the average
    over the markets that sell it, not diluted by the markets that do not (with plain FedAvg a
    small market's own items move by its share of all interactions, 1 % for XMRec ``in``). Dense
    tensors, which every client changes, get exactly FedAvg's mean. Rows change whenever a client
    has a non-zero gradient there, so weight decay (an L2 term on every row) turns it into FedAvg.
    """

    def __init__(self, config=None):
        super().__init__(config)
        self.current = None

    def configure_round(self, round, global_params):
        self.current = global_params

    def aggregate(self, round, results):
        names = check_results(round, results)
        if self.current is None:
            raise RuntimeError(
                "fedavg_rows needs the round's global parameters: call configure_round first."
            )
        counts = [n for _, _, n in results]
        return {
            name: rowwise_mean([update[name] for _, update, _ in results], counts, self.current[name])
            for name in names
        }
