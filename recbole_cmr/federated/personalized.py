"""PF-MSMTrec's server side: conflict-averse, personalized aggregation of experts and towers.

A *personalized* strategy (``personalized = True``) sees the global parameters and each selected
client's own start (``configure_round(round, global_params, {client_id: params})``) and returns
``aggregate -> (uniform, {client_id: own})``: the new global value of what it aggregates alike for
all clients, and each selected client's own value of what it personalizes. The server keeps the
two apart, so every client (selected or not) starts a round from the current global values of the
uniform part, and a client's personalized part changes only in the rounds it trains; on Flower
each node gets its own ``FitIns``.

Rules (METHODS.md §4, FedHCA²'s, in float64), per round, with ``Δ_i = update_i - start_i``:

* every *expert network* (names grouped by the regex ``pf_expert_group``, one group per expert):
  ``G = [Δ_1 .. Δ_N]``; conflict-averse direction (``conflict_averse``)
  ``Δ_ca = (g0 + c / ||G w|| · G w) / (1 + α²)`` with ``g0 = mean_i Δ_i``, ``A = G Gᵀ``,
  ``c = α · sqrt(mean(A))`` and ``w`` on the simplex minimising ``wᵀ A 1/N + c sqrt(wᵀ A w)``
  (``scipy.optimize``); without it ``Δ_ca = g0``. Personalized (``personalized_experts``):
  ``θ_i = start_i + Δ_i + clamp(a_i, 0, 1) · Δ_ca``; else all get the global ``θ + Δ_ca``.
* every *tower layer* (regex ``pf_tower_layer``), personalized (``personalized_towers``):
  ``Δ_i' = Δ_i + clamp(b_i, 0, 1) · softmax(Δ_i Δ_allᵀ / √d) Δ_all``, ``θ_i = start_i + Δ_i'``;
  else all get the global ``θ + Σ_i n_i Δ_i / Σ_i n_i`` (FedAvg).
* everything else (embeddings, gates, BN statistics, integer counters): FedAvg (per row with
  ``fed_rowwise``) of the values, from the global values.
* uniform: everything else, and the experts / towers when not personalized; personal: the
  experts (``personalized_experts``) and tower layers (``personalized_towers``).
* ``a_i`` / ``b_i`` (one per client and expert / tower layer, init ``pf_weight_init``) learn
  from the next round: the client's new update is the negative gradient of its loss at the
  aggregated point, so ``∂L/∂a_i ≈ -Δ_i^{next} · d_i`` for the direction ``d_i`` that ``a_i``
  scaled; SGD (``pf_weight_lr``, momentum ``pf_weight_momentum``), then clamped to [0, 1].
"""

import re

import numpy as np
import torch
from scipy.optimize import minimize

from recbole_cmr.federated.strategy import (
    FedAvg,
    FedAvgRows,
    Strategy,
    _get,
    cast_like,
    check_results,
    example_weights,
    register_strategy,
)
from recbole_cmr.utils import check_patterns, user_set

DEFAULTS = {
    "conflict_averse": True, "ca_alpha": 0.4, "personalized_experts": True,
    "personalized_towers": True, "pf_weight_init": 0.1, "pf_weight_lr": 0.01,
    "pf_weight_momentum": 0.9, "pf_expert_group": r"experts\.[^.]+\.\d+",
    "pf_tower_layer": r"towers\.\d+\.[^.]+",
}


def simplex_weights(A, c):
    """``w`` on the simplex minimising ``wᵀ A 1/N + c sqrt(wᵀ A w)`` (SLSQP from uniform).

    Args:
        A (np.ndarray): ``[N, N]`` Gram matrix of the client updates.
        c (float): ``α · ||g0||``.

    Returns:
        np.ndarray: ``[N]``, non-negative, sums to 1.
    """
    n = len(A)
    mean_col = A.mean(1)  # A 1/N

    def objective(w):
        return float(w @ mean_col + c * np.sqrt(max(w @ A @ w, 1e-30)))

    result = minimize(objective, np.full(n, 1.0 / n), method="SLSQP", bounds=[(0.0, 1.0)] * n,
                      constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},),
                      options={"ftol": 1e-12, "maxiter": 200})
    w = np.clip(result.x, 0.0, None)
    return w / w.sum()


def conflict_averse_direction(G, alpha):
    """The conflict-averse update of one expert network.

    Args:
        G (Tensor): ``[N, d]`` float64, one row per client update.
        alpha (float): ``α_c``; 0 gives the mean update.

    Returns:
        Tensor: ``[d]`` float64.
    """
    g0 = G.mean(0)
    if alpha == 0:
        return g0
    A = (G @ G.T).cpu().numpy()  # [N, N]: SLSQP solves for w on the CPU
    c = alpha * float(np.sqrt(max(A.mean(), 0.0)))
    w = torch.from_numpy(simplex_weights(A, c)).to(G)  # [N], on G's device
    gw = w @ G
    norm = float(gw.norm())
    if norm == 0.0:
        return g0 / (1 + alpha ** 2)
    return (g0 + (c / norm) * gw) / (1 + alpha ** 2)


