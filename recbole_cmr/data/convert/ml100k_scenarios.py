"""MovieLens-100K ratings → the "ml100k-scenarios" multi-scenario, multi-task CTR dataset.

Input: RecBole's atomic ml-100k files ``ml-100k.inter`` (user_id, item_id, rating, timestamp),
``ml-100k.user`` (user_id, age, gender, occupation, zip_code) and ``ml-100k.item`` (item_id,
movie_title, release_year, class); by default the copy shipped in the recbole wheel
(``recbole/dataset_example/ml-100k``).

Scenarios (markets) are the users' age bands: ``under25`` (age < 25), ``25to34``, ``35to44``
and ``45plus`` (age >= 45).  Every rating is a positive row (click 1, conversion 1 if the
rating is >= 4, else 0), followed by ``negatives`` movies the user never rated (click 0,
conversion 0, the positive's timestamp), drawn uniformly from the movies of ``ml-100k.item``
the user has not rated, without replacement within one positive, from a generator seeded by
(seed, scenario).  Rows are sorted by user, then timestamp, a positive before its negatives,
so RecBole's per-user time-ordered ratio split keeps each user's latest rows for testing.
Per scenario ``<scenario>.user`` (age, gender, occupation); shared ``<name>.item``
(release_year, genre).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import (
    AtomicDataset,
    call_repr,
    check_target,
    market_rng,
    parse_float,
    read_atomic,
    require_dir,
    require_rows,
    write_dataset,
)

logger = logging.getLogger(__name__)

SCENARIOS = {  # scenario: [lowest age, highest age + 1) (None: unbounded)
    "under25": (None, 25),
    "25to34": (25, 35),
    "35to44": (35, 45),
    "45plus": (45, None),
}
# Other ways to cut the users into scenarios (``split``), for scenarios whose preferences
# conflict more than age bands do (issue 40): gender, or occupation groups.
GENDERS = {"female": ("F",), "male": ("M",)}
OCCUPATIONS = {
    "student": ("student",),
    "technical": ("engineer", "programmer", "scientist", "technician"),
    "arts_education": ("artist", "educator", "entertainment", "librarian", "writer"),
    "business_other": ("administrator", "doctor", "executive", "healthcare", "homemaker",
                       "lawyer", "marketing", "none", "other", "retired", "salesman"),
}
SPLITS = ("age", "gender", "occupation")
INTER_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
USER_COLUMNS = ("user_id", "age", "gender", "occupation")
ITEM_COLUMNS = ("item_id", "release_year", "class")
FIELDS = {
    "user_id": "token",
    "item_id": "token",
    "click": "float",
    "conversion": "float",
    "timestamp": "float",
}
USER_FIELDS = {"user_id": "token", "age": "token", "gender": "token", "occupation": "token"}
ITEM_FIELDS = {"item_id": "token", "release_year": "token", "genre": "token_seq"}
CONVERSION_RATING = 4.0
DESCRIPTION = (
    "MovieLens-100K ratings (GroupLens; research use) in RecBole's atomic ml-100k files, turned "
    "into a multi-scenario, multi-task CTR data set. Scenarios (markets) are the users' age "
    "bands: `under25` (age < 25), `25to34`, `35to44`, `45plus` (age >= 45); each user is in "
    "exactly one scenario. Every rating is a positive row: `click` = 1, `conversion` = 1 if the "
    "rating is >= 4, else 0. Each positive is followed by sampled negatives: movies of "
    "`ml-100k.item` the user never rated, drawn uniformly without replacement within one "
    "positive, each with `click` = 0, `conversion` = 0 and the positive's `timestamp`. Features: "
    "user id, age, gender, occupation (`<scenario>.user`; zip codes left out), item id, genre "
    "and release year (`<name>.item`; movie titles left out, a missing year stays empty)."
)


def default_source() -> tuple[Path, Path]:
    """RecBole's own ml-100k folder and the folder that holds the ``recbole`` package."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("recbole is not installed: give the ml-100k folder explicitly")
    package = Path(list(spec.submodule_search_locations)[0])
    return package / "dataset_example" / "ml-100k", package.parent


