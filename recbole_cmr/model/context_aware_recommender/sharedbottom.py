"""SharedBottom: the joint multi-entity baseline - one bottom MLP on every entity's rows, one
tower per entity (the shared-bottom multi-task network, entities as tasks)."""

import torch
from torch import nn

from recbole_cmr.model.context_aware_recommender.entity_layers import (
    EntityRecommender,
    mlp_head,
    route,
)
from recbole_cmr.model.context_aware_recommender.mmoe import named_mlp


class SharedBottom(EntityRecommender):
    """Logit = tower_e(bottom([user, history, shared, projected specific])) for entity e."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        sizes = [self.add_spec_projections(config["spec_width"]), *config["bottom_mlp_sizes"]]
        self.bottom = named_mlp(sizes, self.dropout_prob, bn=False)
        self.towers = nn.ModuleDict({e: mlp_head([sizes[-1], *config["tower_mlp_sizes"]],
                                                 self.dropout_prob) for e in self.entities})
        self.apply(self._init_weights)

    def logits(self, interaction):
        """Click logits ``[B]``."""
        parts, entity = self.parts(interaction)
        h = self.bottom(torch.cat(list(parts.values()), 1))
        return route(entity, [self.towers[e](h).squeeze(-1) for e in self.entities])
