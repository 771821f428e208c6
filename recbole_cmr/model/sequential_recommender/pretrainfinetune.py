"""PretrainFinetune: the one-to-one transfer baseline of FeCoSR.

RecBole's SASRec trained on one source market, then a copy fine-tuned on each target market
(``train_mode: transfer``, see properties/model/PretrainFinetune.yaml); the source market also
reports its results under each fine-tuned model (``after_transfer``).
"""

from recbole.model.sequential_recommender import SASRec

from recbole_cmr.model.sequential_recommender.market_softmax import MarketSoftmax


class PretrainFinetune(MarketSoftmax, SASRec):
    """RecBole's SASRec, registered so that its yaml selects one-to-one transfer (optionally with
    ``market_softmax``: each target's copy then trains over that target's own items)."""