def tower_attention(G):
    """Each client's attention-weighted mix of all updates of one layer: ``softmax(G_i Gᵀ/√d) G``.

    Args:
        G (Tensor): ``[N, d]`` float64.

    Returns:
        Tensor: ``[N, d]``.
    """
    scores = (G @ G.T) / np.sqrt(G.shape[1])
    return torch.softmax(scores, dim=1) @ G


def _cosines(G):
    """``[N, N]`` cosine similarity of the rows of ``G`` (``[N, d]``); 0 against a zero row."""
    norms = G.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, G / norms.clamp_min(1e-300), torch.zeros_like(G))
    return unit @ unit.T


def group_names(names, pattern):
    """``{prefix: [names]}`` of the names whose start matches the regex ``pattern``."""
    groups = {}
    for name in names:
        match = re.match(pattern, name)
        if match:
            groups.setdefault(match.group(0), []).append(name)
    return groups


def starting_with(names, patterns):
    """The ``names`` whose start matches one of the regexes ``patterns`` (as :func:`group_names`)."""
    return [n for n in names if any(re.match(p, n) for p in patterns)]


def _flat(tensors, names):
    """``names``' tensors of ``tensors`` flattened into one float64 vector ``[d]``."""
    return torch.cat([tensors[n].reshape(-1).double() for n in names])


def _unflat(vector, names, like):
    """``{name: tensor}`` cut from ``vector`` in ``names`` order, shapes and dtypes of ``like``."""
    out, at = {}, 0
    for name in names:
        size = like[name].numel()
        out[name] = cast_like(vector[at:at + size].reshape(like[name].shape), like[name].dtype)
        at += size
    return out


