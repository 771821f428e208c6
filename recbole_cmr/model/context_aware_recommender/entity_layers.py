"""Building blocks of the multi-entity CTR models (MKT and its baselines).

A multi-entity row (``entity_fields`` data, see ``recbole_cmr.data.entity``) is embedded by field
group: the user's profile fields, the click histories (``history_fields``, attention-pooled
against the candidate item, sharing the item id table), the entity-shared fields and the
entity-specific fields of the row's entity (``entity_field`` names it). All embeddings are
``embedding_size``-wide.
"""

import torch
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import FeatureSource, FeatureType, InputType, ModelType
from torch import nn
from torch.nn.init import constant_, xavier_normal_

from recbole_cmr.model.context_aware_recommender.mmoe import named_mlp


class EntityInputs(nn.Module):
    """Field-group embeddings of multi-entity rows.

    ``forward`` returns a dict: ``user`` ``[B, n_user * d]``, ``history`` ``[B, n_hist * d]``,
    ``shared`` ``[B, n_shared * d]``, ``specific`` ``{entity: [B, n_e, d]}`` (every row; only the
    row's own entity is meaningful) and ``entity`` ``[B]`` (0-based index into ``entities``).
    """

    def __init__(self, config, dataset, embedding_size, attention_sizes):
        super().__init__()
        self.entity_field = config["entity_field"]
        if self.entity_field not in dataset.field2type:
            raise ValueError(f"{type(self).__name__} needs multi-entity data: set entity_fields "
                             f"(dataset [{config['dataset']}] has no [{self.entity_field}] field).")
        self.entities = [str(e) for e in dataset.field2id_token[self.entity_field][1:]]
        self.specific_fields = {e: list(config["entity_fields"].get(e) or [])
                                for e in self.entities}
        self.history_fields = list(config["history_fields"] or {})
        self.item_field = config["ITEM_ID_FIELD"]
        self.floats = set(config["numerical_features"] or [])
        skip = {*(config["label_fields"] or []), config["LABEL_FIELD"], config["TIME_FIELD"],
                self.entity_field, *self.history_fields,
                *(f for fields in self.specific_fields.values() for f in fields)}
        user_sources = [FeatureSource.USER_ID, FeatureSource.USER]
        self.user_fields = self._usable(dataset, dataset.fields(source=user_sources), skip)
        self.shared_fields = self._usable(dataset, dataset.fields(
            source=[FeatureSource.ITEM_ID, FeatureSource.ITEM, FeatureSource.INTERACTION]), skip)
        every = [*self.user_fields, *self.shared_fields,
                 *(f for fields in self.specific_fields.values() for f in fields)]
        self.field_type = {f: dataset.field2type[f] for f in every}
        self.tables = nn.ModuleDict({
            f: nn.Embedding(dataset.num(f), embedding_size, padding_idx=0)
            for f in [*every, self.item_field] if self._is_token(f, dataset)})
        self.float_vectors = nn.ParameterDict({
            f: nn.Parameter(torch.randn(embedding_size) * 0.01)
            for f in every if not self._is_token(f, dataset)})
        self.attention = AttentionPooling(embedding_size, attention_sizes)
        self.d = embedding_size

    def _usable(self, dataset, fields, skip):
        keep = []
        for f in fields:
            if f in skip or f in keep:
                continue
            ftype = dataset.field2type[f]
            if ftype in (FeatureType.TOKEN, FeatureType.TOKEN_SEQ) or f in self.floats:
                keep.append(f)
        return keep

    @staticmethod
    def _is_token(field, dataset):
        return dataset.field2type[field] in (FeatureType.TOKEN, FeatureType.TOKEN_SEQ)

    def widths(self):
        """``(user, history, shared)`` flattened widths and ``{entity: n_specific}``."""
        return (len(self.user_fields) * self.d, len(self.history_fields) * self.d,
                len(self.shared_fields) * self.d,
                {e: len(f) for e, f in self.specific_fields.items()})

    def embed(self, field, values):
        """One field's embedding ``[B, d]`` (token_seq: mean over the non-padding tokens)."""
        if field in self.float_vectors:
            return values.float().unsqueeze(-1) * self.float_vectors[field]
        emb = self.tables[field](values)
        if self.field_type[field] == FeatureType.TOKEN_SEQ:
            mask = (values != 0).unsqueeze(-1).float()
            return (emb * mask).sum(1) / mask.sum(1).clamp(min=1)
        return emb

    def _group(self, fields, interaction, batch):
        if not fields:
            return interaction[self.item_field].new_zeros((batch, 0, self.d), dtype=torch.float)
        return torch.stack([self.embed(f, interaction[f]) for f in fields], 1)

    def forward(self, interaction):
        item = interaction[self.item_field]
        batch = item.shape[0]
        candidate = self.tables[self.item_field](item)  # [B, d]
        histories = [self.attention(candidate, self.tables[self.item_field](interaction[f]),
                                    interaction[f] != 0) for f in self.history_fields]
        history = torch.cat(histories, 1) if histories else candidate.new_zeros((batch, 0))
        return {
            "user": self._group(self.user_fields, interaction, batch).flatten(1),
            "history": history,
            "shared": self._group(self.shared_fields, interaction, batch).flatten(1),
            "specific": {e: self._group(f, interaction, batch) for e, f in self.specific_fields.items()},
            "entity": interaction[self.entity_field].long() - 1,
        }


