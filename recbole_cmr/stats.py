"""Paired bootstrap confidence intervals for "A vs B" targets, and their verdicts.

Contract:

* Units are users for ranking metrics (one value per user, e.g. NDCG@10) and test rows for AUC
  (label, score of A, score of B). A and B are always evaluated on the same units; ``pair_by_unit``
  aligns two runs and refuses to drop a unit either run lacks.
* Seeds are pooled by ``pool_seeds``: seed ``s`` of A is paired with seed ``s`` of B and the seeds
  are stacked on a leading axis, ``(S, n)``. A method's metric is then the mean over seeds of its
  metric on the (resampled) units: for a per-user metric this is the mean over users of each
  user's mean over seeds, for AUC the mean over seeds of each seed's AUC. Users (rows) are
  resampled once for all seeds, so a user's seeds move together; the interval is over users given
  these seeds (seed noise enters only through the values averaged).
* Strata (markets, scenarios) are resampled within themselves, each stratum's metric is computed
  per method and the strata are averaged with equal weight, as the macro is; the target's
  statistic is then ``macro(A) - macro(B)`` or ``macro(A) / macro(B)``.
* ``verdict``: **met** only when the whole interval is on the better side of the threshold (0 for
  a difference, e.g. 1.10 for a ratio), **missed** when it is wholly on the worse side, **level**
  otherwise (it straddles or touches the threshold).

The resampling is ``scipy.stats.bootstrap``. With ``paired=True`` scipy resamples
``arange(n)`` and indexes every sample with it; here the index arrays are passed directly, one
per stratum and unpaired, so scipy resamples each stratum's users independently and within the
stratum, while A and B of one user stay paired because both are read through the same index. With
one stratum this is exactly ``bootstrap((a, b), paired=True)`` (tested, same draws, same interval).
"""

import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

CONTRASTS = ("difference", "ratio")
METHOD = "BCa"
# Elements one batch of resamples (or jackknife samples) may index at once: bounds the memory.
BATCH_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PairedDifference:
    """A paired comparison of A against B.

    Attributes:
        diff (float): ``macro(A) - macro(B)``, or ``macro(A) / macro(B)`` for a ratio.
        ci_low (float): lower end of the confidence interval of ``diff``.
        ci_high (float): upper end.
        n (int): units resampled (users or rows, all strata together).
        method (str): ``"BCa"``; ``"percentile"`` where BCa could not be computed;
            ``"degenerate"`` where every resample gave the same value (interval = ``diff``).
    """

    diff: float
    ci_low: float
    ci_high: float
    n: int
    method: str

    def to_dict(self):
        """The fields as a JSON-ready dict."""
        return asdict(self)


def verdict(ci_low, ci_high, threshold=0.0, bigger_is_better=True):
    """``"met"``, ``"level"`` or ``"missed"`` for a target read through its confidence interval.

    Args:
        ci_low (float): lower end of the interval.
        ci_high (float): upper end.
        threshold (float): the value the target must beat: 0 for "A above B", 1.10 for
            "A >= 1.10 x B".
        bigger_is_better (bool): False where A must be below the threshold (a loss, a wall time).

    Returns:
        str: "met" when the whole interval is strictly on the better side of ``threshold``,
        "missed" when it is strictly on the worse side, "level" when it straddles or touches it.
    """
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)) or ci_low > ci_high:
        raise ValueError(f"verdict needs a finite interval with ci_low <= ci_high, got "
                         f"[{ci_low}, {ci_high}]")
    above, below = ci_low > threshold, ci_high < threshold
    better, worse = (above, below) if bigger_is_better else (below, above)
    return "met" if better else "missed" if worse else "level"


