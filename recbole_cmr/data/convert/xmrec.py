"""XMarket (XMRec) ``<market>_5core.txt`` files → multi-market RecBole atomic dataset.

Input: space-separated files with header ``userId itemId rate date`` (date ``YYYY-MM-DD``),
as published with FOREC (Bonab et al., "Cross-Market Product Recommendation", CIKM 2021).
Item tokens are the Amazon ASINs (shared across markets); user tokens are ``<market>_<userId>``
so that a user token belongs to exactly one market (a few raw XMRec user ids occur in two
markets).  Dates become unix seconds (UTC); the file order is kept, so ties in time stay
stable under RecBole's stable sort.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from .atomic import (
    AtomicDataset,
    call_repr,
    check_names,
    check_target,
    min_item_interactions,
    parse_dates,
    parse_float,
    read_table,
    require_dir,
    require_rows,
    sample_users,
    select_markets,
    write_dataset,
)

logger = logging.getLogger(__name__)

SUFFIX = "_5core.txt"
COLUMNS = ("userId", "itemId", "rate", "date")
FIELDS = {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float"}
DESCRIPTION = (
    "XMarket (XMRec) Electronics 5-core files as published with FOREC (Bonab et al., "
    "\"Cross-Market Product Recommendation\", CIKM 2021). Item tokens are Amazon ASINs shared "
    "across markets; user tokens are `<market>_<userId>`; `timestamp` is the review date in "
    "unix seconds (UTC, so many ties: the source file order is kept)."
)


def find_markets(src: str | Path) -> list[str]:
    """Market names of the ``<market>_5core.txt`` files in ``src`` (sorted)."""
    src = require_dir(src, "XMRec folder")
    return sorted(p.name[: -len(SUFFIX)] for p in src.glob(f"*{SUFFIX}") if p.is_file())


def read_market(path: Path, market: str) -> pd.DataFrame:
    """One market file as a frame with the output fields (file order kept)."""
    raw = require_rows(read_table(path, " ", COLUMNS), path)
    return pd.DataFrame(
        {
            "user_id": market + "_" + raw["userId"],
            "item_id": raw["itemId"],
            "rating": parse_float(raw["rate"], "rate", path),
            "timestamp": parse_dates(raw["date"], "date", path),
        }
    )


def build_xmrec(
    src: str | Path,
    *,
    name: str = "xmrec",
    markets: Sequence[str] | None = None,
    max_users_per_market: int | None = None,
    seed: int = 2026,
    min_item_inter: int | None = None,
    command: str | None = None,
) -> AtomicDataset:
    """Read the selected markets, apply the optional user sample and item filter."""
    src = require_dir(src, "XMRec folder")
    chosen = select_markets(find_markets(src), markets, src)
    check_names(name, chosen)
    paths = {m: src / f"{m}{SUFFIX}" for m in chosen}
    frames = {}
    for market, path in paths.items():
        logger.info("reading %s", path)
        frame = read_market(path, market)
        frames[market] = sample_users(frame, max_users_per_market, seed, market)
    frames = min_item_interactions(frames, min_item_inter)
    notes = _notes(max_users_per_market, seed, min_item_inter)
    return AtomicDataset(
        name=name,
        fmt="xmrec",
        fields=dict(FIELDS),
        markets=frames,
        sources=list(paths.values()),
        description=DESCRIPTION,
        notes=notes,
        command=command
        or call_repr(
            "convert_xmrec", src, name=name, markets=chosen,
            max_users_per_market=max_users_per_market, seed=seed, min_item_inter=min_item_inter,
        ),
    )


def _notes(max_users: int | None, seed: int, min_item_inter: int | None) -> list[str]:
    notes = []
    if max_users is not None:
        notes.append(
            f"per market a seeded random sample (seed {seed}) of at most {max_users} users"
        )
    if min_item_inter and min_item_inter > 1:
        notes.append(
            f"items with fewer than {min_item_inter} interactions over all written markets "
            "were dropped (one pass, after the user sample)"
        )
    return notes


def convert_xmrec(src: str | Path, out: str | Path, *, overwrite: bool = False, **kwargs) -> Path:
    """Convert XMRec files in ``src`` to ``<out>/<name>``; see :func:`build_xmrec`."""
    check_target(out, kwargs.get("name", "xmrec"), overwrite)
    return write_dataset(build_xmrec(src, **kwargs), out, overwrite)
