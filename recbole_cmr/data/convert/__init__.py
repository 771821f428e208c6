"""Converters from public data sets to multi-market RecBole atomic datasets.

Command line: ``python -m recbole_cmr.data.convert FORMAT --help`` with FORMAT one of xmrec,
unisrec, movielens, movielens-catalogues, aliexpress, ml100k-scenarios, ml100k-entities, ali-ccp,
amazon18, merge.
Each ``convert_<format>`` writes ``<out>/<name>/`` atomically (see :mod:`.atomic`) and
returns its path; ``build_<format>`` returns the in-memory :class:`AtomicDataset` instead.
"""

from .aliccp import build_aliccp, convert_aliccp
from .aliexpress import build_aliexpress, convert_aliexpress
from .amazon18 import build_amazon18, convert_amazon18
from .atomic import AtomicDataset, read_atomic, write_dataset
from .merge import build_merge, convert_merge
from .ml100k_entities import build_ml100k_entities, convert_ml100k_entities
from .ml100k_scenarios import build_ml100k_scenarios, convert_ml100k_scenarios
from .movielens import build_movielens, convert_movielens
from .movielens_catalogues import build_movielens_catalogues, convert_movielens_catalogues
from .unisrec import build_unisrec, convert_unisrec
from .xmrec import build_xmrec, convert_xmrec

__all__ = [
    "AtomicDataset",
    "build_aliccp",
    "build_aliexpress",
    "build_amazon18",
    "build_merge",
    "build_ml100k_entities",
    "build_ml100k_scenarios",
    "build_movielens",
    "build_movielens_catalogues",
    "build_unisrec",
    "build_xmrec",
    "convert_aliccp",
    "convert_aliexpress",
    "convert_amazon18",
    "convert_merge",
    "convert_ml100k_entities",
    "convert_ml100k_scenarios",
    "convert_movielens",
    "convert_movielens_catalogues",
    "convert_unisrec",
    "convert_xmrec",
    "read_atomic",
    "write_dataset",
]
