"""Aggregation strategies: small objects that see named tensors and sample counts, nothing else.

The interface maps one-to-one onto Flower's ``Strategy.aggregate_fit``::

    strategy.aggregate(round, [(client_id, update, num_examples), ...]) -> dict[str, Tensor]

``update`` is a client's ``{parameter name: tensor}`` of the *shared* parameters (new values, not
deltas) and ``num_examples`` its number of training interactions; each result is a
:class:`FitRes`, which also carries the reply's ``metrics`` (``loss``, ``num_steps``: the
optimizer steps the client took, which FedNova reads). Which parameters are shared is
chosen by name patterns (:func:`select_shared`), never by a strategy. A strategy computes on the
device of the updates (it creates every tensor there) and returns its values on that device.
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


def strategy_names():
    """The names every registered strategy is known by (``fed_strategy`` values), sorted."""
    return sorted(_STRATEGIES)


def get_strategy(name):
    """The :class:`Strategy` class registered as ``name`` (case-insensitive).

    Raises:
        ValueError: no strategy of that name.
    """
    try:
        return _STRATEGIES[str(name).lower()]
    except KeyError:
        raise ValueError(
            f"Unknown fed_strategy [{name}]; known strategies: {strategy_names()}."
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


class FitRes(tuple):
    """One client's reply to a training round: the tuple ``(client_id, update, num_examples)``
    (what every strategy unpacks) with the reply's float ``metrics`` (``loss``, ``num_steps``)
    and its ``extra`` tensors (SCAFFOLD's control-variate change; ``{}`` otherwise) as
    attributes."""

    def __new__(cls, client_id, update, num_examples, metrics=None, extra=None):
        result = super().__new__(cls, (client_id, update, num_examples))
        result.metrics, result.extra = dict(metrics or {}), dict(extra or {})
        return result


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

    def check_names(self, names):
        """Called once by the server with the shared parameter names before round 0: check the
        strategy's own name patterns (with :func:`recbole_cmr.utils.check_patterns`) against them.
        Strategies without patterns accept any names."""

    def client_config(self, round):
        """What the clients are told with this round's parameters (Flower's fit ``config``),
        e.g. FedProx's ``proximal_mu``: a ``{str: float}`` dict."""
        return {}

    def client_tensors(self, round):
        """Tensors every client gets with this round's parameters (SCAFFOLD's server control
        variate), ``{name: tensor}``, or None (most strategies: the fit message has none)."""
        return None

    def set_clients(self, client_ids):
        """Told once by the server: every client of the federation (selected or not)."""

    def round_report(self):
        """Plain numbers about the last :meth:`aggregate` for the round's history (e.g.
        PF-MSMTrec's update cosines and client weights); ``{}`` for most strategies."""
        return {}

    def state_dict(self):
        """The strategy's state across rounds (server moments), saved in round checkpoints."""
        return {}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict` output (a resumed run)."""

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
    weights = torch.tensor(example_weights(counts), dtype=torch.float64, device=stack.device)
    w = weights[:, None] * changed  # [C, R]
    denom = w.sum(0)  # [R]
    mean = (w[:, :, None] * rows).sum(0) / denom.clamp_min(1e-300)[:, None]  # [R, D]
    mean = torch.where(denom[:, None] > 0, mean, base.reshape(rows.shape[1], -1))
    return cast_like(mean.reshape(base.shape), current.dtype)


class NeedsRoundStart(Strategy):
    """Base of the strategies that read the round's global parameters (``configure_round``)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.current = None

    def configure_round(self, round, global_params):
        self.current = global_params

    def round_start(self):
        """The round's global parameters; an error before :meth:`configure_round`."""
        if self.current is None:
            raise RuntimeError(f"{type(self).__name__} needs the round's global parameters: call "
                               "configure_round first.")
        return self.current


@register_strategy("fedavg_rows")
class FedAvgRows(NeedsRoundStart):
    """FedAvg per row: each row (dim 0) of a tensor is averaged, weighted by ``num_examples``,
    over the clients that changed that row only; a row nobody changed keeps its global value.

    Meant for item embedding tables trained with ``market_softmax: True``: a market then leaves
    the rows of items it has no interactions with bit-identical, so an item's row is the average
    over the markets that sell it, not diluted by the markets that do not (with plain FedAvg a
    small market's own items move by its share of all interactions, 1 % for XMRec ``in``). Dense
    tensors, which every client changes, get exactly FedAvg's mean. Rows change whenever a client
    has a non-zero gradient there, so weight decay (an L2 term on every row) turns it into FedAvg.
    """

    supports_rowwise = True

    def aggregate(self, round, results):
        names = check_results(round, results)
        current = self.round_start()
        counts = [n for _, _, n in results]
        return {
            name: rowwise_mean([update[name] for _, update, _ in results], counts, current[name])
            for name in names
        }


# ---- server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) ----------
# Settings as Flower names them; ``None`` takes the strategy's own default (Flower's).
SERVER_SETTINGS = ("eta", "beta_1", "beta_2", "tau", "server_learning_rate", "server_momentum")


class ServerOptimizer(Strategy):
    """Base of the strategies that treat the averaged update as a pseudo-gradient.

    Each round: ``avg`` = FedAvg of the updates (per row with ``fed_rowwise: True``, as
    ``fedavg_rows``), ``delta = avg - x`` (float64), then :meth:`step` turns ``delta`` into the
    server's move, with per-tensor state (moments) that :meth:`state_dict` exposes for resuming.
    With ``fed_rowwise`` only the rows some client changed this round move and update their
    state (lazily, as a sparse optimizer does); the other rows keep value and state bit for bit.
    Integer tensors (counters) get the plain average.
    """

    settings = ()  # the SERVER_SETTINGS keys this strategy reads
    supports_rowwise = True  # fed_rowwise: averages per row
    defaults = {}

    def __init__(self, config=None):
        super().__init__(config)
        config = config or {}
        for key in self.settings:
            value = _get(config, key)
            setattr(self, key, self.defaults[key] if value is None else float(value))
        rowwise = bool(_get(config, "fed_rowwise"))
        self.average = FedAvgRows(config) if rowwise else FedAvg(config)
        self.rowwise = rowwise
        self.current, self.state = None, {}

    def configure_round(self, round, global_params):
        self.current = global_params
        self.average.configure_round(round, global_params)

    def aggregate(self, round, results):
        if self.current is None:
            raise RuntimeError(f"{type(self).__name__} needs the round's global parameters: "
                               "call configure_round first.")
        average = self.average.aggregate(round, results)
        new = {}
        for name, value in average.items():
            x = self.current[name]
            if not x.is_floating_point():
                new[name] = value
                continue
            delta = value.double() - x.double()
            state = self.state.get(name) or self.init_state(delta)
            move, new_state = self.step(delta, state, round)
            if self.rowwise:
                changed = (delta != 0).reshape(delta.shape[0], -1).any(1) if delta.dim() else delta != 0
                keep = changed.reshape(-1, *([1] * (delta.dim() - 1))) if delta.dim() else changed
                move = torch.where(keep, move, torch.zeros_like(move))
                new_state = {k: torch.where(keep, v, state[k]) for k, v in new_state.items()}
            self.state[name] = new_state
            new[name] = cast_like(x.double() + move, x.dtype)
        return new

    def init_state(self, delta):
        """The state of a tensor before its first step: ``{name: float64 tensor}``."""
        return {}

    @abc.abstractmethod
    def step(self, delta, state, round):
        """``(move, new_state)``: the change of the global value, from the pseudo-gradient
        ``delta = average - current`` (float64, any shape) and the tensor's state."""

    def state_dict(self):
        return {"state": self.state}

    def load_state_dict(self, state):
        self.state = {name: dict(s) for name, s in state["state"].items()}


def _get(config, key):
    try:
        return config[key]
    except (KeyError, TypeError):
        return None


@register_strategy("fedavgm")
class FedAvgM(ServerOptimizer):
    """FedAvgM (Hsu et al., 2019), as Flower's ``FedAvgM``: momentum ``v = server_momentum * v +
    (current - average)``, ``x -= server_learning_rate * v``. With lr 1 and momentum 0 it is FedAvg."""

    settings = ("server_learning_rate", "server_momentum")
    defaults = {"server_learning_rate": 1.0, "server_momentum": 0.0}

    def init_state(self, delta):
        return {"momentum": torch.zeros_like(delta)}

    def step(self, delta, state, round):
        momentum = self.server_momentum * state["momentum"] - delta
        return -self.server_learning_rate * momentum, {"momentum": momentum}


class _AdaptiveServer(ServerOptimizer):
    """FedAdam / FedYogi / FedAdagrad: ``m = beta_1 m + (1 - beta_1) delta``, ``v`` by the
    subclass, ``x += eta * m / (sqrt(v) + tau)``; ``v`` starts at ``tau**2`` (the paper's
    ``v_{-1} >= tau^2``), ``m`` at 0; no bias correction (Reddi et al., Algorithm 2)."""

    settings = ("eta", "beta_1", "beta_2", "tau")

    def init_state(self, delta):
        return {"m": torch.zeros_like(delta), "v": torch.full_like(delta, self.tau ** 2)}

    def step(self, delta, state, round):
        m = self.beta_1 * state["m"] + (1 - self.beta_1) * delta
        v = self.second_moment(state["v"], delta * delta)
        return self.eta * m / (v.sqrt() + self.tau), {"m": m, "v": v}

    @abc.abstractmethod
    def second_moment(self, v, delta2):
        """The new ``v`` from the old one and ``delta ** 2``."""


@register_strategy("fedadam")
class FedAdam(_AdaptiveServer):
    """FedAdam: ``v = beta_2 v + (1 - beta_2) delta^2`` (Flower's defaults)."""

    defaults = {"eta": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9}

    def second_moment(self, v, delta2):
        return self.beta_2 * v + (1 - self.beta_2) * delta2


@register_strategy("fedyogi")
class FedYogi(_AdaptiveServer):
    """FedYogi: ``v = v - (1 - beta_2) delta^2 sign(v - delta^2)`` (Flower's defaults)."""

    defaults = {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}

    def second_moment(self, v, delta2):
        return v - (1 - self.beta_2) * delta2 * torch.sign(v - delta2)


@register_strategy("fedadagrad")
class FedAdagrad(_AdaptiveServer):
    """FedAdagrad: ``v = v + delta^2`` (Flower's defaults: ``beta_1`` 0, so ``m = delta``)."""

    settings = ("eta", "beta_1", "tau")
    defaults = {"eta": 1e-1, "beta_1": 0.0, "tau": 1e-9}

    def second_moment(self, v, delta2):
        return v + delta2


@register_strategy("fedprox")
class FedProx(Strategy):
    """FedProx (Li et al., 2020), as Flower's ``FedProx``: FedAvg on the server (per row with
    ``fed_rowwise``), and each client adds ``proximal_mu / 2 * ||w - w_global||^2`` over the shared
    parameters to its loss (:meth:`client_config` sends ``proximal_mu``). ``proximal_mu: 0`` is
    FedAvg bit for bit."""

    settings = ("proximal_mu",)
    supports_rowwise = True

    def __init__(self, config=None):
        super().__init__(config)
        self.proximal_mu = float(_get(config, "proximal_mu") or 0.0)
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu [{self.proximal_mu}] must be >= 0.")
        self.average = FedAvgRows(config) if _get(config, "fed_rowwise") else FedAvg(config)

    def configure_round(self, round, global_params):
        self.average.configure_round(round, global_params)

    def client_config(self, round):
        return {"proximal_mu": self.proximal_mu}

    def aggregate(self, round, results):
        return self.average.aggregate(round, results)


@register_strategy("fednova")
class FedNova(NeedsRoundStart):
    """FedNova (Wang et al., NeurIPS 2020): each client's update normalised by its number of
    local steps ``tau_i`` (the reply's ``num_steps``), then scaled by the weighted mean step
    count: ``x += tau_eff * sum_i p_i (y_i - x) / tau_i`` with ``p_i`` the ``num_examples``
    weights and ``tau_eff = sum_i p_i tau_i``; with equal step counts it is FedAvg. The
    normalisation is the paper's for plain local SGD (``a_i = tau_i``); with RecBole's default
    optimizer (Adam) it is the step-count correction the paper motivates, not its exact ``a_i``.
    Markets of different sizes take different numbers of steps per epoch; ``fed_local_steps``
    makes them equal instead. Integer tensors (counters) get the plain average."""

    def aggregate(self, round, results):
        names = check_results(round, results)
        current = self.round_start()
        steps = []
        for result in results:
            tau = getattr(result, "metrics", {}).get("num_steps")
            if tau is None or not tau > 0:
                raise ValueError(f"Round {round}: fednova needs each client's num_steps > 0; "
                                 f"client [{result[0]}] sent {tau!r}.")
            steps.append(float(tau))
        weights = example_weights([n for _, _, n in results])
        tau_eff = sum(p * tau for p, tau in zip(weights, steps))
        new = {}
        for name in names:
            x, values = current[name], [update[name] for _, update, _ in results]
            if not x.is_floating_point():
                new[name] = weighted_mean(values, weights)
                continue
            base = x.double()
            move = sum(p / tau * (v.double() - base) for p, tau, v in zip(weights, steps, values))
            new[name] = cast_like(base + tau_eff * move, x.dtype)
        return new


@register_strategy("scaffold")
class Scaffold(NeedsRoundStart):
    """SCAFFOLD (Karimireddy et al., ICML 2020), option II, with FedAvg's weighting.

    Each round the clients get the server control variate ``c`` (:meth:`client_tensors`) and
    ``scaffold`` in their instructions; a client adds ``<c - c_i, w>`` to its loss, so every local
    step's gradient is corrected by ``c - c_i``, and after ``K`` steps at learning rate ``lr``
    keeps ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (state it saves with its private state) and
    replies the change ``c_i+ - c_i``. The server takes FedAvg of the values (global learning
    rate 1) and ``c += sum_i (c_i+ - c_i) / N`` over the ``N`` clients of the federation (all
    replying clients when not told). With RecBole's default optimizer (Adam) the correction goes
    through Adam's scaling, as in SCAFFOLD implementations that hook the gradient."""

    def __init__(self, config=None):
        super().__init__(config)
        self.control, self.n_clients = {}, None

    def set_clients(self, client_ids):
        self.n_clients = len(client_ids)

    def client_config(self, round):
        return {"scaffold": 1.0}

    def client_tensors(self, round):
        return {name: c.float() for name, c in self.control.items()}  # sent as float32

    def aggregate(self, round, results):
        names = check_results(round, results)
        self.round_start()
        weights = example_weights([n for _, _, n in results])
        new = {name: weighted_mean([update[name] for _, update, _ in results], weights)
               for name in names}
        changes = [getattr(result, "extra", {}) for result in results]
        if not all(changes):
            missing = [result[0] for result, change in zip(results, changes) if not change]
            raise ValueError(f"Round {round}: scaffold needs each client's control-variate change; "
                             f"clients {missing} sent none.")
        clients = self.n_clients or len(results)
        for name in changes[0]:
            total = sum(change[name].double() for change in changes)  # on the updates' device
            self.control[name] = self.control.get(name, torch.zeros_like(total)).to(total) + total / clients
        return new

    def state_dict(self):
        return {"control": self.control}

    def load_state_dict(self, state):
        self.control = dict(state.get("control", {}))


STRATEGY_SETTINGS = (*SERVER_SETTINGS, "proximal_mu")


def make_strategy(config):
    """The strategy ``fed_strategy`` names, built from ``config``.

    ``fed_rowwise: True`` turns ``fedavg`` into ``fedavg_rows`` and makes the server optimizers
    and FedProx average per row. A strategy setting the chosen strategy does not read (e.g.
    ``server_momentum`` with ``fedadam``) is an error, not silently ignored.
    """
    name = str(config["fed_strategy"]).lower()
    cls = get_strategy(name)
    external = getattr(config, "external_config_dict", {})
    reads = getattr(cls, "settings", ())
    for key in STRATEGY_SETTINGS:
        if key in external and external[key] is not None and key not in reads:
            readers = sorted(n for n, c in _STRATEGIES.items() if key in getattr(c, "settings", ()))
            raise ValueError(f"{key} is a setting of fed_strategy {readers}; fed_strategy "
                             f"[{name}] does not read it.")
    if _get(config, "fed_rowwise"):
        if cls is FedAvg:
            cls = FedAvgRows
        elif not getattr(cls, "supports_rowwise", False):
            raise ValueError(f"fed_rowwise applies to fedavg, fedavg_rows, fedprox, pfmsmtrec and "
                             f"the server optimizers, not to fed_strategy [{name}].")
    return cls(config)
