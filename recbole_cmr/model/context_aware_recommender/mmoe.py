"""MMoE: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) for multi-task CTR / CTCVR.

Every feature field is embedded by RecBole's ``ContextRecommender`` (token, token_seq and the
``numerical_features`` float fields); the flattened embeddings feed ``n_experts`` expert MLPs
(Linear, BatchNorm, ReLU, dropout per layer), one softmax gate per task mixes the experts, and
one tower per task (MLP + a linear output, sigmoid) predicts that task. Loss: the mean over tasks
of the binary cross-entropy.

Tasks come from ``label_fields`` (0/1 columns of the .inter file): with ``task_chain`` task t's
label is the product of ``label_fields[0..t]`` (click, then click x conversion = CTCVR).
``predict`` returns the task ``eval_task`` (the multi-task trainer evaluates each task in turn).

Parameter names: ``experts.<group>.<k>.{linear_i,bn_i}.*``, ``gates.<t>.*``,
``towers.<t>.{linear_i,out}.*`` and RecBole's ``token_embedding_table`` etc.; plain MMoE has one
expert group, ``shared``.
"""

from collections import OrderedDict

import torch
from recbole.model.abstract_recommender import ContextRecommender
from torch import nn
from torch.nn.init import constant_, xavier_normal_


def named_mlp(sizes, dropout, bn):
    """``Linear -> [BatchNorm] -> ReLU -> Dropout`` per layer, named ``linear_i``, ``bn_i``,
    ``act_i``, ``dropout_i`` (so that name patterns such as ``*.bn_*`` select the BN layers)."""
    layers = OrderedDict()
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers[f"linear_{i}"] = nn.Linear(n_in, n_out)
        if bn:
            layers[f"bn_{i}"] = nn.BatchNorm1d(n_out)
        layers[f"act_{i}"] = nn.ReLU()
        layers[f"dropout_{i}"] = nn.Dropout(dropout)
    return nn.Sequential(layers)


def task_setup(config):
    """``(label_fields, task_names, chain)`` from the config (single-task: ``LABEL_FIELD``)."""
    fields = config["label_fields"] or [config["LABEL_FIELD"]]
    fields = [fields] if isinstance(fields, str) else list(fields)
    chain = bool(config["task_chain"])
    names = config["task_names"] or [
        "_".join(fields[: t + 1]) if chain else f for t, f in enumerate(fields)
    ]
    names = [names] if isinstance(names, str) else list(names)
    if len(names) != len(fields):
        raise ValueError(f"task_names {names} must name each of label_fields {fields}.")
    return fields, names, chain


class MMoE(ContextRecommender):
    """Multi-gate Mixture-of-Experts over RecBole's field embeddings."""

    multi_task = True  # the plugin's trainer evaluates each task (auc_<task>, logloss_<task>)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.label_fields, self.task_names, self.task_chain = task_setup(config)
        del self.first_order_linear  # built by ContextRecommender, unused by MMoE
        self.input_size = self.num_feature_field * self.embedding_size
        self.dropout_prob = config["dropout_prob"]
        self.expert_sizes = [self.input_size, *config["expert_mlp_sizes"]]
        self.experts = nn.ModuleDict({
            group: nn.ModuleList(named_mlp(self.expert_sizes, self.dropout_prob, bn=True)
                                 for _ in range(n))
            for group, n in self.expert_groups(config).items()
        })
        self.gate_inputs = [self.visible_experts(t) for t in range(self.n_tasks)]
        self.gates = nn.ModuleList(nn.Linear(self.input_size, len(v)) for v in self.gate_inputs)
        tower_sizes = [self.expert_sizes[-1], *config["tower_mlp_sizes"]]
        self.towers = nn.ModuleList(self._tower(tower_sizes) for _ in range(self.n_tasks))
        self.loss = nn.BCELoss()
        self.eval_task = 0
        self.apply(self._init_weights)

    @property
    def n_tasks(self):
        return len(self.label_fields)

    def expert_groups(self, config):
        """``{group: number of experts}``; MMoE: one ``shared`` group of ``n_experts``."""
        return {"shared": config["n_experts"]}

    def visible_experts(self, task):
        """``[(group, k)]``: the experts task ``task``'s gate mixes (MMoE: all of them)."""
        return [(g, k) for g, experts in self.experts.items() for k in range(len(experts))]

    def _tower(self, sizes):
        tower = named_mlp(sizes, self.dropout_prob, bn=False)
        tower.add_module("out", nn.Linear(sizes[-1], 1))
        return tower

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Embedding):
            xavier_normal_(module.weight.data)
        elif isinstance(module, nn.Linear):
            xavier_normal_(module.weight.data)
            if module.bias is not None:
                constant_(module.bias.data, 0)

    def forward(self, interaction):
        """Probabilities of every task, ``[B, T]``."""
        x = self.concat_embed_input_fields(interaction).flatten(1)  # [B, F * E]
        outputs = {(g, k): expert(x) for g, experts in self.experts.items()
                   for k, expert in enumerate(experts)}  # each [B, H]
        probs = []
        for t in range(self.n_tasks):
            stacked = torch.stack([outputs[e] for e in self.gate_inputs[t]], 1)  # [B, K_t, H]
            gate = torch.softmax(self.gates[t](x), dim=-1).unsqueeze(-1)  # [B, K_t, 1]
            probs.append(torch.sigmoid(self.towers[t]((gate * stacked).sum(1)).squeeze(-1)))
        return torch.stack(probs, 1)

    def task_labels(self, interaction):
        """The 0/1 label of every task, ``[B, T]`` (chained: cumulative products)."""
        labels = torch.stack([interaction[f].float() for f in self.label_fields], 1)
        return torch.cumprod(labels, 1) if self.task_chain else labels

    def calculate_loss(self, interaction):
        """Mean over tasks of the binary cross-entropy (a scalar)."""
        probs = self.forward(interaction).clamp(1e-7, 1 - 1e-7)
        return self.loss(probs, self.task_labels(interaction))

    def predict(self, interaction):
        """Probability of task ``eval_task``, ``[B]``."""
        return self.forward(interaction)[:, self.eval_task]
