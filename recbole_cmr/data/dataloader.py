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
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.model.sequential_recommender import CORE, SHAN, GRU4RecCPR, SASRecCPR
from recbole.utils import EvaluatorType, ModelType

from recbole_cmr.data.sampler import negatives_by_user
from recbole_cmr.utils import get_model


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


# Sequential models whose ``full_sort_predict`` does not give an item the score ``predict`` gives
# it, so sampled evaluation keeps RecBole's ``predict`` path for them (RecBole 1.2.1): CORE
# (``predict`` scores un-normalised item embeddings, ``full_sort_predict`` normalised ones), SHAN
# (``predict`` encodes the inverse sequence, ``full_sort_predict`` the sequence itself), and
# GRU4RecCPR / SASRecCPR (``predict`` is unsupported: RecBole's own error stays).
PREDICT_ONLY = (CORE, SHAN, GRU4RecCPR, SASRecCPR)


def scores_from_one_encoding(model_class):
    """True when a sampled evaluation (``uni99``, ``pop100``) of ``model_class`` can take each
    user's candidates' scores from one ``full_sort_predict`` of the user's sequence: a sequential
    model that implements ``full_sort_predict`` with ``predict``'s scores (not in
    :data:`PREDICT_ONLY`)."""
    return (getattr(model_class, "type", None) == ModelType.SEQUENTIAL
            and not issubclass(model_class, PREDICT_ONLY)
            and model_class.full_sort_predict is not AbstractRecommender.full_sort_predict)


def first_rows(row_idx, n_users):
    """The first row of each user in a sampled-evaluation batch.

    Args:
        row_idx (torch.LongTensor): ``[n_rows]``, each row's user (``0 .. n_users - 1``).
        n_users (int): the users in the batch.

    Returns:
        torch.LongTensor: ``[n_users]``, on ``row_idx``'s device.
    """
    rows = torch.arange(len(row_idx), device=row_idx.device)
    first = torch.full((n_users,), len(row_idx), dtype=torch.long, device=row_idx.device)
    return first.scatter_reduce_(0, row_idx, rows, "amin")


def shares_sequence(interaction, row_idx, first, config):
    """True when every row has its user's first row's sequence: the same user id, sequence
    length and list fields (``item_id_list``, ...; one row per user in a leave-one-out split,
    several positives per user in others, whose sequences may differ).

    Args:
        interaction (Interaction): the batch, ``[n_rows]`` rows.
        row_idx (torch.LongTensor): ``[n_rows]``, each row's user.
        first (torch.LongTensor): ``[n_users]``, each user's first row.
    """
    suffix = config["LIST_SUFFIX"]
    own = (config["USER_ID_FIELD"], config["ITEM_LIST_LENGTH_FIELD"])
    representative = first[row_idx]  # [n_rows]
    return all(torch.equal(interaction[field], interaction[field][representative])
               for field in interaction.columns if field.endswith(suffix) or field in own)