def scenario_of(ages: pd.Series) -> pd.Series:
    """The scenario name of each age (float)."""
    result = pd.Series(index=ages.index, dtype=object)
    for scenario, (low, high) in SCENARIOS.items():
        inside = pd.Series(True, index=ages.index)
        if low is not None:
            inside &= ages >= low
        if high is not None:
            inside &= ages < high
        result[inside] = scenario
    return result


def scenarios_by(users: pd.DataFrame, split: str, path: Path) -> tuple[pd.Series, dict]:
    """Each user's scenario under ``split`` and each scenario's rule (for the notes).

    Args:
        users (pd.DataFrame): :func:`read_users` output (``scenario`` holds the age band).
        split (str): ``age``, ``gender`` or ``occupation``.
        path (Path): the ``.user`` file, for errors.

    Returns:
        tuple: ``(scenario per user (pd.Series), {scenario: rule text})``.
    """
    if split == "age":
        return users["scenario"], {m: _age_band(m) for m in SCENARIOS}
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    column, groups = ("gender", GENDERS) if split == "gender" else ("occupation", OCCUPATIONS)
    of = {value: group for group, values in groups.items() for value in values}
    scenario = users[column].map(of)
    if scenario.isna().any():
        unknown = sorted(users.loc[scenario.isna(), column].unique())
        raise ValueError(f"{path}: {column} {unknown} belongs to no scenario of split {split!r} "
                         f"(known: {sorted(of)})")
    return scenario, {m: f"{column} in {', '.join(values)}" for m, values in groups.items()}


def _age_band(market: str) -> str:
    low, high = SCENARIOS[market]
    return (f"age < {high}" if low is None else f"age >= {low}" if high is None
            else f"{low} <= age < {high}")


def _no_missing(values: pd.Series, column: str, path: Path) -> None:
    """ValueError naming ``path`` and ``column`` if a parsed value is missing."""
    if values.isna().any():
        pos = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise ValueError(f"{path}: column {column!r} is empty on data line {pos + 1}")


def _unique_ids(df: pd.DataFrame, column: str, path: Path) -> None:
    dup = df[column][df[column].duplicated()]
    if len(dup):
        raise ValueError(f"{path}: {column} {dup.iloc[0]!r} occurs on more than one line")


def read_ratings(path: Path) -> pd.DataFrame:
    """``ml-100k.inter`` with float rating/timestamp (file order kept, no missing value)."""
    logger.info("reading %s", path)
    df = require_rows(read_atomic(path, INTER_COLUMNS), path)[list(INTER_COLUMNS)]
    for col in ("rating", "timestamp"):
        df[col] = parse_float(df[col], col, path)
        _no_missing(df[col], col, path)
    return df


def read_users(path: Path) -> pd.DataFrame:
    """``ml-100k.user``: the user fields (strings) and ``scenario`` from the age."""
    users = require_rows(read_atomic(path, USER_COLUMNS), path)
    _unique_ids(users, "user_id", path)
    ages = parse_float(users["age"], "age", path)
    _no_missing(ages, "age", path)
    return users[list(USER_COLUMNS)].assign(scenario=scenario_of(ages))


def read_items(path: Path) -> pd.DataFrame:
    """``ml-100k.item``: item_id, release_year and genre (the ``class`` tokens)."""
    items = require_rows(read_atomic(path, ITEM_COLUMNS), path)
    _unique_ids(items, "item_id", path)
    return pd.DataFrame(
        {"item_id": items["item_id"], "release_year": items["release_year"],
         "genre": items["class"].str.split().str.join(" ")}
    )


def _user_order(user_ids: pd.Series) -> pd.Series:
    """Sort key of user tokens: numeric when every token is a number, else the token."""
    numeric = pd.to_numeric(user_ids, errors="coerce")
    return numeric if numeric.notna().all() else user_ids


