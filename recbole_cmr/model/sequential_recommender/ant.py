"""ANT: multi-modality + re-learning against negative transfer in sequential recommendation
(Peng, Parthasarathy, Ning, arXiv 2309.10195; METHODS.md §2, read from the authors' code).

Items have no ID embedding: each item is its frozen modality features (``recbole_cmr.data.
modality``: text, image, price), each passed through a mixture-of-experts adaptor (``n_experts``
experts ``W_k(dropout(x) - b_k)`` - a plain ``Linear`` for price - mixed by a softmax gate
``x W_gate [+ noise * softplus(x W_noise) while training]``, gates initialised to zero, i.e.
uniform), fused as ``e_img + e_text + e_price + beta * (e_img * e_text)``. A SASRec encoder reads
the sequence; sequence and item vectors are L2-normalised and scored by ``cosine / temperature``.

Stages (``set_stage``): ``pretrain`` on the auxiliary domains - in-batch contrastive next-item
loss (duplicate positives masked) + ``image_text_weight`` x image->text InfoNCE over the batch's
items that have both; ``finetune`` on the target - a softmax over the target's items
(``market_softmax``) after the ``adaptation``: ``relearn`` re-initialises the position embedding
(N(0, initializer_range)) and every adaptor (experts Xavier-normal, gates zero) and freezes the
Transformer encoder; ``finetune`` keeps the
pretrained adaptors and trains them (encoder frozen with ``freeze_encoder``).

The learning rate decays per epoch (``learning_rate_decay`` 0.99 on the target,
``pretrain_learning_rate_decay`` 0.995 in pretraining), as in the authors' code.

Switches for the ablations: ``text_modality``, ``image_modality``, ``price_modality``, ``fusion``,
``moe`` (False: one linear layer per modality).

Target text from a file (``target_text_feature_file``, e.g. the CLIP-sized ``feat1CLS`` that comes
with the image vectors): pretraining keeps the sentence encoder's text (the auxiliary domains have
no rows there), and from ``set_stage("finetune")`` the text role (the table's text term, the
fusion and the image-text loss) is taken by these vectors through their own adaptor, which
pretraining never trains: ``relearn`` re-initialises it with the rest, ``finetune`` starts it
from its initialisation while keeping the other pretrained adaptors.
"""

from contextlib import contextmanager
from logging import getLogger

import torch
from recbole.model.sequential_recommender import SASRec
from torch import nn
from torch.nn import functional as F

from recbole_cmr.data.dataloader import catalogue_mask
from recbole_cmr.data.modality import item_modalities
from recbole_cmr.model.sequential_recommender.market_softmax import MarketSoftmax


class WhitenedExpert(nn.Module):
    """``W (dropout(x) - b)``: UniSRec's parametric whitening expert, ``[n, D] -> [n, H]``."""

    def __init__(self, in_dim, out_dim, dropout):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(in_dim))
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.linear(self.dropout(x) - self.bias)


class MoEAdaptor(nn.Module):
    """Mixture of ``n_experts`` experts with a noisy softmax gate (zero-initialised: uniform)."""

    def __init__(self, in_dim, out_dim, n_experts, dropout, whitening=True):
        super().__init__()
        self.experts = nn.ModuleList(
            WhitenedExpert(in_dim, out_dim, dropout) if whitening else nn.Linear(in_dim, out_dim)
            for _ in range(n_experts))
        self.w_gate = nn.Parameter(torch.zeros(in_dim, n_experts))
        self.w_noise = nn.Parameter(torch.zeros(in_dim, n_experts))

    def gates(self, x):
        """Gate weights ``[n, K]`` (noise only while training)."""
        logits = x @ self.w_gate
        if self.training:
            logits = logits + torch.randn_like(logits) * (F.softplus(x @ self.w_noise) + 1e-2)
        return torch.softmax(logits, -1)

    def forward(self, x):
        experts = torch.stack([e(x) for e in self.experts], 1)  # [n, K, H]
        return (self.gates(x).unsqueeze(-1) * experts).sum(1)

    def reset(self):
        """Re-initialise every expert (``relearn_init``) and the gates (zero: uniform)."""
        for expert in self.experts:
            relearn_init(expert)
        nn.init.zeros_(self.w_gate)
        nn.init.zeros_(self.w_noise)


