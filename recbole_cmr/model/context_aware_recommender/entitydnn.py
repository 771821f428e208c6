"""EntityDNN: a plain DNN on multi-entity CTR rows (MKT's target model and its baselines).

Input: the user profile, the attention-pooled click histories, the entity-shared fields and the
row's entity's specific fields projected to ``spec_width`` (``ReLU(Linear)`` per entity, so rows
of different schemas share one network); an MLP (``mlp_hidden_sizes``) gives the click logit.
Trained on the target entity only (``pooled_markets: [target]``) it is the target-only DNN; on
both entities and then fine-tuned on the target (``finetune: True``) it is the Finetune baseline.
"""

import torch

from recbole_cmr.model.context_aware_recommender.entity_layers import EntityRecommender, mlp_head


class EntityDNN(EntityRecommender):
    """Click logit = MLP([user, history, shared, projected specific])."""

    def __init__(self, config, dataset, spec_width=None):
        super().__init__(config, dataset)
        width = self.add_spec_projections(spec_width or config["spec_width"])
        self.head = mlp_head([width, *config["mlp_hidden_sizes"]], self.dropout_prob)
        self.apply(self._init_weights)

    def logits(self, interaction, added=None):
        """Click logits ``[B]``; ``added`` (``{name: [B, width]}``) is added to the matching
        vectors of :meth:`parts` first (MKT's stage-2 transfer)."""
        parts, _ = self.parts(interaction)
        for name, value in (added or {}).items():
            parts[name] = parts[name] + value
        return self.head(torch.cat(list(parts.values()), 1)).squeeze(-1)
