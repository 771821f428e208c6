"""PLE: the joint multi-entity PLE baseline (Tang et al., RecSys 2020; entities as tasks): one
level of shared and entity-specific experts on every entity's rows, a gate and a tower per
entity."""

import torch
from torch import nn

from recbole_cmr.model.context_aware_recommender.entity_layers import (
    EntityRecommender,
    PLELayer,
    mlp_head,
    route,
)


class PLE(EntityRecommender):
    """Logit = tower_e(PLE_e([user, history, shared, projected specific])) for entity e."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        width = self.add_spec_projections(config["spec_width"])
        sizes = config["expert_mlp_sizes"]
        self.ple = PLELayer(width, len(self.entities), config["n_shared_experts"],
                            config["n_specific_experts"], sizes, self.dropout_prob)
        self.towers = nn.ModuleDict({e: mlp_head([sizes[-1], *config["tower_mlp_sizes"]],
                                                 self.dropout_prob) for e in self.entities})
        self.apply(self._init_weights)

    def logits(self, interaction):
        """Click logits ``[B]``."""
        parts, entity = self.parts(interaction)
        h = self.ple(torch.cat(list(parts.values()), 1), entity)
        return route(entity, [self.towers[e](h).squeeze(-1) for e in self.entities])