def pair_by_unit(units_a, values_a, units_b, values_b):
    """Align two runs' per-unit values on their units.

    Runs listing the same units in the same order are paired position by position (so rows may
    repeat a user token); otherwise every token must be unique in each run and B is reordered to
    A's order. Both runs must hold exactly the same units: none is ever dropped.

    Args:
        units_a (array-like): A's unit tokens, shape ``(n,)``.
        values_a (array-like): A's values, shape ``(..., n)`` (last axis: units).
        units_b (array-like): B's unit tokens, shape ``(n,)``.
        values_b (array-like): B's values, shape ``(..., n)``.

    Returns:
        tuple: ``(units, a, b)``: tokens ``(n,)`` in A's order, ``a`` and ``b`` with their last
        axis in that order.
    """
    units_a, units_b = np.asarray(units_a), np.asarray(units_b)
    values_a, values_b = np.asarray(values_a), np.asarray(values_b)
    for name, units, values in (("A", units_a, values_a), ("B", units_b, values_b)):
        if values.shape[-1:] != units.shape:
            raise ValueError(f"run {name} has {units.shape[0]} units but values of shape "
                             f"{values.shape}: the last axis must hold one value per unit")
    if units_a.shape == units_b.shape and np.array_equal(units_a, units_b):
        return units_a, values_a, values_b
    for name, units in (("A", units_a), ("B", units_b)):
        tokens, counts = np.unique(units, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"run {name} repeats units {_some(tokens[counts > 1])} and the two "
                             "runs do not list their units in the same order: cannot pair them")
    only_a, only_b = np.setdiff1d(units_a, units_b), np.setdiff1d(units_b, units_a)
    if only_a.size or only_b.size:
        raise ValueError(f"the runs hold different units: {only_a.size} only in A "
                         f"{_some(only_a)}, {only_b.size} only in B {_some(only_b)}; compare runs "
                         "evaluated on the same users (rows)")
    order_b = np.argsort(units_b)
    position_b = order_b[np.searchsorted(units_b, units_a, sorter=order_b)]
    return units_a, values_a, values_b[..., position_b]


def _some(tokens, shown=5):
    """A short listing of ``tokens`` for an error message."""
    listed = ", ".join(str(token) for token in tokens[:shown])
    return f"[{listed}{', ...' if len(tokens) > shown else ''}]"


def pool_seeds(runs_a, runs_b):
    """Pair several seeds of A with the same seeds of B and stack them on a leading seed axis.

    Args:
        runs_a (Mapping): seed -> ``(units, values)`` of A, values ``(..., n)`` as in
            ``pair_by_unit`` (for AUC rows: ``np.stack([labels, scores])``, shape ``(2, n)``).
        runs_b (Mapping): the same seeds -> ``(units, values)`` of B.

    Returns:
        tuple: ``(units, a, b)``: tokens ``(n,)`` in the order of A's first seed, ``a`` and ``b``
        of shape ``(S, ..., n)`` with seeds in sorted order.
    """
    seeds = sorted(runs_a)
    if not seeds or set(seeds) != set(runs_b):
        raise ValueError(f"seeds must pair one to one: A ran {sorted(runs_a)}, B ran "
                         f"{sorted(runs_b)}; compare on the seeds both ran")
    units = np.asarray(runs_a[seeds[0]][0])
    stacked_a, stacked_b = [], []
    for seed in seeds:
        stacked_a.append(_on_units(units, runs_a[seed], f"A seed {seed}"))
        stacked_b.append(_on_units(units, runs_b[seed], f"B seed {seed}"))
    return units, np.stack(stacked_a), np.stack(stacked_b)


def _on_units(units, run, name):
    """``run``'s values reordered onto ``units``; errors name the run (``"B seed 2021"``)."""
    try:
        return pair_by_unit(units, np.empty((0, len(units))), *run)[2]
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def split_rows(a, b):
    """Labels and scores of pooled AUC rows, checking every run labelled the rows alike.

    Args:
        a (np.ndarray): A's rows from ``pool_seeds``, shape ``(S, 2, n)``: labels, then scores.
        b (np.ndarray): B's rows, same shape.

    Returns:
        tuple: ``(labels (n,), scores_a (S, n), scores_b (S, n))`` for ``auc_difference``.
    """
    labels = a[0, 0]
    for name, rows in (("A", a), ("B", b)):
        differs = (rows[:, 0] != labels).any(axis=0)
        if differs.any():
            raise ValueError(f"run {name} labels {int(differs.sum())} rows differently from A's "
                             f"first seed (first at row {int(np.argmax(differs))}): the runs did "
                             "not score the same test rows")
    return labels, a[:, 1], b[:, 1]