def relearn_init(module):
    """Re-learning's fresh start of an expert or linear adaptor, as the authors' code does it:
    Xavier-normal weights, zero biases (the whitening bias included)."""
    if isinstance(module, WhitenedExpert):
        nn.init.zeros_(module.bias)
        module = module.linear
    nn.init.xavier_normal_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class ModalityItemEncoder(nn.Module):
    """Item table from frozen modality features; behaves like ``nn.Embedding`` for SASRec (call
    with ids, ``.weight``). ``weight`` is ``[n_items, H]``, row 0 (padding) zero.

    Only the rows of ``active`` items (the markets the model serves; ``set_active``) that have a
    modality go through its adaptor, the others are zero: a target's table costs its own items,
    not the whole multi-domain vocabulary.

    The text role is ``text`` (the sentence encoder's vectors) or, once ``use_target_text`` is
    on, ``target_text`` (the target's precomputed vectors, with their own adaptor); the other
    source is left out of the table."""

    def __init__(self, modalities, hidden, config):
        super().__init__()
        self.names = sorted(modalities)
        self.hidden = hidden
        for name, (features, present) in modalities.items():
            self.register_buffer(f"{name}_features", features.float(), persistent=False)
            self.register_buffer(f"{name}_present", present.bool(), persistent=False)
        n_items = next(iter(modalities.values()))[0].shape[0]
        self.register_buffer("active", torch.ones(n_items, dtype=torch.bool), persistent=False)
        self.adaptors = nn.ModuleDict()
        for name in self.names:
            in_dim = modalities[name][0].shape[1]
            if config["moe"]:
                self.adaptors[name] = MoEAdaptor(in_dim, hidden, config["n_experts"],
                                                 config["adaptor_dropout"], whitening=name != "price")
            else:
                self.adaptors[name] = nn.Linear(in_dim, hidden)
        self.beta = config["fusion_beta"] if config["fusion"] else 0.0
        self.text_source = "text"
        self._fixed = None

    def use_target_text(self, on):
        """Take the text role from ``target_text`` (True, when the model has it) or ``text``."""
        self.text_source = "target_text" if on and "target_text" in self.names else "text"

    def in_table(self):
        """The modalities the table sums: all but the text source not in use."""
        unused = {"text", "target_text"} - {self.text_source}
        return [name for name in self.names if name not in unused]

    def features(self, name):
        return getattr(self, f"{name}_features"), getattr(self, f"{name}_present")

    def set_active(self, active):
        """Compute rows only for the items of bool ``active`` ``[n_items]`` (None: every item)."""
        self.active = torch.ones_like(self.active) if active is None else active.to(self.active)

    def modality(self, name):
        """The adapted vectors of one modality, ``[n_items, H]`` (zero where it is absent or the
        item is not active)."""
        features, present = self.features(name)
        rows = torch.nonzero(present & self.active).squeeze(1)
        table = features.new_zeros(len(features), self.hidden)
        if len(rows) == 0:
            return table
        return table.index_copy(0, rows, self.adaptors[name](features[rows]))

    @contextmanager
    def fixed(self):
        """Compute the table once for everything inside the block (one step's forward)."""
        self._fixed = self.weight
        try:
            yield self._fixed
        finally:
            self._fixed = None

    @property
    def weight(self):
        """The fused item table ``[n_items, H]``."""
        if self._fixed is not None:
            return self._fixed
        parts = {name: self.modality(name) for name in self.in_table()}
        table = sum(parts.values())
        if self.beta and "image" in parts and self.text_source in parts:
            table = table + self.beta * parts["image"] * parts[self.text_source]
        return table

    def forward(self, item_ids):
        return self.weight[item_ids]

    def reset(self):
        """Re-initialise every adaptor (experts and gates)."""
        for adaptor in self.adaptors.values():
            if isinstance(adaptor, MoEAdaptor):
                adaptor.reset()
            else:
                relearn_init(adaptor)