@register_strategy("pfmsmtrec")
class PersonalizedConflictAverse(Strategy):
    """PF-MSMTrec's aggregation (see the module docstring); settings in PFMSMTrec.yaml."""

    personalized = True
    supports_rowwise = True  # the FedAvg'd rest (embeddings) per row with fed_rowwise
    settings = tuple(DEFAULTS)

    def __init__(self, config=None):
        super().__init__(config)
        for key, default in DEFAULTS.items():
            value = _get(config, key)
            setattr(self, key, default if value is None else value)
        self.ca_alpha = float(self.ca_alpha) if self.conflict_averse else 0.0
        self.average = FedAvgRows(config) if _get(config, "fed_rowwise") else FedAvg(config)
        self.current, self.starts = None, None
        self.weights, self.momentum, self.directions = {}, {}, {}

    def check_names(self, names):
        """``pf_expert_group`` and ``pf_tower_layer`` must each start some shared name
        (:func:`~recbole_cmr.utils.check_patterns`; strictly when the user set them)."""
        for key in ("pf_expert_group", "pf_tower_layer"):
            check_patterns(names, [getattr(self, key)], key, select=starting_with,
                           strict=user_set(self.config, key))

    def configure_round(self, round, global_params, starts=None):
        """Remember this round's global parameters and the selected clients' starts.

        Args:
            round (int): 0-based round index.
            global_params (dict[str, Tensor]): the global shared parameters (the reference of
                what is aggregated alike for all, e.g. the rows ``fed_rowwise`` compares to).
            starts (dict[str, dict[str, Tensor]]): each selected client's start:
                ``global_params`` with its own values of the personalized parameters.
        """
        self.current, self.starts = global_params, starts

    # ---- the learnable per-client weights --------------------------------------------------
    def weight(self, cid, group):
        """``clamp(a, 0, 1)`` of client ``cid`` for ``group`` (created at ``pf_weight_init``)."""
        return self.weights.setdefault(cid, {}).setdefault(group, float(self.pf_weight_init))

    def _learn_weights(self, cid, delta):
        """One momentum-SGD step on each of ``cid``'s weights from its new update ``delta``."""
        for group, (names, direction) in self.directions.get(cid, {}).items():
            if not all(n in delta for n in names):
                continue
            grad = -float(_flat(delta, names) @ direction)
            buf = self.pf_weight_momentum * self.momentum.setdefault(cid, {}).get(group, 0.0) + grad
            self.momentum[cid][group] = buf
            self.weights[cid][group] = min(1.0, max(0.0, self.weight(cid, group) - self.pf_weight_lr * buf))

    # ---- aggregation -----------------------------------------------------------------------
    def aggregate(self, round, results):
        """Returns: ``(uniform, {client_id: own})`` (see the module docstring)."""
        names = check_results(round, results)
        if self.starts is None:
            raise RuntimeError("pfmsmtrec needs the global parameters and each client's start: "
                               "call configure_round(round, global_params, starts) first.")
        cids = [cid for cid, _, _ in results]
        starts = {cid: self.starts[cid] for cid in cids}
        float_names = [n for n in names if results[0][1][n].is_floating_point()
                       and "running_" not in n]
        delta = {cid: {n: update[n].double() - starts[cid][n].double() for n in float_names}
                 for cid, update, _ in results}
        for cid in cids:
            self._learn_weights(cid, delta[cid])
        experts = group_names(float_names, self.pf_expert_group)
        towers = group_names([n for n in float_names if not any(n in g for g in experts.values())],
                             self.pf_tower_layer)
        grouped = {n for g in (*experts.values(), *towers.values()) for n in g}
        rest = [n for n in names if n not in grouped]
        uniform, own = {}, {cid: {} for cid in cids}
        if rest:
            self.average.configure_round(round, {n: self.current[n] for n in rest})
            uniform.update(self.average.aggregate(
                round, [(cid, {n: u[n] for n in rest}, k) for cid, u, k in results]))
        G = {group: torch.stack([_flat(delta[cid], group_names_) for cid in cids])  # [N, d]
             for group, group_names_ in (*experts.items(), *towers.items())}
        for group, group_names_ in experts.items():
            direction = conflict_averse_direction(G[group], self.ca_alpha)  # [d]
            self._apply(group, group_names_, G[group], direction, starts, uniform, own,
                        self.personalized_experts)
        self.report = self._report(cids, G, experts, towers)
        counts = [k for _, _, k in results]
        for group, group_names_ in towers.items():
            if self.personalized_towers:
                direction = tower_attention(G[group])  # [N, d], one per client
            else:
                direction = sum(w * g for w, g in zip(example_weights(counts), G[group]))  # [d]
            self._apply(group, group_names_, G[group], direction, starts, uniform, own,
                        self.personalized_towers)
        return uniform, own

    def _report(self, cids, G, experts, towers):
        """The round's conflict measurements, before the weights move: the pairwise cosine of
        the clients' expert updates (mean over the expert networks, and per network the mean
        over client pairs) and each client's mean ``a_i`` (experts) and ``b_i`` (towers).

        Args:
            cids (list[str]): the clients, in ``G``'s row order.
            G (dict[str, Tensor]): per group ``[N, d]`` float64 updates.
        """
        cosines = {group: _cosines(G[group]).cpu() for group in experts}  # each [N, N], on the CPU
        pairs = ~torch.eye(len(cids), dtype=torch.bool)
        report = {"clients": list(cids)}
        if cosines:
            report["expert_cosine"] = torch.stack(list(cosines.values())).mean(0).tolist()
            report["expert_cosine_by_group"] = {
                group: float(c[pairs].mean()) if len(cids) > 1 else 1.0 for group, c in cosines.items()}
        for key, groups in (("a", experts), ("b", towers)):
            if groups:
                report[key] = {cid: float(np.mean([self.weight(cid, g) for g in groups]))
                               for cid in cids}
        return report

    def round_report(self):
        return getattr(self, "report", {})

    def _apply(self, group, names, G, direction, starts, uniform, own, personalized):
        """One group's new values. Personalized: client i's own ``start_i + Δ_i + clamp(w_i) ·
        d_i`` (``d_i``: row i of a ``[N, d]`` ``direction``, else the ``[d]`` direction), and
        ``d_i`` is what its weight learns from next round. Else: the global ``current +
        direction`` for every client.

        Args:
            G (Tensor): ``[N, d]`` float64, the clients' updates of the group (``own`` order).
            direction (Tensor): ``[d]`` or ``[N, d]`` float64.
        """
        if not personalized:
            uniform.update(_unflat(_flat(self.current, names) + direction, names, self.current))
            return
        for i, cid in enumerate(own):
            d = direction[i] if direction.dim() == 2 else direction
            vector = _flat(starts[cid], names) + G[i] + self.weight(cid, group) * d
            self.directions.setdefault(cid, {})[group] = (names, d)
            own[cid].update(_unflat(vector, names, starts[cid]))

    # ---- state across rounds (saved in round checkpoints) ----------------------------------
    def state_dict(self):
        return {"weights": self.weights, "momentum": self.momentum,
                "directions": {cid: {g: {"names": names, "direction": d}
                                     for g, (names, d) in groups.items()}
                               for cid, groups in self.directions.items()}}

    def load_state_dict(self, state):
        self.weights = {cid: dict(w) for cid, w in state.get("weights", {}).items()}
        self.momentum = {cid: dict(m) for cid, m in state.get("momentum", {}).items()}
        self.directions = {cid: {g: (list(v["names"]), v["direction"]) for g, v in groups.items()}
                           for cid, groups in state.get("directions", {}).items()}
