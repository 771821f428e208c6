"""MKT: two-stage multi-entity knowledge transfer for CTR (Guan et al., arXiv 2402.19101;
METHODS.md §3).

Stage 1, the Multi-Entity Model (``MultiEntityModel``), trains on the rows of every entity
(``train_mode: pooled``):

* HFA per entity (``hfa``) on its specific fields ``V`` ``[B, n, d]``: explicit crosses
  ``v_{l+1} = v_0 (v_l^T w_l) + b_l + v_l`` (``cross_layers``, DCN form) and implicit
  ``v_im = ReLU(W v_0 + b)`` give one importance score per field, ``p = 2 sigmoid(FC[v_ex, v_im])``
  in (0, 2); ``q = [v_shared, ReLU(FC(flatten(V * p)))]`` (FC to ``hfa_width``: one width for
  every entity - the alignment). Without HFA: ``q = [v_shared, ReLU(FC(flatten(V)))]``.
* CKE: one PLE level over ``q`` (``cke_shared_experts`` shared, ``cke_specific_experts`` per
  entity) -> common knowledge ``g_com``; an entity-specific extractor MLP on the raw embeddings ->
  ``g_ind``; a tower per entity on ``[g_com, g_ind]``.
* PDL (``pdl``): ``cos(g_com, g_ind)`` averaged over each entity's rows, summed over entities.
  Loss = sum over entities of their BCE + ``pdl_weight`` * PDL.

Stage 2 (``set_stage("finetune")``; the plugin's fine-tuning on each target entity): the MEM is
frozen (no gradient, eval mode) and run on the target rows; its user, history, shared-feature and
common-knowledge vectors pass GLU gates (``stage2_gates``; ``value(x) * sigmoid(gate(x))``) and are
added to the target model's matching vectors (an ``EntityDNN``; ``g_com`` is added to its
projected specific fields, which have ``g_com``'s width - our choice, the paper does not say
which target vector takes it). Loss: BCE over the target entity's rows only.
"""

import torch
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import InputType, ModelType
from torch import nn
from torch.nn.functional import cosine_similarity

from recbole_cmr.model.context_aware_recommender.entity_layers import (
    EntityRecommender,
    PLELayer,
    entity_bce,
    mlp_head,
    route,
)
from recbole_cmr.model.context_aware_recommender.entitydnn import EntityDNN
from recbole_cmr.model.context_aware_recommender.mmoe import named_mlp


class HFA(nn.Module):
    """Heterogeneous feature alignment of one entity's ``n`` specific fields to ``width``."""

    def __init__(self, n_fields, d, width, cross_layers, enabled=True):
        super().__init__()
        size = n_fields * d
        self.enabled = enabled
        if enabled:
            self.cross_w = nn.ParameterList(nn.Parameter(torch.randn(size) * 0.01)
                                            for _ in range(cross_layers))
            self.cross_b = nn.ParameterList(nn.Parameter(torch.zeros(size))
                                            for _ in range(cross_layers))
            self.implicit = nn.Linear(size, size)
            self.score = nn.Linear(2 * size, n_fields)
        self.align = nn.Linear(size, width)

    def importance(self, spec):
        """Per-field importance ``2 sigmoid(FC[v_ex, v_im])``, ``[B, n]`` in (0, 2)."""
        v0 = spec.flatten(1)
        v = v0
        for w, b in zip(self.cross_w, self.cross_b):
            v = v0 * (v @ w).unsqueeze(-1) + b + v
        implicit = torch.relu(self.implicit(v0))
        return 2 * torch.sigmoid(self.score(torch.cat([v, implicit], -1)))

    def forward(self, spec):
        """``spec`` ``[B, n, d]`` -> aligned ``[B, width]``."""
        if self.enabled:
            spec = spec * self.importance(spec).unsqueeze(-1)
        return torch.relu(self.align(spec.flatten(1)))


def polarized_distribution_loss(g_com, g_ind, entity, n_entities):
    """PDL: per entity the mean ``cos(g_com, g_ind)`` over its rows, summed (a scalar)."""
    cos = cosine_similarity(g_com, g_ind, dim=-1)
    loss = cos.new_zeros(())
    for k in range(n_entities):
        rows = entity == k
        if rows.any():
            loss = loss + cos[rows].mean()
    return loss


