"""Federated training: clients (one per market), a round-loop server and aggregation strategies.

No federated framework is imported; the contracts map one-to-one onto Flower's::

    Client.fit(global_params, round) -> (update, num_examples, metrics)
    Client.evaluate(global_params, phase) -> RecBole result dict
    Strategy.aggregate(round, [(client_id, update, num_examples)]) -> dict[str, Tensor]
        (a personalized strategy: -> (uniform, {client_id: own}), each node its own FitIns)

``train_federated`` is the quick start's entry (same return shape as the local mode).
"""

from recbole_cmr.federated.client import Client
from recbole_cmr.federated.personalized import PersonalizedConflictAverse
from recbole_cmr.federated.server import (
    FederatedServer,
    aggregate_round,
    build_clients,
    export_best,
    train_federated,
)
from recbole_cmr.federated.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedAvgRows,
    FedProx,
    FedYogi,
    ServerOptimizer,
    Strategy,
    get_strategy,
    make_strategy,
    register_strategy,
    select_shared,
)

__all__ = [
    "Client",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedAvgRows",
    "FedProx",
    "FedYogi",
    "PersonalizedConflictAverse",
    "ServerOptimizer",
    "make_strategy",
    "FederatedServer",
    "Strategy",
    "aggregate_round",
    "build_clients",
    "export_best",
    "get_strategy",
    "register_strategy",
    "select_shared",
    "train_federated",
]
