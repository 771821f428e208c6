"""Metrics that RecBole 1.2.1 lacks, registered as RecBole metrics (usable in ``metrics``).

``CTRGAUC``: the group AUC of CTR papers (e.g. MKT, DIN): each user's AUC over their labeled
rows, weighted by the user's number of rows (impressions),
``sum_u n_u * AUC_u / sum_u n_u``, skipping users whose rows hold one class only. RecBole's own
``GAUC`` is another metric (a full-ranking metric weighted by positives), hence the name.
"""

import inspect

import numpy as np
from recbole.evaluator import Evaluator as RecBoleEvaluator
from recbole.evaluator import register
from recbole.evaluator.base_metric import LossMetric, TopkMetric
from recbole.utils import EvaluatorType

from recbole_cmr.stats import per_user_auc


def ctr_gauc(preds, trues, users):
    """Impression-weighted mean of per-user AUC (NaN when no user has both classes).

    Args:
        preds, trues, users (np.ndarray): shape ``[N]`` scores, 0/1 labels, user ids.
    """
    auc, impressions = per_user_auc(preds, trues, users)
    if auc.empty:
        return float("nan")
    return float((auc * impressions).sum() / impressions.sum())


class CTRGAUC(LossMetric):
    """Impression-weighted group AUC over labeled rows (see the module docstring)."""

    metric_type = EvaluatorType.VALUE
    metric_need = ["rec.score", "data.label", "data.user"]

    def calculate_metric(self, dataobject):
        preds, trues = self.used_info(dataobject)
        users = dataobject.get("data.user").squeeze(-1).numpy()
        return {"ctrgauc": round(ctr_gauc(preds, trues, users), self.decimal_place)}


def register_metric(metric_class):
    """Make ``metric_class`` a RecBole metric under its lower-cased class name (RecBole's
    registry dicts are updated in place, so its Config, Collector and Evaluator all see it)."""
    name = metric_class.__name__.lower()
    register.metrics_dict[name] = metric_class
    register.metric_information[name] = metric_class.metric_need
    register.metric_types[name] = metric_class.metric_type
    if metric_class.smaller and name not in register.smaller_metrics:
        register.smaller_metrics.append(name)


register_metric(CTRGAUC)


def topk_values(metric, dataobject):
    """A RecBole top-k metric's value per row at ``@1 .. @max(topk)``: ``[n_rows, max(topk)]``
    (its ``metric_info``, which takes the rows' positive counts or not: Hit, MRR and Precision
    do not)."""
    pos_index, pos_len = metric.used_info(dataobject)
    takes_len = len(inspect.signature(metric.metric_info).parameters) > 1
    return metric.metric_info(pos_index, pos_len) if takes_len else metric.metric_info(pos_index)


def per_user_values(metric_class, dataobject):
    """What each evaluated user (row) contributes to the metrics: ``{"user": ids, metric: values}``.

    Ranking: each top-k metric's value per user at every ``topk`` (``ndcg@10``, ``hit@10``, ...:
    RecBole's ``metric_info``, whose mean over users is the reported value). Value metrics (AUC,
    LogLoss, CTRGAUC): each labeled row's ``label`` and ``score``. Other metrics (ItemCoverage,
    GiniIndex, ...) have no per-user value.

    Args:
        metric_class (dict[str, AbstractMetric]): RecBole's Evaluator's metrics by name.
        dataobject (DataStruct): the collected evaluation data (on CPU), with ``data.user``.

    Returns:
        dict: ``user`` (np.ndarray ``[n_rows]``, internal user ids; a sequential model's rows are
        its test interactions, one per user in a leave-one-out split) and float32 ``[n_rows]``
        arrays; ``{}`` when the rows' users were not collected.
    """
    if "data.user" not in dataobject:
        return {}
    values = {"user": dataobject.get("data.user").view(-1).numpy()}
    for name, metric in metric_class.items():
        if isinstance(metric, TopkMetric):
            per_k = topk_values(metric, dataobject)
            values.update((f"{name}@{k}", per_k[:, k - 1].astype(np.float32)) for k in metric.topk)
        elif isinstance(metric, LossMetric) and "label" not in values:
            score, label = metric.used_info(dataobject)
            values.update(label=label.astype(np.float32), score=score.astype(np.float32))
    rows = len(values["user"])
    return values if all(len(v) == rows for v in values.values()) else {}


class Evaluator(RecBoleEvaluator):
    """RecBole's Evaluator, keeping :func:`per_user_values` of its last evaluation in
    ``last_per_user`` (RecBole's result dict is unchanged)."""

    last_per_user = {}

    def evaluate(self, dataobject):
        result = super().evaluate(dataobject)
        self.last_per_user = per_user_values(self.metric_class, dataobject)
        return result