def paired_difference(a, b, *, contrast="difference", confidence=0.95, n_resamples=9999,
                      seed=0):
    """Paired bootstrap interval of ``mean(A) - mean(B)`` (or ``/``) over users.

    Args:
        a (array-like): A's per-user values, shape ``(n,)``, or ``(S, n)`` with seeds pooled.
        b (array-like): B's values on the same users, same shape.
        contrast (str): "difference" or "ratio".
        confidence (float): confidence level of the two-sided interval.
        n_resamples (int): bootstrap resamples.
        seed (int): seed of the resampling.

    Returns:
        PairedDifference
    """
    return macro_paired_difference({"all": (a, b)}, contrast=contrast, confidence=confidence,
                                   n_resamples=n_resamples, seed=seed)


def macro_paired_difference(markets, *, contrast="difference", confidence=0.95,
                            n_resamples=9999, seed=0):
    """Paired bootstrap interval of ``macro(A) - macro(B)`` (or ``/``): users are resampled within
    each market and the markets are averaged with equal weight, as the macro is.

    Args:
        markets (Mapping): market -> ``(a, b)``, each ``(n_m,)`` or ``(S, n_m)`` (seeds pooled).
        contrast, confidence, n_resamples, seed: as in ``paired_difference``.

    Returns:
        PairedDifference
    """
    strata = {}
    for market, (a, b) in markets.items():
        a, b = _user_stratum(market, a, b)
        # A user's mean over seeds first: the metric is linear, so this is exact and resampling
        # reads one value per user instead of one per (seed, user).
        strata[market] = (a.shape[-1], 1, (a.mean(axis=0, keepdims=True),
                                           b.mean(axis=0, keepdims=True)))
    return _stratified(strata, _mean_metric, contrast, confidence, n_resamples, seed)


