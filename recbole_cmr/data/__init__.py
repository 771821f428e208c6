"""Multi-market data on RecBole's datasets and loaders."""

from recbole_cmr.data.dataset import MultiMarketDataset
from recbole_cmr.data.utils import create_dataset, data_preparation, pooled_train_data

__all__ = ["MultiMarketDataset", "create_dataset", "data_preparation", "pooled_train_data"]
