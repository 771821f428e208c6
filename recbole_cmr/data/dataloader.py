"""RecBole's full-ranking loader, restricted to one market's catalogue.

Contract: a batch is RecBole's ``(interaction, history_index, positive_u, positive_i)``, except that
when the market has foreign items or ``mask_history_items`` is on, ``history_index`` is a
:class:`ScoreMask`; ``MultiMarketTrainerMixin._full_sort_batch_eval`` applies it to the scores
(RecBole's own trainer rejects it with an IndexError instead of ranking unmasked).
"""

import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import ModelType


class ScoreMask:
    """The items whose full-ranking scores become ``-inf`` in one evaluation batch.

    Args:
        history (tuple[torch.LongTensor, torch.LongTensor] | None): ``(rows, items)``, each
            ``[n_masked]``: per-row items (RecBole's ``history_index``); None = none.
        items (torch.BoolTensor | None): ``[n_items]``, True = masked in every row (the items
            foreign to the market); None = none.
    """

    def __init__(self, history=None, items=None):
        self.history = history
        self.items = items

    def fill_(self, scores):
        """Set the masked entries of ``scores`` (``[B, n_items]``) to ``-inf`` in place, on the
        scores' device; the column mask broadcasts over rows (memory ``O(n_items)``)."""
        if self.history is not None:
            scores[tuple(index.to(scores.device) for index in self.history)] = float("-inf")
        if self.items is not None:
            scores.masked_fill_(self.items.to(scores.device), float("-inf"))
        return scores


def catalogue_mask(dataset, n_items):
    """Bool ``[n_items]``: the items of the market(s) a split belongs to (its
    ``market_catalogue``, every split of the market); None when it has none."""
    catalogue = getattr(dataset, "market_catalogue", None)
    if catalogue is None:
        return None
    mask = torch.zeros(n_items, dtype=torch.bool)
    mask[torch.as_tensor(catalogue, dtype=torch.long)] = True
    return mask


def foreign_item_mask(dataset):
    """Bool ``[item_num]``: the items foreign to ``dataset``'s market (padding excluded); None
    when there are none (or the split names no market catalogue)."""
    catalogue = catalogue_mask(dataset, dataset.item_num)
    if catalogue is None:
        return None
    foreign = ~catalogue
    foreign[0] = False
    return foreign if foreign.any() else None


def sequence_history(interaction, config):
    """``(rows, items)`` of every item in each row's input sequence (``item_id_list`` up to
    ``item_length``) except the row's target item, which is never masked.

    Args:
        interaction (Interaction): ``item_id_list`` ``[B, L]``, ``item_length`` ``[B]``,
            ``item_id`` ``[B]``.

    Returns:
        tuple[torch.LongTensor, torch.LongTensor]: rows and item ids, each ``[n_masked]``.
    """
    sequence = interaction[config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]]
    length = interaction[config["ITEM_LIST_LENGTH_FIELD"]]
    target = interaction[config["ITEM_ID_FIELD"]]
    positions = torch.arange(sequence.shape[1], device=sequence.device)
    keep = (positions[None, :] < length[:, None]) & (sequence != target[:, None])
    rows, columns = keep.nonzero(as_tuple=True)
    return rows, sequence[rows, columns]


class MarketFullSortEvalDataLoader(FullSortEvalDataLoader):
    """``FullSortEvalDataLoader`` that also masks the items foreign to the split's market (its
    ``market_catalogue``) and, with ``mask_history_items`` (sequential models only), each row's
    input sequence."""

    def __init__(self, config, dataset, sampler, shuffle=False):
        self.item_mask = foreign_item_mask(dataset)
        self.mask_history = check_mask_history_items(config)
        super().__init__(config, dataset, sampler, shuffle=shuffle)

    def collate_fn(self, index):
        interaction, history_index, positive_u, positive_i = super().collate_fn(index)
        if self.mask_history:
            history_index = sequence_history(interaction, self.config)
        if self.item_mask is not None or self.mask_history:
            history_index = ScoreMask(history_index, self.item_mask)
        return interaction, history_index, positive_u, positive_i


def check_mask_history_items(config):
    """``config['mask_history_items']`` as a bool (its type is checked with every setting's, in
    ``Config``); True must come with a sequential model and full ranking in every evaluation phase
    (``eval_args`` mode), or it is an error."""
    if not config["mask_history_items"]:
        return False
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise ValueError(
            f"mask_history_items: True masks a sequential model's input sequence, but "
            f"{config['model']} is not sequential (RecBole already masks each user's training "
            "history in full ranking): remove mask_history_items.")
    sampled = {phase: mode for phase, mode in config["eval_args"]["mode"].items() if mode != "full"}
    if sampled:
        raise ValueError(
            f"mask_history_items: True needs full ranking, but eval_args mode is {sampled}: set "
            "eval_args mode to full, or mask_history_items to False.")
    return True