class AttentionPooling(nn.Module):
    """DIN-style attention pooling of a click history against the candidate item.

    ``score = MLP([h, q, h * q, h - q])`` per history item, softmax over the non-padding items;
    an empty history pools to zeros.
    """

    def __init__(self, d, hidden_sizes):
        super().__init__()
        self.mlp = mlp_head([4 * d, *hidden_sizes], 0.0)

    def forward(self, query, keys, mask):
        """``query`` [B, d], ``keys`` [B, L, d], ``mask`` [B, L] bool -> ``[B, d]``."""
        q = query.unsqueeze(1).expand_as(keys)
        scores = self.mlp(torch.cat([keys, q, keys * q, keys - q], -1)).squeeze(-1)  # [B, L]
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, -1).nan_to_num(0.0)  # all-padding rows -> 0
        return (weights.unsqueeze(-1) * keys).sum(1)


class PLELayer(nn.Module):
    """One level of PLE (Tang et al., RecSys 2020) with entities as tasks: ``n_shared`` shared
    experts and ``n_specific`` experts per entity; entity e's softmax gate mixes its own and the
    shared experts. ``forward(x [B, D], entity [B]) -> [B, H]`` (each row through its entity's
    gate)."""

    def __init__(self, input_size, n_entities, n_shared, n_specific, sizes, dropout):
        super().__init__()
        self.shared = nn.ModuleList(named_mlp([input_size, *sizes], dropout, bn=False)
                                    for _ in range(n_shared))
        self.specific = nn.ModuleList(
            nn.ModuleList(named_mlp([input_size, *sizes], dropout, bn=False)
                          for _ in range(n_specific)) for _ in range(n_entities))
        self.gates = nn.ModuleList(nn.Linear(input_size, n_shared + n_specific)
                                   for _ in range(n_entities))

    def forward(self, x, entity):
        shared = [expert(x) for expert in self.shared]
        out = None
        for k, (own, gate) in enumerate(zip(self.specific, self.gates)):
            experts = torch.stack([*(e(x) for e in own), *shared], 1)  # [B, K, H]
            mixed = (torch.softmax(gate(x), -1).unsqueeze(-1) * experts).sum(1)
            out = mixed if out is None else torch.where((entity == k).unsqueeze(-1), mixed, out)
        return out


def route(entity, outputs):
    """Row ``i`` takes ``outputs[entity[i]]``: ``[B]`` x ``[[B, ...], ...]`` -> ``[B, ...]``."""
    out = outputs[0]
    for k, value in enumerate(outputs[1:], 1):
        out = torch.where((entity == k).view(-1, *[1] * (value.dim() - 1)), value, out)
    return out


def entity_bce(logits, labels, entity, n_entities):
    """Sum over entities of the mean binary cross-entropy of that entity's rows (a scalar)."""
    loss = logits.new_zeros(())
    for k in range(n_entities):
        rows = entity == k
        if rows.any():
            loss = loss + nn.functional.binary_cross_entropy_with_logits(logits[rows], labels[rows])
    return loss


class EntityRecommender(AbstractRecommender):
    """Base of the multi-entity CTR models: RecBole context-aware (pointwise) models on
    ``EntityInputs``; subclasses give ``logits(interaction) -> [B]``. Loss: :func:`entity_bce`."""

    type = ModelType.CONTEXT
    input_type = InputType.POINTWISE
    multi_entity = True  # runs on entity_fields data (the CLI's default dataset: ml100k-entities)

    def __init__(self, config, dataset):
        super().__init__()
        self.LABEL = config["LABEL_FIELD"]
        self.device = config["device"]
        self.embedding_size = config["embedding_size"]
        self.dropout_prob = config["dropout_prob"]
        self.inputs = EntityInputs(config, dataset, self.embedding_size,
                                   config["attention_mlp_sizes"])
        self.entities = self.inputs.entities

    def add_spec_projections(self, width):
        """Per entity ``ReLU(Linear(n_e * d -> width))`` of its specific fields (one width for
        every entity, so rows of different schemas feed one network); returns the input width of
        :meth:`parts` concatenated."""
        self.projections = nn.ModuleDict({
            e: nn.Sequential(nn.Linear(max(n, 1) * self.embedding_size, width), nn.ReLU())
            for e, n in self.inputs.widths()[3].items()})
        user, history, shared, _ = self.inputs.widths()
        return user + history + shared + width

    def parts(self, interaction):
        """``({user, history, shared, specific}, entity)``: the row's vectors, ``[B, width]``
        each (``specific``: its entity's projected specific fields), and ``[B]`` entity index."""
        x = self.inputs(interaction)
        outs = []
        for e in self.entities:
            spec = x["specific"][e].flatten(1)
            if spec.shape[1] == 0:
                spec = spec.new_zeros((spec.shape[0], self.embedding_size))
            outs.append(self.projections[e](spec))
        vectors = {"user": x["user"], "history": x["history"], "shared": x["shared"],
                   "specific": route(x["entity"], outs)}
        return vectors, x["entity"]

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Embedding):
            xavier_normal_(module.weight.data)
            module.weight.data[0].zero_()
        elif isinstance(module, nn.Linear):
            xavier_normal_(module.weight.data)
            if module.bias is not None:
                constant_(module.bias.data, 0)

    def calculate_loss(self, interaction):
        entity = interaction[self.inputs.entity_field].long() - 1
        return entity_bce(self.logits(interaction), interaction[self.LABEL].float(), entity,
                          len(self.entities))

    def predict(self, interaction):
        """Click probability ``[B]``."""
        return torch.sigmoid(self.logits(interaction))


def mlp_head(sizes, dropout):
    """``named_mlp`` hidden layers then a linear ``out`` unit (logit)."""
    head = named_mlp(sizes, dropout, bn=False)
    head.add_module("out", nn.Linear(sizes[-1], 1))
    return head
