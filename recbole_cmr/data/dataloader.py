"""RecBole's full-ranking loader, restricted to one market's catalogue."""

import torch
from recbole.data.dataloader import FullSortEvalDataLoader


class MarketFullSortEvalDataLoader(FullSortEvalDataLoader):
    """``FullSortEvalDataLoader`` that also masks the items foreign to the market.

    The mask travels in RecBole's ``history_index`` slot, so RecBole's own
    ``Trainer._full_sort_batch_eval`` sets those scores to ``-inf``.

    Args:
        foreign_items (torch.LongTensor | None): ids of items never occurring in the market,
            shape ``[n_foreign]``; None or empty = nothing to mask.
    """

    def __init__(self, config, dataset, sampler, shuffle=False, foreign_items=None):
        if foreign_items is not None and len(foreign_items) == 0:
            foreign_items = None
        self.foreign_items = None if foreign_items is None else torch.as_tensor(foreign_items)
        super().__init__(config, dataset, sampler, shuffle=shuffle)

    def collate_fn(self, index):
        interaction, history_index, positive_u, positive_i = super().collate_fn(index)
        if self.foreign_items is not None:
            history_index = self._add_foreign_mask(history_index, len(interaction))
        return interaction, history_index, positive_u, positive_i

    def _add_foreign_mask(self, history_index, n_rows):
        if history_index is None:  # sequential: no history, mask whole columns
            return (slice(None), self.foreign_items)
        rows = torch.arange(n_rows).repeat_interleave(len(self.foreign_items))
        cols = self.foreign_items.repeat(n_rows)
        history_u, history_i = history_index
        return torch.cat([history_u, rows]), torch.cat([history_i, cols])