class SampledBatch:
    """One batch of a sampled evaluation: each user's positive rows and their sampled negatives.

    It unpacks and indexes as RecBole's batch, ``interaction, row_idx, positive_u, positive_i
    = batch``, building RecBole's rows only then (:meth:`expand`: the user's positive rows, then
    one copy of them per negative, with RecBole's labels and joined features). A trainer that
    scores each user's candidates from one sequence encoding reads :meth:`user_rows` and
    :meth:`candidates` instead, without the ``[n_users * (1 + neg_sample_num)]`` copies.

    Args:
        positives (Interaction): ``[n_pos]`` rows, users contiguous, in the batch's user order.
        negatives (torch.LongTensor): ``[n_pos * neg_sample_num]``, user by user, each user's in
            RecBole's order (the k-th negative of all the user's rows, then the (k+1)-th).
        counts (np.ndarray): ``[n_users]`` positive rows per user.
        loader (MarketNegSampleEvalDataLoader): the loader (fields, ``times``, the dataset).
    """

    def __init__(self, positives, negatives, counts, loader):
        self.positives, self.negatives, self.counts = positives, negatives, counts
        self.loader = loader
        self._expanded = None

    def __iter__(self):
        return iter(self.expand())

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.expand()[index]

    @property
    def n_users(self):
        return len(self.counts)

    def positive_u(self):
        """``[n_pos]``: each positive row's user in the batch (``0 .. n_users - 1``)."""
        return torch.from_numpy(np.repeat(np.arange(self.n_users), self.counts)).long()

    def positive_i(self):
        """``[n_pos]``: each positive row's item."""
        return self.positives[self.loader.iid_field]

    def _first_positive(self):
        return torch.from_numpy(np.cumsum(np.r_[0, self.counts])[:-1]).long()

    def one_sequence_per_user(self):
        """True when all of each user's positive rows (so all its candidates) hold one input
        sequence (always with one positive per user: leave-one-out splits)."""
        if self.counts.max() == 1:
            return True
        return shares_sequence(self.positives, self.positive_u(), self._first_positive(),
                               self.loader.config)

    def user_rows(self):
        """Interaction ``[n_users]``: each user's first positive row, with joined features."""
        return self.loader._dataset.join(self.positives[self._first_positive()])

    def _layout(self):
        """RecBole's row layout: ``(block, user, is_positive)``, each ``[n_rows]``: the positive
        row each output row copies, its user, and whether it is the positive itself."""
        counts, times = self.counts, self.loader.times
        sizes = counts * times
        user = np.repeat(np.arange(self.n_users), sizes)
        offset = np.arange(len(user)) - np.repeat(np.cumsum(np.r_[0, sizes])[:-1], sizes)
        start = np.cumsum(np.r_[0, counts])[:-1]  # each user's first positive row
        return start[user] + offset % counts[user], user, offset < counts[user]

    def candidates(self):
        """``(row_idx, items)``, each ``[n_rows]`` in RecBole's row order: every candidate's user
        (score row) and item id."""
        block, user, is_positive = self._layout()
        items = self.positives[self.loader.iid_field][torch.from_numpy(block)].clone()
        items[torch.from_numpy(~is_positive)] = self.negatives
        return torch.from_numpy(user).long(), items

    def expand(self):
        """RecBole's batch ``(interaction [n_rows], row_idx [n_rows], positive_u [n_pos],
        positive_i [n_pos])``, identical to ``NegSampleEvalDataLoader``'s per-user collation."""
        if self._expanded is None:
            block, _, is_positive = self._layout()
            row_idx, items = self.candidates()
            data = self.positives[torch.from_numpy(block)]
            data.update(Interaction({self.loader.iid_field: items}))
            data = self.loader._dataset.join(data)
            data.update(Interaction({self.loader.label_field:
                                     torch.from_numpy(is_positive.astype(np.float32))}))
            self._expanded = (data, row_idx, self.positive_u(), self.positive_i())
        return self._expanded

    def parts(self, n_users):
        """This batch as batches of at most ``n_users`` users each, in order."""
        bounds = np.cumsum(np.r_[0, self.counts])
        for start in range(0, self.n_users, n_users):
            stop = min(start + n_users, self.n_users)
            rows = torch.arange(int(bounds[start]), int(bounds[stop]))
            neg = self.loader.neg_sample_num
            negatives = self.negatives[int(bounds[start]) * neg:int(bounds[stop]) * neg]
            yield SampledBatch(self.positives[rows], negatives, self.counts[start:stop],
                               self.loader)


class MarketNegSampleEvalDataLoader(NegSampleEvalDataLoader):
    """RecBole's ``NegSampleEvalDataLoader`` with the batch built at once: RecBole's negatives
    (the same draws in the same order, :func:`negatives_by_user`) and the same rows, labels and
    indices as RecBole's per-user collation, without its per-user ``Interaction`` copies. A batch is a :class:`SampledBatch`, which unpacks as RecBole's.

    A model that scores each user's candidates from one encoding
    (:func:`scores_from_one_encoding`) with one positive per user (leave-one-out) gets
    ``eval_batch_size`` users per batch, as its full ranking does (RecBole's batches hold
    ``eval_batch_size`` rows, 100 per user under ``uni99``). A data ``transform`` (BERT4Rec's
    masking, ...) keeps RecBole's collation."""

    def _init_batch_size_and_step(self):
        super()._init_batch_size_and_step()
        if self.users_per_batch():
            self.step = self.config["eval_batch_size"]
            self.set_batch_size(self.step * self.times)

    def sampling(self):
        """True when batches are collated here (negative sampling on, no data ``transform``)."""
        return (self.neg_sample_args["distribution"] != "none"
                and self.neg_sample_args["sample_num"] != "none"
                and self.config["transform"] is None)

    def users_per_batch(self):
        """True when a batch holds ``eval_batch_size`` users (not rows): see the class. Not with
        ``worker`` processes, whose batches cross as RecBole's rows."""
        return (self.sampling() and not self.config["worker"]
                and self.config["eval_type"] == EvaluatorType.RANKING
                and len(self.uid2items_num) > 0 and self.uid2items_num.max() == 1
                and scores_from_one_encoding(get_model(self.config["model"])))

    def collate_fn(self, index):
        if not self.sampling():
            return super().collate_fn(index)
        uids = self.uid_list[np.asarray(index)]
        counts = self.uid2items_num[uids]  # [n_users]: positives per user
        rows = np.concatenate([np.arange(self.uid2index[u].start, self.uid2index[u].stop)
                               for u in uids])  # [n_pos]: each user's rows, in order
        positives = self._dataset[torch.from_numpy(rows)]
        batch = SampledBatch(positives, self._negatives(positives, counts), counts, self)
        return tuple(batch.expand()) if self.config["worker"] else batch  # workers: plain data

    def _negatives(self, positives, counts):
        """Each user's negatives as RecBole draws them (:func:`negatives_by_user`).

        Args:
            positives (Interaction): ``[n_pos]`` rows, users contiguous.
            counts (np.ndarray): ``[n_users]`` rows per user.

        Returns:
            torch.LongTensor: ``[n_pos * neg_sample_num]``.
        """
        return negatives_by_user(self._sampler, positives[self.uid_field].numpy(),
                                 positives[self.iid_field].numpy(), counts, self.neg_sample_num)


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