def _distinct_draws(rng: np.random.Generator, n: int, rows: int, k: int) -> np.ndarray:
    """``rows`` x ``k`` integers in [0, n), distinct within a row, each row a uniform ordered
    sample without replacement: draw j is uniform over the n - j values not drawn yet."""
    picks = np.empty((rows, k), dtype=np.int64)
    for j in range(k):
        value = rng.integers(0, n - j, size=rows)
        for earlier in np.sort(picks[:, :j], axis=1).T:  # skip the drawn ones, smallest first
            value += value >= earlier
        picks[:, j] = value
    return picks


def sample_negatives(
    positives: pd.DataFrame, catalogue: pd.Index, k: int, rng: np.random.Generator, path: Path
) -> np.ndarray:
    """``len(positives)`` x ``k`` item ids the positive's user never rated (``positives`` is
    grouped by user; users are drawn in their order)."""
    item_pos = catalogue.get_indexer(positives["item_id"])
    out = np.empty((len(positives), k), dtype=np.int64)
    users = positives["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(users)]):
        rated = np.unique(item_pos[start:stop])
        free = len(catalogue) - len(rated)
        if free < k:
            raise ValueError(
                f"{path}: user {users[start]!r} rated {len(rated)} of the {len(catalogue)} "
                f"movies: fewer than {k} unrated movies left for negative sampling"
            )
        draws = _distinct_draws(rng, free, stop - start, k)
        # the draws-th unrated movie: skip every rated position at or below it
        gaps = rated - np.arange(len(rated))
        out[start:stop] = draws + np.searchsorted(gaps, draws, side="right")
    return catalogue.to_numpy()[out]


def scenario_rows(
    ratings: pd.DataFrame, catalogue: pd.Index, k: int, rng: np.random.Generator, path: Path
) -> pd.DataFrame:
    """One scenario's rows: each rating (by user, time, file order) then its ``k`` negatives."""
    positives = ratings.sort_values("timestamp", kind="stable")
    positives = positives.iloc[np.argsort(_user_order(positives["user_id"]).to_numpy(),
                                          kind="stable")]
    n, width = len(positives), k + 1
    is_pos = np.zeros(n * width, dtype=bool)
    is_pos[::width] = True
    items = np.empty((n, width), dtype=object)
    items[:, 0] = positives["item_id"].to_numpy()
    items[:, 1:] = sample_negatives(positives, catalogue, k, rng, path)
    conversion = (positives["rating"].to_numpy() >= CONVERSION_RATING).astype(float)
    return pd.DataFrame(
        {
            "user_id": np.repeat(positives["user_id"].to_numpy(), width),
            "item_id": items.ravel(),
            "click": is_pos.astype(float),
            "conversion": np.where(is_pos, np.repeat(conversion, width), 0.0),
            "timestamp": np.repeat(positives["timestamp"].to_numpy(), width),
        }
    )


def read_ml100k(src, negatives):
    """``(paths, ratings, users, items, source_root)`` of the ml-100k files in ``src`` (None:
    recbole's copy, whose folder is ``source_root``), every rating's user and item checked."""
    if negatives < 1:
        raise ValueError(f"negatives per positive must be >= 1, got {negatives}")
    source_root = None
    if src is None:
        src, source_root = default_source()
    src = require_dir(src, "ml-100k folder")
    paths = {k: src / f"ml-100k.{k}" for k in ("inter", "user", "item")}
    ratings = read_ratings(paths["inter"])
    users = read_users(paths["user"])
    items = read_items(paths["item"])
    for col, table, path in (("user_id", users, paths["user"]), ("item_id", items, paths["item"])):
        unknown = ratings.loc[~ratings[col].isin(table[col]), col]
        if len(unknown):
            raise ValueError(
                f"{path}: no row for {col} {unknown.iloc[0]!r} of {paths['inter']} "
                f"({unknown.nunique()} missing)"
            )
    return paths, ratings, users, items, source_root


def build_ml100k_scenarios(
    src: str | Path | None = None,
    *,
    name: str = "ml100k-scenarios",
    seed: int = 2026,
    negatives: int = 4,
    split: str = "age",
    command: str | None = None,
) -> AtomicDataset:
    """Read the ml-100k files in ``src`` (default: recbole's copy) and build the scenarios of
    ``split``: the four age bands (default), ``gender`` (female, male) or ``occupation`` (the
    groups of ``OCCUPATIONS``)."""
    paths, ratings, users, items, source_root = read_ml100k(src, negatives)
    by_user, rules = scenarios_by(users, split, paths["user"])
    users = users.assign(scenario=by_user)
    catalogue = pd.Index(items["item_id"])
    scenario = ratings["user_id"].map(dict(zip(users["user_id"], users["scenario"])))
    markets, tables, notes = {}, {}, []
    for market in rules:
        mine = ratings[scenario == market]
        if len(mine) == 0:
            raise ValueError(f"{paths['inter']}: no rating of a user in scenario {market!r}")
        logger.info("scenario %s: %d ratings", market, len(mine))
        rows = scenario_rows(mine, catalogue, negatives, market_rng(seed, market), paths["inter"])
        markets[market] = rows
        tables[market] = users.loc[users["scenario"] == market, list(USER_FIELDS)]
        notes.append(_scenario_note(market, rules[market], mine, rows))
    notes += _method_notes(seed, negatives, source_root is not None)
    return AtomicDataset(
        name=name,
        fmt="ml100k-scenarios",
        fields=dict(FIELDS),
        markets=markets,
        items=items,
        item_fields=dict(ITEM_FIELDS),
        users=tables,
        user_fields=dict(USER_FIELDS),
        sources=list(paths.values()),
        source_root=source_root,
        description=DESCRIPTION if split == "age" else DESCRIPTION.replace(
            "Scenarios (markets) are the users' age bands: `under25` (age < 25), `25to34`, "
            "`35to44`, `45plus` (age >= 45)", f"Scenarios (markets) are the users' {split} "
            f"groups: " + "; ".join(f"`{m}`: {rule}" for m, rule in rules.items())),
        notes=notes,
        command=command
        or call_repr("convert_ml100k_scenarios", src, name=name, seed=seed, negatives=negatives,
                     **({} if split == "age" else {"split": split})),
    )


def _scenario_note(market: str, band: str, ratings: pd.DataFrame, rows: pd.DataFrame) -> str:
    return (
        f"scenario `{market}` ({band}): {ratings['user_id'].nunique()} users, {len(ratings)} "
        f"ratings -> {len(rows)} rows, {int(rows['click'].sum())} clicks, "
        f"{int(rows['conversion'].sum())} conversions"
    )


def _method_notes(seed: int, negatives: int, default_src: bool) -> list[str]:
    notes = [
        f"negative sampling: {negatives} per positive, uniform over the movies of ml-100k.item "
        "the user never rated, without replacement within one positive (a movie may recur "
        f"across a user's positives); numpy default_rng seeded by (seed {seed}, crc32 of the "
        "scenario name), so the same seed gives byte-identical files",
        "labels: positive `click` 1, `conversion` 1 if rating >= 4 else 0; negative both 0",
        "row order: by user, then timestamp (ties: ml-100k.inter order), each positive followed "
        "by its negatives (same timestamp)",
        "split recipe (RecBole): `eval_args: {split: {RS: [0.8, 0.1, 0.1]}, order: TO, "
        "group_by: user, mode: labeled}` keeps the last 10 % of each user's rows for test and "
        "the 10 % before for validation (a boundary may fall inside a positive's group)",
    ]
    if default_src:
        version = importlib.metadata.version("recbole")
        notes.append(f"source: the ml-100k atomic files shipped in the recbole {version} wheel")
    return notes


def convert_ml100k_scenarios(
    src: str | Path | None, out: str | Path, *, overwrite: bool = False, **kwargs
) -> Path:
    """Convert ml-100k to ``<out>/<name>``; see :func:`build_ml100k_scenarios`."""
    check_target(out, kwargs.get("name", "ml100k-scenarios"), overwrite)
    return write_dataset(build_ml100k_scenarios(src, **kwargs), out, overwrite)
