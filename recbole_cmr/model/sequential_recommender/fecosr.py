"""FeCoSR: federated many-to-many collaboration across markets for sequential recommendation.

The model of "From Transfer to Collaboration: A Federated Framework for Cross-Market Sequential
Recommendation" (Chen et al., 2026) as recbole_cmr builds it (see METHODS.md §1 for what is the
paper's and what is our chosen default): a SASRec backbone whose sequence encoder, position and
item embeddings are learned by federated pretraining over all markets with the S²CE loss, then
fine-tuned locally in each market with a market-specific adaptation module on the item embeddings.

Switches (properties/model/FeCoSR.yaml): ``s2ce`` (+ ``s2ce_eps``, ``s2ce_tau``, ``s2ce_topk``),
``item_text_input``, ``adaptation`` (+ ``adapter_rank``), ``market_softmax``.
"""

import torch
from recbole.model.sequential_recommender import SASRec
from torch import nn

from recbole_cmr.model.loss import S2CELoss
from recbole_cmr.model.sequential_recommender.market_softmax import MarketSoftmax


class MarketAdapter(nn.Module):
    """Residual low-rank adapter with per-item bias: ``e'_i = e_i + B A e_i + b_i``.

    Starts as the identity (``B = 0``, ``b = 0``); the padding row stays zero.
    """

    def __init__(self, n_items, hidden_size, rank):
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, hidden_size) / hidden_size**0.5)  # A [r, H]
        self.up = nn.Parameter(torch.zeros(hidden_size, rank))  # B [H, r]
        self.item_bias = nn.Parameter(torch.zeros(n_items, hidden_size))  # b [n_items, H]

    def forward(self, table):
        """``table [n_items, H]`` -> adapted table ``[n_items, H]``."""
        bias = torch.cat([torch.zeros_like(self.item_bias[:1]), self.item_bias[1:]])
        return table + table @ self.down.T @ self.up.T + bias


class MarketItemEmbedding(nn.Module):
    """Item embeddings that behave like ``nn.Embedding`` for SASRec (call with ids, ``.weight``).

    Table = ID embedding (+ projected frozen text embedding) (-> market adapter when ``adapt``).
    """

    def __init__(self, embedding, text=None, adapter_rank=0):
        super().__init__()
        self.embedding = embedding
        hidden = embedding.embedding_dim
        self.text_proj = None
        if text is not None:
            self.register_buffer("text", text, persistent=False)
            self.text_proj = nn.Linear(text.shape[1], hidden, bias=False)
        self.adapter = MarketAdapter(embedding.num_embeddings, hidden, adapter_rank) if adapter_rank else None
        self.adapt = False

    @property
    def weight(self):
        """The full item table, ``[n_items, H]``."""
        table = self.embedding.weight
        if self.text_proj is not None:
            table = table + self.text_proj(self.text)
        if self.adapt and self.adapter is not None:
            table = self.adapter(table)
        return table

    def forward(self, item_ids):
        """``item_ids [...]`` -> embeddings ``[..., H]``."""
        if self.text_proj is None and not (self.adapt and self.adapter is not None):
            return self.embedding(item_ids)
        return self.weight[item_ids]


class FeCoSR(MarketSoftmax, SASRec):
    """SASRec backbone + S²CE + market adaptation; stages ``pretrain`` and ``finetune``."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if self.loss_type != "CE":
            raise ValueError("FeCoSR is trained with a softmax over items: set loss_type: CE.")
        needs_text = config["s2ce"] or config["item_text_input"]
        text = self._item_text(dataset, config) if needs_text else None
        rank = config["adapter_rank"] if config["adaptation"] else 0
        self.item_embedding = MarketItemEmbedding(
            self.item_embedding, text if config["item_text_input"] else None, rank
        )
        if self.item_embedding.text_proj is not None:
            self._init_weights(self.item_embedding.text_proj)
        self.s2ce_args = (config["s2ce_eps"], config["s2ce_tau"], config["s2ce_topk"])
        self.s2ce_text = text if config["s2ce"] else None  # [n_items, D], kept for use_market
        self.s2ce = self._s2ce_loss()
        self.stage = "pretrain"

    def _s2ce_loss(self):
        """The S²CE loss over the text neighbours among the market's own items (all items when
        ``market_softmax`` is off); None when ``s2ce`` is off."""
        if self.s2ce_text is None:
            return None
        text = self.s2ce_text
        if self.foreign_items is not None:
            text = text.masked_fill(self.foreign_items[:, None].to(text.device), 0.0)
        return S2CELoss(text, *self.s2ce_args).to(self.item_embedding.embedding.weight.device)

    def use_market(self, dataset):
        """Re-point the market mask and, with it, the S²CE neighbours (see ``MarketSoftmax``)."""
        super().use_market(dataset)
        if self.foreign_items is not None:
            self.s2ce = self._s2ce_loss()

    @staticmethod
    def _item_text(dataset, config):
        try:
            return dataset.item_text_embedding.float()
        except (AttributeError, ValueError) as err:
            raise ValueError(
                f"FeCoSR with s2ce=True or item_text_input=True needs item text, but dataset "
                f"[{config['dataset']}] has none ({err}). Add a <dataset>.item file with a text "
                "field, or run with --s2ce=False --item_text_input=False."
            ) from None

    def set_stage(self, stage):
        """``pretrain``: shared model, no adapter; ``finetune``: the market adapter is applied."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"FeCoSR stage [{stage}] must be 'pretrain' or 'finetune'.")
        self.stage = stage
        self.item_embedding.adapt = stage == "finetune"

    def calculate_loss(self, interaction):
        if self.s2ce is None:
            return super().calculate_loss(interaction)
        return self.s2ce(self.train_logits(interaction), interaction[self.POS_ITEM_ID])