class ANT(MarketSoftmax, SASRec):
    """Modality item encoder + SASRec encoder, cosine / temperature scores; two stages."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if config["target_text_feature_file"] and config["text_modality"] and not (
                config["train_mode"] == "transfer" or config["finetune"]):
            raise ValueError(
                "target_text_feature_file replaces the text on the target's adaptation stage, "
                f"which train_mode {config['train_mode']} without finetune never reaches: use "
                "train_mode transfer (or finetune: True), or drop target_text_feature_file.")
        modalities = item_modalities(config, dataset)
        if not modalities:
            raise ValueError(
                f"ANT represents items by their modalities, but dataset [{config['dataset']}] "
                "gives none: add item text (<dataset>.item), image_feature_file or price_field, "
                "or enable text_modality / image_modality / price_modality.")
        self.item_embedding = ModalityItemEncoder(modalities, self.hidden_size, config)
        self.item_embedding.apply(self._init_weights)  # like every other layer: N(0, initializer_range)
        self.item_embedding.set_active(catalogue_mask(dataset, self.n_items))
        self.temperature = config["temperature"]
        self.image_text_weight = config["image_text_weight"]
        self.adaptation = config["adaptation"]
        if self.adaptation not in ("relearn", "finetune"):
            raise ValueError(f"adaptation [{self.adaptation}] must be 'relearn' or 'finetune'.")
        self.freeze_encoder = config["freeze_encoder"]
        self.stage = "pretrain"

    def use_market(self, dataset):
        """Point the model at the market(s) of ``dataset`` (a training split): the softmax mask
        (``market_softmax``) and the items whose vectors are computed (its catalogue)."""
        super().use_market(dataset)
        self.item_embedding.set_active(catalogue_mask(dataset, self.n_items))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """``nn.Module.load_state_dict`` that lets a checkpoint of other modalities load: see
        ``fit_adaptors``."""
        return super().load_state_dict(self.fit_adaptors(state_dict), strict, assign)

    def fit_adaptors(self, state_dict):
        """``state_dict`` with its modality adaptors fitted to this model: adaptors of modalities
        this model lacks are dropped, modalities the checkpoint lacks keep this model's fresh
        adaptor (e.g. images on the target only: pretraining never trains them), and under
        ``adaptation: relearn`` an adaptor of another shape (``moe`` on/off) is ignored, since
        re-learning re-initialises it anyway. Anything else that differs stays an error."""
        prefix = "item_embedding.adaptors."
        own = {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}
        theirs = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        fitted = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        for name in sorted({k[len(prefix):].split(".")[0] for k in {**own, **theirs}}):
            mine = {k: v for k, v in own.items() if k.startswith(f"{prefix}{name}.")}
            given = {k: v for k, v in theirs.items() if k.startswith(f"{prefix}{name}.")}
            same = mine.keys() == given.keys() and all(v.shape == mine[k].shape for k, v in given.items())
            if not mine:
                getLogger().info(f"checkpoint's {name} adaptor not used: this model has no {name} modality")
            elif not given:
                getLogger().info(f"no {name} adaptor in the checkpoint: it starts untrained")
                fitted.update(mine)
            elif same:
                fitted.update(given)
            elif self.adaptation == "relearn":
                getLogger().info(f"checkpoint's {name} adaptor has another shape: ignored (re-learnt)")
                fitted.update(mine)
            else:
                raise ValueError(
                    f"the checkpoint's {name} adaptor does not fit this model (moe, n_experts or "
                    "hidden_size differ); adaptation: finetune needs the pretrained adaptor's shape.")
        return fitted

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage):
        """``pretrain``: everything trains; ``finetune``: adapt to the target (see the module
        docstring: ``relearn`` re-initialises positions and adaptors first)."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"ANT stage [{stage}] must be 'pretrain' or 'finetune'.")
        if stage == "finetune" and self.stage == "pretrain" and self.adaptation == "relearn":
            nn.init.normal_(self.position_embedding.weight, 0.0, self.initializer_range)
            self.item_embedding.reset()
        self.item_embedding.use_target_text(stage == "finetune")
        self.stage = stage
        frozen = stage == "finetune" and self.freeze_encoder
        for param in self.trm_encoder.parameters():
            param.requires_grad_(not frozen)

    # ------------------------------------------------------------------ scores
    def sequence_vector(self, interaction):
        """L2-normalised sequence representation ``[B, H]``."""
        return F.normalize(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]), dim=-1)

    def item_table(self):
        """L2-normalised item table ``[n_items, H]``."""
        return F.normalize(self.item_embedding.weight, dim=-1)

    def train_logits(self, interaction):
        """``cosine / temperature`` of every item, ``[B, n_items]`` (market-masked)."""
        logits = self.sequence_vector(interaction) @ self.item_table().T / self.temperature
        if self.foreign_items is not None:
            logits = logits.masked_fill(self.foreign_items, float("-inf"))
        return logits

    def calculate_loss(self, interaction):
        with self.item_embedding.fixed():
            if self.stage == "finetune":
                return F.cross_entropy(self.train_logits(interaction), interaction[self.POS_ITEM_ID])
            return self.pretrain_loss(interaction)

    def pretrain_loss(self, interaction):
        """In-batch contrastive next-item loss + ``image_text_weight`` x image->text InfoNCE."""
        pos = interaction[self.POS_ITEM_ID]  # [B]
        table = self.item_table()
        logits = self.sequence_vector(interaction) @ table[pos].T / self.temperature  # [B, B]
        duplicate = (pos.unsqueeze(0) == pos.unsqueeze(1)) & ~torch.eye(len(pos), dtype=torch.bool,
                                                                        device=pos.device)
        loss = F.cross_entropy(logits.masked_fill(duplicate, float("-inf")),
                               torch.arange(len(pos), device=pos.device))
        text = self.item_embedding.text_source
        if self.image_text_weight and {"image", text} <= set(self.item_embedding.names):
            loss = loss + self.image_text_weight * self.image_text_loss(pos)
        return loss

    def image_text_loss(self, items):
        """InfoNCE of each batch item's image vector against the text vectors (the text source in
        use) of the batch's distinct items that have both (a scalar; 0 when fewer than two
        have)."""
        text = self.item_embedding.text_source
        items = torch.unique(items)
        both = self.item_embedding.features("image")[1][items] & self.item_embedding.features(text)[1][items]
        items = items[both]
        if len(items) < 2:
            return torch.zeros((), device=items.device)
        image = F.normalize(self.item_embedding.modality("image")[items], dim=-1)
        text = F.normalize(self.item_embedding.modality(text)[items], dim=-1)
        return F.cross_entropy(image @ text.T / self.temperature, torch.arange(len(items), device=items.device))

    def predict(self, interaction):
        with self.item_embedding.fixed():
            seq = self.sequence_vector(interaction)
            return (seq * self.item_table()[interaction[self.ITEM_ID]]).sum(-1) / self.temperature

    def full_sort_predict(self, interaction):
        with self.item_embedding.fixed():
            return self.sequence_vector(interaction) @ self.item_table().T / self.temperature