def _user_stratum(market, a, b):
    """``(a, b)`` of one market as float arrays ``(S, n)``, checked to be paired."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"market {market}: A's values {a.shape} and B's {b.shape} must have the "
                         "same shape (n,) or (seeds, n); align them with pair_by_unit/pool_seeds")
    return a, b


def _mean_metric(stratum, index):
    """Each method's mean over seeds and resampled users.

    Args:
        stratum (tuple): ``(a, b)``, each of shape ``(S, n)``.
        index (np.ndarray): positions of the resampled users, shape ``(..., m)``.

    Returns:
        tuple: two arrays of shape ``(...)``.
    """
    return tuple(values[..., index].mean(axis=(0, -1)) for values in stratum)


def auc_difference(labels, scores_a, scores_b, *, contrast="difference", confidence=0.95,
                   n_resamples=9999, seed=0):
    """Paired bootstrap interval of ``AUC(A) - AUC(B)`` (or ``/``) over test rows.

    Args:
        labels (array-like): 0/1 labels, shape ``(n,)``.
        scores_a (array-like): A's scores, shape ``(n,)``, or ``(S, n)`` with seeds pooled.
        scores_b (array-like): B's scores on the same rows, same shape.
        contrast, confidence, n_resamples, seed: as in ``paired_difference``.

    Returns:
        PairedDifference
    """
    return macro_auc_difference({"all": (labels, scores_a, scores_b)}, contrast=contrast,
                                confidence=confidence, n_resamples=n_resamples, seed=seed)


def macro_auc_difference(strata, *, contrast="difference", confidence=0.95, n_resamples=9999,
                         seed=0):
    """As ``auc_difference``, rows resampled within each stratum (scenario), strata averaged
    with equal weight.

    Args:
        strata (Mapping): name -> ``(labels, scores_a, scores_b)`` as in ``auc_difference``, or a
            list of such triples over the same rows, one per task: the stratum's AUC is then the
            mean over its tasks (a multi-task model's macro AUC), and a resample draws the rows
            once for every task.
        contrast, confidence, n_resamples, seed: as in ``paired_difference``.

    Returns:
        PairedDifference
    """
    rows = {name: _row_stratum(name, arrays) for name, arrays in strata.items()}
    return _stratified(rows, _auc_metric, contrast, confidence, n_resamples, seed)


def _row_stratum(name, arrays):
    """One stratum's rows, checked: ``(n, S, (n, tasks))`` for ``_stratified``; ``tasks`` holds per
    task ``(positives, ranked_a, ranked_b)`` (:func:`_task_rows`)."""
    tasks = [arrays] if isinstance(arrays, tuple) else list(arrays)
    checked = [_task_rows(name, *task) for task in tasks]
    sizes = {(n, seeds) for n, seeds, _ in checked}
    if len(sizes) != 1:
        raise ValueError(f"stratum {name}: its tasks hold different rows or seeds {sorted(sizes)}; "
                         "a stratum's tasks must score the same rows")
    (n, seeds), = sizes
    return n, seeds, (n, [rows for _, _, rows in checked])


def _task_rows(name, labels, scores_a, scores_b):
    """``(n, S, (positives, ranked_a, ranked_b))`` of one task of a stratum, checked: the
    positive rows ``(P,)`` and per method a list over seeds of :class:`_Ranked`."""
    labels = np.asarray(labels)
    scores_a, scores_b = _user_stratum(name, scores_a, scores_b)
    if labels.shape != scores_a.shape[-1:] or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"stratum {name}: labels must be 0/1 with one per row "
                         f"({scores_a.shape[-1]} rows), got shape {labels.shape}")
    if labels.min() == labels.max():
        raise ValueError(f"stratum {name}: every row has label {labels[0]}; AUC needs both classes")
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    ranked = tuple([_rank(scores, positives, negatives) for scores in method]
                   for method in (scores_a, scores_b))
    return labels.size, scores_a.shape[0], (positives, *ranked)


def macro_gauc_difference(strata, *, contrast="difference", confidence=0.95, n_resamples=9999,
                          seed=0):
    """Paired bootstrap interval of the group AUC (``CTRGAUC``: each user's AUC weighted by the
    user's rows) of A against B: users are resampled within each stratum, strata averaged with
    equal weight. Users whose rows hold one class only have no AUC and are left out, as the
    metric leaves them out.

    Args:
        strata (Mapping): name -> ``(users, labels, scores_a, scores_b)``: the rows' user tokens
            and 0/1 labels ``(n,)``, each method's scores ``(n,)`` or ``(S, n)`` (seeds pooled).
        contrast, confidence, n_resamples, seed: as in ``paired_difference``.

    Returns:
        PairedDifference (``n``: users with an AUC)
    """
    users_of = {name: _user_aucs(name, *arrays) for name, arrays in strata.items()}
    return _stratified(users_of, _gauc_metric, contrast, confidence, n_resamples, seed)


def _user_aucs(name, users, labels, scores_a, scores_b):
    """``(U, S, (auc_a (S, U), auc_b (S, U), impressions (U,)))`` of one stratum."""
    users, labels = np.asarray(users), np.asarray(labels)
    scores_a, scores_b = _user_stratum(name, scores_a, scores_b)
    if users.shape != labels.shape or labels.shape != scores_a.shape[-1:]:
        raise ValueError(f"stratum {name}: users {users.shape}, labels {labels.shape} and scores "
                         f"{scores_a.shape} must hold one value per row")
    aucs = [[per_user_auc(seed, labels, users) for seed in scores] for scores in (scores_a, scores_b)]
    impressions = aucs[0][0][1]
    if impressions.empty:
        raise ValueError(f"stratum {name}: no user has rows of both classes; group AUC is undefined")
    values = tuple(np.stack([auc.to_numpy() for auc, _ in method]) for method in aucs)
    return impressions.size, scores_a.shape[0], (*values, impressions.to_numpy(dtype=float))


def per_user_auc(preds, trues, users):
    """Each user's AUC over their rows (ties count one half) and number of rows, for the users
    whose rows hold both classes.

    Args:
        preds, trues, users (np.ndarray): shape ``[N]`` scores, 0/1 labels, user ids.

    Returns:
        tuple: ``(auc, impressions)``, two ``pd.Series`` indexed by user (sorted), shape ``[U]``.
    """
    frame = pd.DataFrame({"user": users, "label": trues.astype(np.float64),
                          "rank": pd.Series(preds).groupby(users).rank(method="average").to_numpy()})
    per_user = frame.groupby("user").agg(n=("label", "size"), pos=("label", "sum"))
    per_user["rank_pos"] = frame[frame["label"] == 1].groupby("user")["rank"].sum()
    per_user = per_user[(per_user["pos"] > 0) & (per_user["pos"] < per_user["n"])]
    neg = per_user["n"] - per_user["pos"]
    auc = (per_user["rank_pos"] - per_user["pos"] * (per_user["pos"] + 1) / 2) / (per_user["pos"] * neg)
    return auc, per_user["n"]


def _gauc_metric(stratum, index):
    """Each method's mean over seeds of its impression-weighted user AUC on resampled users.

    Args:
        stratum (tuple): ``(auc_a (S, U), auc_b (S, U), impressions (U,))``.
        index (np.ndarray): positions of the resampled users, shape ``(..., m)``.

    Returns:
        tuple: two arrays of shape ``(...)``.
    """
    auc_a, auc_b, impressions = stratum
    weights = impressions[index]
    return tuple(((auc[:, index] * weights).sum(axis=-1) / weights.sum(axis=-1)).mean(axis=0)
                 for auc in (auc_a, auc_b))


class _Ranked(NamedTuple):
    """One seed's scores of one task, ranked once (``P`` positive rows, ``N`` negative rows).

    Attributes:
        negatives (np.ndarray): ``(N,)`` the negative rows in ascending order of score.
        below (np.ndarray): ``(P,)`` negatives scored strictly below each positive.
        tied (np.ndarray): ``(T,)`` the positives (positions in ``positives``) tied with some
            negative.
        tied_through (np.ndarray): ``(T,)`` negatives scored at most as high as each of those.
        auc (float): the AUC of all rows (ties count one half).
        left_out (np.ndarray): ``(n,)`` the AUC of the other rows, for each row (NaN where they
            hold one class only): the jackknife BCa needs.
    """

    negatives: np.ndarray
    below: np.ndarray
    tied: np.ndarray
    tied_through: np.ndarray
    auc: float
    left_out: np.ndarray


def _rank(scores, positives, negatives):
    """:class:`_Ranked` of ``scores`` ``(n,)`` for the rows ``positives`` ``(P,)`` and
    ``negatives`` ``(N,)``.

    With the Mann-Whitney count ``U`` (over positives, the negatives ranked below, half the tied
    ones), leaving out a positive removes its own term and leaving out a negative the positives
    ranked above it (half the tied ones): every leave-one-out AUC in ``O(n log n)``, where
    recounting each would be quadratic in the rows.
    """
    negatives = negatives[np.argsort(scores[negatives], kind="stable")]
    positive_scores, negative_scores = scores[positives], scores[negatives]
    below = np.searchsorted(negative_scores, positive_scores, side="left")
    through = np.searchsorted(negative_scores, positive_scores, side="right")
    ranked_positives = np.sort(positive_scores)
    positives_below = np.searchsorted(ranked_positives, negative_scores, side="left")
    positives_through = np.searchsorted(ranked_positives, negative_scores, side="right")
    n_pos, n_neg = positives.size, negatives.size
    twice_u = int(below.sum() + through.sum())
    left_out = np.empty(scores.shape[-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        left_out[positives] = (twice_u - below - through) / (2 * (n_pos - 1) * n_neg)
        left_out[negatives] = ((twice_u - (2 * n_pos - positives_below - positives_through))
                               / (2 * n_pos * (n_neg - 1)))
    tied = np.flatnonzero(through > below)
    return _Ranked(negatives, below, tied, through[tied], twice_u / (2 * n_pos * n_neg), left_out)


def _auc_metric(stratum, index):
    """Each method's mean over tasks and seeds of its AUC on the resampled rows.

    A resample is the original rows with multiplicities, so its AUC is the weighted Mann-Whitney
    statistic over rows ranked once (:func:`_weighted_auc`): ties count one half, as in
    ``sklearn.metrics.roc_auc_score``, linear in the rows per resample. The rows themselves and
    leave-one-out samples (BCa's jackknife: ``n`` samples, during which every other stratum is
    read whole once per sample) are looked up in :class:`_Ranked` instead: weighting them would
    make the jackknife quadratic in the rows (hours on strata of 10^4-10^5 rows).

    Args:
        stratum (tuple): ``(n, tasks)`` from ``_row_stratum``.
        index (np.ndarray): positions of the resampled rows, shape ``(..., m)``.

    Returns:
        tuple: two arrays of shape ``(...)``; NaN where a resample holds one class only.
    """
    n, tasks = stratum
    flat = index.reshape(-1, index.shape[-1])
    for_task = _exact_auc(flat, n) or _resampled_auc(flat, n)
    values = ([], [])
    for positives, *methods in tasks:
        auc_of = for_task(positives)
        for method, seeds in zip(values, methods):
            method.extend(auc_of(ranked) for ranked in seeds)
    return tuple(np.mean(method, axis=0).reshape(index.shape[:-1]) for method in values)


def _exact_auc(flat, n):
    """For rows ``flat`` (``(R, m)`` positions) that are all ``n`` rows or all but one each
    (strictly increasing, ``m >= n - 1``): ``positives -> ranked -> (R,)`` AUCs; else None."""
    # A broadcast view (the other strata during a stratum's jackknife) repeats its first row.
    rows = flat[:1] if flat.strides[0] == 0 else flat
    if flat.shape[-1] < n - 1 or not (rows[:, 1:] > rows[:, :-1]).all():
        return None
    if flat.shape[-1] == n:
        return lambda positives: lambda ranked: np.full(flat.shape[0], ranked.auc)
    left_out = n * (n - 1) // 2 - flat.sum(axis=-1)  # the one position each row lacks
    return lambda positives: lambda ranked: ranked.left_out[left_out]


def _resampled_auc(flat, n):
    """For resamples ``flat`` (``(R, m)`` positions): ``positives -> ranked -> (R,)`` AUCs, rows
    weighted by their multiplicity (the positives' weights and total gathered once per task)."""
    offsets = np.arange(flat.shape[0])[:, None] * n
    counts = np.bincount((flat + offsets).ravel(), minlength=flat.shape[0] * n)
    counts = counts.reshape(flat.shape[0], n).astype(np.int32)

    def for_task(positives):
        weights = counts[:, positives]
        total = weights.sum(axis=-1)
        return lambda ranked: _weighted_auc(counts, weights, total, ranked)
    return for_task


def _weighted_auc(counts, positive_weights, positive_total, ranked):
    """AUC of rows weighted by ``counts``.

    Integer arithmetic throughout (twice the Mann-Whitney count), so the result is the exact
    count divided once.

    Args:
        counts (np.ndarray): ``(R, n)`` multiplicity of each row in each resample.
        positive_weights (np.ndarray): ``(R, P)`` the columns of the task's positive rows.
        positive_total (np.ndarray): ``(R,)`` their sum (the same for every seed and method).
        ranked (_Ranked): the seed's ranking.

    Returns:
        np.ndarray: ``(R,)``; NaN where a resample holds one class only.
    """
    negative = np.zeros((counts.shape[0], ranked.negatives.size + 1), dtype=np.int64)
    np.cumsum(counts[:, ranked.negatives], axis=-1, out=negative[:, 1:])  # weight ranked below
    twice_u = 2 * (positive_weights * negative[:, ranked.below]).sum(axis=-1)
    ties = negative[:, ranked.tied_through] - negative[:, ranked.below[ranked.tied]]
    twice_u += (positive_weights[:, ranked.tied] * ties).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return twice_u / (2 * positive_total * negative[:, -1])


def _stratified(strata, metric, contrast, confidence, n_resamples, seed):
    """Bootstrap the contrast of the strata-averaged ``metric``, each stratum resampled within.

    Args:
        strata (dict): name -> ``(units, seeds, stratum)``: the stratum's unit count, seed count
            and the data ``metric`` reads.
        metric (callable): ``metric(stratum, index)`` -> ``(value_a, value_b)`` for resampled
            unit positions ``index`` of shape ``(..., m)``, each value of shape ``(...)``.
        contrast (str): "difference" or "ratio".
        confidence, n_resamples, seed: as in ``paired_difference``.

    Returns:
        PairedDifference
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if not strata:
        raise ValueError("no market (stratum) to compare")
    arrays = list(strata.values())
    sizes = [units for units, _, _ in arrays]

    def statistic(*indices, axis=-1):
        # indices[k]: (..., n_k) positions into stratum k; every array of the stratum is read
        # through them, so A and B of a unit stay paired.
        values = [metric(stratum, index) for (_, _, stratum), index in zip(arrays, indices)]
        macro_a = np.mean([value_a for value_a, _ in values], axis=0)
        macro_b = np.mean([value_b for _, value_b in values], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return macro_a - macro_b if contrast == "difference" else macro_a / macro_b

    indices = [np.arange(size) for size in sizes]
    diff = float(statistic(*indices))
    if not np.isfinite(diff):
        raise ValueError(f"the {contrast} of the observed data is {diff} (B's macro is 0?)")
    size = sum(2 * units * seeds for units, seeds, _ in arrays)
    options = dict(statistic=statistic, n_resamples=n_resamples, confidence_level=confidence,
                   batch=max(1, BATCH_ELEMENTS // size), rng=np.random.default_rng(seed))
    return _interval(indices, options, diff, strata)


def _interval(indices, options, diff, strata):
    """BCa interval, falling back where BCa is undefined.

    BCa is chosen over the percentile interval because per-user ranking metrics are very skewed
    (most users score 0, a few score near 1) and a ratio is a biased statistic: BCa corrects
    both the median bias and the skew of the bootstrap distribution (second-order accurate),
    the percentile interval neither. BCa is undefined on degenerate data: where every resample
    gives the same value (A and B identical on every unit) the interval is that value
    (method "degenerate"); where only the jackknife acceleration or bias correction cannot be
    computed, the percentile interval of the same resamples is given (method "percentile").
    """
    n = sum(index.size for index in indices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap(indices, method=METHOD, **options)
    resampled = result.bootstrap_distribution
    if not np.isfinite(resampled).all():
        raise ValueError(f"a bootstrap resample has no defined value (strata {list(strata)}): "
                         "a stratum has too few positives or negatives (or B's macro reaches 0)")
    if np.ptp(resampled) == 0:
        return PairedDifference(diff, diff, diff, n, "degenerate")
    low, high = result.confidence_interval
    method = METHOD
    if not (np.isfinite(low) and np.isfinite(high)):
        options = {**options, "n_resamples": 0}
        low, high = stats.bootstrap(indices, method="percentile", bootstrap_result=result,
                                    **options).confidence_interval
        method = "percentile"
    return PairedDifference(diff, float(low), float(high), n, method)