class MultiEntityModel(EntityRecommender):
    """MKT's stage-1 network (see the module docstring)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        user, history, shared, n_specific = self.inputs.widths()
        missing = [e for e, n in n_specific.items() if n == 0]
        if missing:
            raise ValueError(f"MKT aligns entity-specific fields, but entities {missing} have "
                             "none: list them in entity_fields.")
        base, d, sizes = user + history + shared, self.embedding_size, config["expert_mlp_sizes"]
        self.hfa = nn.ModuleDict({e: HFA(n, d, config["hfa_width"], config["cross_layers"],
                                         config["hfa"]) for e, n in n_specific.items()})
        self.cke = PLELayer(base + config["hfa_width"], len(self.entities),
                            config["cke_shared_experts"], config["cke_specific_experts"], sizes,
                            self.dropout_prob)
        self.extractors = nn.ModuleDict({e: named_mlp([base + n * d, *sizes], self.dropout_prob,
                                                      bn=False) for e, n in n_specific.items()})
        self.towers = nn.ModuleDict({e: mlp_head([2 * sizes[-1], *config["tower_mlp_sizes"]],
                                                 self.dropout_prob) for e in self.entities})
        self.width = sizes[-1]
        self.pdl, self.pdl_weight = config["pdl"], config["pdl_weight"]
        self.apply(self._init_weights)

    def represent(self, interaction):
        """``{user, history, shared, knowledge (g_com), individual (g_ind), entity}``."""
        x = self.inputs(interaction)
        base = torch.cat([x["user"], x["history"], x["shared"]], 1)
        entity = x["entity"]
        q = route(entity, [torch.cat([base, self.hfa[e](x["specific"][e])], 1) for e in self.entities])
        individual = route(entity, [self.extractors[e](torch.cat([base, x["specific"][e].flatten(1)], 1))
                                    for e in self.entities])
        return {"user": x["user"], "history": x["history"], "shared": x["shared"],
                "knowledge": self.cke(q, entity), "individual": individual, "entity": entity}

    def logits(self, interaction, rep=None):
        """Click logits ``[B]`` (each row through its entity's tower)."""
        rep = rep or self.represent(interaction)
        joint = torch.cat([rep["knowledge"], rep["individual"]], 1)
        return route(rep["entity"], [self.towers[e](joint).squeeze(-1) for e in self.entities])

    def calculate_loss(self, interaction):
        """Sum over entities of BCE, plus ``pdl_weight`` * PDL."""
        rep = self.represent(interaction)
        loss = entity_bce(self.logits(interaction, rep), interaction[self.LABEL].float(),
                          rep["entity"], len(self.entities))
        if self.pdl:
            loss = loss + self.pdl_weight * polarized_distribution_loss(
                rep["knowledge"], rep["individual"], rep["entity"], len(self.entities))
        return loss


class GLUGate(nn.Module):
    """``value(x) * sigmoid(gate(x))`` with the width of ``x``."""

    def __init__(self, width):
        super().__init__()
        self.value = nn.Linear(width, width)
        self.gate = nn.Linear(width, width)

    def forward(self, x):
        return self.value(x) * torch.sigmoid(self.gate(x))


class MKT(AbstractRecommender):
    """MEM (``mem``) + target model (``target_net``) + stage-2 gates (``gates``); stages
    ``pretrain`` (the MEM alone) and ``finetune`` (MEM frozen, transfer to the target)."""

    type = ModelType.CONTEXT
    input_type = InputType.POINTWISE
    multi_entity = True
    finetunes_source = False  # stage 2 learns the target only: never fine-tune a copy on the source

    def __init__(self, config, dataset):
        super().__init__()
        self.LABEL = config["LABEL_FIELD"]
        self.mem = MultiEntityModel(config, dataset)
        self.target_net = EntityDNN(config, dataset, spec_width=self.mem.width)
        source = config["source_market"]
        if source not in self.mem.entities:
            raise ValueError(f"MKT: source_market [{source}] must name the source entity, one of "
                             f"{self.mem.entities}.")
        self.source_index = self.mem.entities.index(source)
        user, history, shared, _ = self.mem.inputs.widths()
        widths = {"user": user, "history": history, "shared": shared, "knowledge": self.mem.width}
        self.gates = nn.ModuleDict({k: GLUGate(w) for k, w in widths.items() if w}) \
            if config["stage2_gates"] else None
        if self.gates is not None:
            self.gates.apply(EntityRecommender._init_weights)
        self.stage = "pretrain"

    def set_stage(self, stage):
        """``pretrain``: train the MEM; ``finetune``: freeze it and train the transfer."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"MKT stage [{stage}] must be 'pretrain' or 'finetune'.")
        self.stage = stage
        for param in self.mem.parameters():
            param.requires_grad_(stage == "pretrain")
        self.train(self.training)

    def train(self, mode=True):
        """As ``nn.Module.train``; in stage ``finetune`` the frozen MEM stays in eval mode."""
        super().train(mode)
        if self.stage == "finetune":
            self.mem.eval()
        return self

    def transferred(self, interaction):
        """The MEM's vectors for the target model, gated: ``{user, history, shared, specific}``."""
        with torch.no_grad():
            rep = self.mem.represent(interaction)
        out = {}
        for name, key in (("user", "user"), ("history", "history"), ("shared", "shared"),
                          ("specific", "knowledge")):
            if rep[key].shape[1]:
                out[name] = self.gates[key](rep[key]) if self.gates is not None else rep[key]
        return out

    def target_logits(self, interaction):
        """Stage-2 click logits ``[B]``."""
        return self.target_net.logits(interaction, added=self.transferred(interaction))

    def calculate_loss(self, interaction):
        if self.stage == "pretrain":
            return self.mem.calculate_loss(interaction)
        entity = interaction[self.mem.inputs.entity_field].long() - 1
        rows = entity != self.source_index  # source rows never reach the stage-2 loss
        if not rows.any():
            return sum(p.sum() * 0 for p in self.target_net.parameters())
        target = interaction[torch.nonzero(rows).squeeze(1)]
        return nn.functional.binary_cross_entropy_with_logits(
            self.target_logits(target), target[self.LABEL].float())

    def predict(self, interaction):
        """Click probability ``[B]`` of the current stage's network."""
        logits = self.mem.logits(interaction) if self.stage == "pretrain" \
            else self.target_logits(interaction)
        return torch.sigmoid(logits)
