"""Metrics that RecBole 1.2.1 lacks, registered as RecBole metrics (usable in ``metrics``).

``CTRGAUC``: the group AUC of CTR papers (e.g. MKT, DIN): each user's AUC over their labeled
rows, weighted by the user's number of rows (impressions),
``sum_u n_u * AUC_u / sum_u n_u``, skipping users whose rows hold one class only. RecBole's own
``GAUC`` is another metric (a full-ranking metric weighted by positives), hence the name.
"""

import numpy as np
import pandas as pd
from recbole.evaluator import register
from recbole.evaluator.base_metric import LossMetric
from recbole.utils import EvaluatorType


def ctr_gauc(preds, trues, users):
    """Impression-weighted mean of per-user AUC (NaN when no user has both classes).

    Args:
        preds, trues, users (np.ndarray): shape ``[N]`` scores, 0/1 labels, user ids.
    """
    frame = pd.DataFrame({"user": users, "label": trues.astype(np.float64),
                          "rank": pd.Series(preds).groupby(users).rank(method="average").to_numpy()})
    per_user = frame.groupby("user").agg(n=("label", "size"), pos=("label", "sum"))
    per_user["rank_pos"] = frame[frame["label"] == 1].groupby("user")["rank"].sum()
    per_user = per_user[(per_user["pos"] > 0) & (per_user["pos"] < per_user["n"])]
    if per_user.empty:
        return float("nan")
    neg = per_user["n"] - per_user["pos"]
    auc = (per_user["rank_pos"] - per_user["pos"] * (per_user["pos"] + 1) / 2) / (per_user["pos"] * neg)
    return float((auc * per_user["n"]).sum() / per_user["n"].sum())


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
