"""recbole_cmr: cross-market, cross-domain and federated recommendation as a RecBole plugin.

Public API (RecBole's names, plugin-aware)::

    from recbole_cmr import run_recbole_cmr, objective_function, load_data_and_model
    from recbole_cmr import Config, create_dataset, data_preparation, get_model, get_trainer
"""

from recbole_cmr import compat  # noqa: F401  (must run before anything from recbole)

__version__ = "0.1.0"

from recbole_cmr.config import Config  # noqa: E402
from recbole_cmr.data import MultiMarketDataset, create_dataset, data_preparation  # noqa: E402
from recbole_cmr.quick_start import (  # noqa: E402
    load_data_and_model,
    objective_function,
    run_recbole_cmr,
)
from recbole_cmr.utils import get_model, get_trainer  # noqa: E402

__all__ = [
    "Config",
    "MultiMarketDataset",
    "create_dataset",
    "data_preparation",
    "get_model",
    "get_trainer",
    "load_data_and_model",
    "objective_function",
    "run_recbole_cmr",
]
