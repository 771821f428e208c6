"""AliExpress per-country CTR/CVR CSVs → multi-market RecBole atomic dataset.

Input: one CSV per market in the widely used format (Tianchi dataset 74690, as used by
MMoE/PLE/AITM baselines): ``search_id, categorical_1..16, numerical_1..63, click, conversion``.
Output: ``<market>.inter`` from the train CSV and, when a test CSV is given for the market,
``<market>.test.inter`` with the same fields.  ``search_id`` and ``categorical_k`` are
tokens, ``numerical_k``, ``click`` and ``conversion`` floats; values are copied verbatim
(after checking that the float columns parse and that the labels are 0 or 1).  There is no
user/item column and no .item.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import pandas as pd

from .atomic import (
    AtomicDataset,
    call_repr,
    check_binary,
    check_names,
    check_target,
    parse_float,
    read_table,
    require_rows,
    write_dataset,
)

logger = logging.getLogger(__name__)

CATEGORICAL = [f"categorical_{k}" for k in range(1, 17)]
NUMERICAL = [f"numerical_{k}" for k in range(1, 64)]
LABELS = ["click", "conversion"]
FIELDS = {
    "search_id": "token",
    **{c: "token" for c in CATEGORICAL},
    **{c: "float" for c in NUMERICAL + LABELS},
}
DESCRIPTION = (
    "AliExpress search logs with click and conversion labels (Tianchi dataset 74690), "
    "per-country CSVs in the widely used format (search_id, 16 categorical, 63 numerical "
    "features, click, conversion). `<market>.inter` is the train CSV; `<market>.test.inter`, "
    "when present, is the market's test CSV (same fields)."
)


def read_market(path: str | Path) -> pd.DataFrame:
    """One AliExpress CSV as strings, after checking the columns, float values and 0/1 labels."""
    path = Path(path)
    logger.info("reading %s", path)
    df = require_rows(read_table(path, ",", list(FIELDS)), path)
    for col, ftype in FIELDS.items():
        if col in LABELS:
            check_binary(df[col], col, path)
        elif ftype == "float":
            parse_float(df[col], col, path)
    extra = [c for c in df.columns if c not in FIELDS]
    if extra:
        logger.warning("%s: ignoring extra column(s) %s", path, ", ".join(extra))
    return df[list(FIELDS)]


def build_aliexpress(
    markets: Mapping[str, str | Path],
    *,
    test_markets: Mapping[str, str | Path] | None = None,
    name: str = "aliexpress",
    command: str | None = None,
) -> AtomicDataset:
    """Read the train (and optional test) CSV of every market."""
    test_markets = dict(test_markets or {})
    if not markets:
        raise ValueError("no market given (use --market NAME=path.csv)")
    unknown = sorted(set(test_markets) - set(markets))
    if unknown:
        raise ValueError(
            f"unknown market(s) {', '.join(unknown)} for a test file (train markets: "
            f"{', '.join(markets)})"
        )
    check_names(name, markets)
    paths = [Path(p) for p in [*markets.values(), *test_markets.values()]]
    return AtomicDataset(
        name=name,
        fmt="aliexpress",
        fields=dict(FIELDS),
        markets={m: read_market(p) for m, p in markets.items()},
        splits={m: {"test": read_market(p)} for m, p in test_markets.items()},
        sources=paths,
        description=DESCRIPTION,
        command=command
        or call_repr("convert_aliexpress", {m: str(p) for m, p in markets.items()},
                     test_markets={m: str(p) for m, p in test_markets.items()}, name=name),
    )


def convert_aliexpress(markets: Mapping[str, str | Path], out: str | Path, *,
                       overwrite: bool = False, **kwargs) -> Path:
    """Convert AliExpress CSVs to ``<out>/<name>``; see :func:`build_aliexpress`."""
    check_target(out, kwargs.get("name", "aliexpress"), overwrite)
    return write_dataset(build_aliexpress(markets, **kwargs), out, overwrite)
