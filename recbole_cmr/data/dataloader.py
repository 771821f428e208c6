"""RecBole's evaluation loaders for one market: full ranking restricted to the market's catalogue,
and sampled ranking (``uni99``, ``pop100``) collated a batch at a time.

Contract: a batch is RecBole's ``(interaction, history_index, positive_u, positive_i)`` (sampled:
``(interaction, row_idx, positive_u, positive_i)``), except that when the market has foreign items
or ``mask_history_items`` is on, ``history_index`` is a :class:`ScoreMask`;
``MultiMarketTrainerMixin._full_sort_batch_eval`` applies it to the scores (RecBole's own trainer
rejects it with an IndexError instead of ranking unmasked).
"""

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader
from recbole.data.interaction import Interaction
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


class MarketNegSampleEvalDataLoader(NegSampleEvalDataLoader):
    """RecBole's ``NegSampleEvalDataLoader`` with the batch built at once: the same sampler calls
    in the same order (one per user, so the same negatives for the same random state) and the
    same rows, labels and indices as RecBole's per-user collation, without its per-user
    ``Interaction`` copies (on 300 test users: most of a sampled evaluation's time). A data
    ``transform`` (BERT4Rec's masking, ...) keeps RecBole's path."""

    def collate_fn(self, index):
        if (self.neg_sample_args["distribution"] == "none"
                or self.neg_sample_args["sample_num"] == "none"
                or self.config["transform"] is not None):
            return super().collate_fn(index)
        uids = self.uid_list[np.asarray(index)]
        counts = self.uid2items_num[uids]  # [n_users]: positives per user
        rows = np.concatenate([np.arange(self.uid2index[u].start, self.uid2index[u].stop)
                               for u in uids])  # [n_pos]: each user's rows, in order
        positives = self._dataset[torch.from_numpy(rows)]
        negatives = self._negatives(positives, counts)
        block, user = self._layout(counts)
        data = positives[torch.from_numpy(block)]
        first = np.cumsum(np.r_[0, counts * self.times])[:-1]  # [n_users]: each block's start
        is_positive = np.arange(len(block)) - np.repeat(first, counts * self.times) < counts[user]
        items = data[self.iid_field].clone()
        items[torch.from_numpy(~is_positive)] = negatives
        data.update(Interaction({self.iid_field: items,
                                 self.label_field: torch.from_numpy(is_positive.astype(np.float32))}))
        data = self._dataset.join(data)
        positive_u = np.repeat(np.arange(len(uids)), counts)
        return (data, torch.from_numpy(user).long(), torch.from_numpy(positive_u).long(),
                positives[self.iid_field])

    def _negatives(self, positives, counts):
        """Each user's negatives as RecBole draws them, one sampler call per user in order.

        Args:
            positives (Interaction): ``[n_pos]`` rows, users contiguous.
            counts (np.ndarray): ``[n_users]`` rows per user.

        Returns:
            torch.LongTensor: ``[n_pos * neg_sample_num]``, user by user, each user's in RecBole's
            order (the k-th negative of all the user's rows, then the (k+1)-th).
        """
        users = positives[self.uid_field].numpy()
        items = positives[self.iid_field].numpy()
        bounds = np.cumsum(np.r_[0, counts])
        return torch.cat([torch.as_tensor(self._sampler.sample_by_user_ids(
            users[start:end], items[start:end], self.neg_sample_num)).long()
            for start, end in zip(bounds[:-1], bounds[1:])])

    def _layout(self, counts):
        """RecBole's row layout of a batch: user by user, the user's rows repeated ``times``
        (positives first, then one copy per negative).

        Args:
            counts (np.ndarray): ``[n_users]`` rows per user.

        Returns:
            tuple: ``(block, user)``, each ``[n_pos * times]``: the positive row each output row
            copies, and its user's position in the batch.
        """
        user = np.repeat(np.arange(len(counts)), counts * self.times)
        start = np.cumsum(np.r_[0, counts])[:-1]  # each user's first positive row
        offset = np.arange(len(user)) - np.repeat(np.cumsum(np.r_[0, counts * self.times])[:-1],
                                                  counts * self.times)
        return start[user] + offset % counts[user], user


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
