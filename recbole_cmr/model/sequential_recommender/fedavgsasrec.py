"""FedAvg-SASRec: the federated baseline of FeCoSR (plain CE, no adaptation, no fine-tuning).

RecBole's SASRec trained by recbole_cmr's federated server with FedAvg over all markets
(``train_mode: federated``, see properties/model/FedAvgSASRec.yaml).
"""

from recbole.model.sequential_recommender import SASRec

from recbole_cmr.model.sequential_recommender.market_softmax import MarketSoftmax


class FedAvgSASRec(MarketSoftmax, SASRec):
    """RecBole's SASRec, registered so that its yaml selects federated training
    (optionally with ``market_softmax``)."""
