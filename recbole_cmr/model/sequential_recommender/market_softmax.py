"""Market softmax: train a SASRec-style model's softmax over its own market's items only.

With RecBole's CE loss every item of the shared vocabulary is a negative in every market, so a
market pushes down (and, in federated training, sends updates for) the embeddings of items it does
not sell. ``market_softmax: True`` masks the logits of the items that never occur in the model's
training data (targets or histories), so their embedding rows get no gradient there: with Adam and
no weight decay those rows stay bit-identical, which ``fed_strategy: fedavg_rows`` uses to average
each item's row over the markets that have it. Evaluation is unchanged (full ranking already masks
items foreign to the market).
"""

import torch


class MarketSoftmax:
    """Mixin before RecBole's ``SASRec`` (``class M(MarketSoftmax, SASRec)``); setting
    ``market_softmax`` (bool). Builds ``foreign_items`` (bool ``[n_items]``, True = masked) from
    the dataset the model is built with, which RecBole makes the training split."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        mask = None
        if config["market_softmax"]:
            if self.loss_type != "CE":
                raise ValueError("market_softmax: True needs a softmax over items: set loss_type: CE.")
            mask = foreign_item_mask(dataset, self.n_items)
        self.register_buffer("foreign_items", mask, persistent=False)  # None: not masked

    def use_market(self, dataset):
        """Point the model at the market of ``dataset`` (its training split): the foreign-item mask
        is rebuilt from it. A model copied into another market (``train_mode: transfer``) must be
        re-pointed, or it trains on the first market's mask (masked positives, infinite loss)."""
        if self.foreign_items is not None:
            self.foreign_items = foreign_item_mask(dataset, self.n_items).to(self.foreign_items.device)

    def train_logits(self, interaction):
        """Scores of every item for each training sequence, ``[B, n_items]``; items foreign to
        the market are ``-inf`` when ``market_softmax`` is on."""
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        logits = seq_output @ self.item_embedding.weight.T  # [B, n_items]
        if self.foreign_items is not None:
            logits = logits.masked_fill(self.foreign_items, float("-inf"))
        return logits

    def calculate_loss(self, interaction):
        if self.foreign_items is None:
            return super().calculate_loss(interaction)
        return self.loss_fct(self.train_logits(interaction), interaction[self.POS_ITEM_ID])


def foreign_item_mask(dataset, n_items):
    """Bool ``[n_items]``: True for the padding id and every item absent from ``dataset``'s
    interactions (its ``item_id`` targets and, for sequential data, ``item_id_list`` histories)."""
    item_field = dataset.iid_field
    seen = [dataset.inter_feat[item_field].reshape(-1)]
    list_field = item_field + dataset.config["LIST_SUFFIX"]
    if list_field in dataset.inter_feat:
        seen.append(dataset.inter_feat[list_field].reshape(-1))
    mask = torch.ones(n_items, dtype=torch.bool)
    mask[torch.cat(seen).long()] = False
    mask[0] = True  # padding
    return mask
