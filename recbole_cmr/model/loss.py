"""Losses shared by recbole_cmr models."""

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def semantic_neighbours(text, topk, tau, chunk_size=1024):
    """The ``topk`` semantically nearest items of every item, with softmax weights.

    Args:
        text (torch.Tensor): item text embeddings, shape ``[n_items, d]``; zero rows (padding,
            items without text) get no neighbours and are never anyone's neighbour.
        topk (int): neighbours per item (self excluded).
        tau (float): temperature of ``softmax(cos / tau)`` over the neighbours.

    Returns:
        tuple: ``index [n_items, k]`` (long) and ``weight [n_items, k]`` (rows sum to 1, or to 0
        for items without text).
    """
    has_text = text.norm(dim=1) > 0
    unit = F.normalize(text.float(), dim=1)
    k = min(topk, int(has_text.sum()) - 1)
    index, weight = [], []
    for start in range(0, len(unit), chunk_size):
        sim = unit[start:start + chunk_size] @ unit.T  # [chunk, n_items]
        sim[:, ~has_text] = -float("inf")
        rows = torch.arange(start, start + len(sim))
        sim[torch.arange(len(sim)), rows] = -float("inf")  # self excluded
        top_sim, top_idx = sim.topk(max(k, 1), dim=1)
        w = torch.softmax(top_sim / tau, dim=1)
        w[~has_text[rows]] = 0.0
        index.append(top_idx)
        weight.append(torch.nan_to_num(w, nan=0.0))
    return torch.cat(index), torch.cat(weight)


class S2CELoss(nn.Module):
    """Semantic Soft Cross-Entropy.

    Soft target of item ``y``: ``q = (1 - eps) * onehot(y) + eps * softmax_j(cos(t_y, t_j) / tau)``
    over the ``topk`` semantically nearest items ``j`` of ``y``; loss ``-sum_j q_j log p_j`` with
    ``p = softmax(logits)``. Items without text fall back to plain cross-entropy.

    Args:
        text (torch.Tensor): frozen item text embeddings ``[n_items, d]``.
    """

    def __init__(self, text, eps=0.1, tau=0.05, topk=20):
        super().__init__()
        self.eps = eps
        index, weight = semantic_neighbours(text, topk, tau)
        self.register_buffer("neighbour_index", index, persistent=False)
        self.register_buffer("neighbour_weight", weight, persistent=False)

    def forward(self, logits, target):
        """``logits [B, n_items]``, ``target [B]`` -> scalar loss."""
        log_p = torch.log_softmax(logits, dim=1)
        hard = -log_p.gather(1, target.unsqueeze(1)).squeeze(1)  # [B]
        weight = self.neighbour_weight[target]  # [B, k]
        soft = -(weight * log_p.gather(1, self.neighbour_index[target])).sum(1)  # [B]
        eps = self.eps * (weight.sum(1) > 0).to(logits.dtype)  # no text: hard target only
        return ((1 - eps) * hard + eps * soft).mean()
