"""MovieLens-100K ratings → the "ml100k-entities" multi-entity CTR dataset (MKT's setting).

Two entity types of one platform share its users but have different item schemas:

* ``source``: movies whose genres include none of ``TARGET_GENRES``; specific item fields
  ``release_year`` and ``genre`` (``source.item``);
* ``target``: movies with at least one of ``TARGET_GENRES``; specific item field
  ``title_cluster``, the k-means cluster (k = 32) of the sentence-transformers embedding of the
  movie title (``target.item``), and no year.

Rows of an entity: every rating of one of its movies (``label`` 1 if the rating is >= 4, else 0),
each positive followed by ``negatives`` movies of the same entity the user never rated (label 0,
the positive's timestamp; seeded by (seed, entity)). Rows are sorted by user, then time, so
RecBole's time-ordered per-user ratio split tests each user's latest rows. ``<entity>.user``:
age, gender, occupation. Per-user click histories per entity are built by the dataset
(``history_fields``) after the split, from the entity's training-split clicks strictly before each
row's time.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import AtomicDataset, call_repr, check_target, market_rng, read_atomic, write_dataset
from .ml100k_scenarios import USER_FIELDS, _user_order, read_ml100k, sample_negatives

logger = logging.getLogger(__name__)

TARGET_GENRES = ("Documentary", "Film-Noir", "Horror", "Western", "Musical", "Mystery")
ENTITIES = ("source", "target")
FIELDS = {"user_id": "token", "item_id": "token", "label": "float", "timestamp": "float"}
ITEM_FIELDS = {
    "source": {"item_id": "token", "release_year": "token", "genre": "token_seq"},
    "target": {"item_id": "token", "title_cluster": "token"},
}
LABEL_RATING = 4.0
DESCRIPTION = (
    "MovieLens-100K ratings (GroupLens; research use) in RecBole's atomic ml-100k files, turned "
    "into a two-entity CTR data set whose entities share users but not their item schema. "
    f"Entity `target`: movies with at least one of the genres {', '.join(TARGET_GENRES)}; "
    "entity `source`: all other movies. Every rating is a row with `label` = 1 if the rating is "
    ">= 4, else 0; each positive is followed by sampled negatives, movies of the same entity "
    "the user never rated (label 0, the positive's timestamp). Features: user id, age, gender, "
    "occupation (`<entity>.user`); source items: release year and genres (`source.item`); "
    "target items: a title-text cluster id (`target.item`, k-means over sentence-transformers "
    "embeddings of the titles)."
)


def entity_of(genres: pd.Series) -> pd.Series:
    """``target`` for the movies with one of ``TARGET_GENRES``, else ``source``."""
    hit = genres.fillna("").str.split().apply(lambda g: bool(set(g) & set(TARGET_GENRES)))
    return hit.map({True: "target", False: "source"})


def title_clusters(titles: pd.Series, k: int, seed: int, encoder=None) -> np.ndarray:
    """k-means cluster id (0..k-1) of each title's sentence embedding (default encoder:
    all-MiniLM-L6-v2, shipped offline); scikit-learn's KMeans seeded with ``seed``."""
    from sklearn.cluster import KMeans

    from recbole_cmr.data.text import DEFAULT_TEXT_ENCODER, item_text_embeddings

    if len(titles) < k:
        raise ValueError(f"{len(titles)} target titles cannot form {k} clusters")
    tokens = [str(i) for i in range(len(titles))]
    emb = item_text_embeddings(tokens, dict(zip(tokens, titles.fillna("").astype(str))),
                               encoder=encoder or DEFAULT_TEXT_ENCODER, cache_dir=None,
                               show_progress=False).numpy().astype(np.float64)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)


def entity_rows(ratings: pd.DataFrame, catalogue: pd.Index, k: int, rng: np.random.Generator,
                path: Path) -> pd.DataFrame:
    """One entity's rows: each rating (by user, time, file order), a positive followed by its
    ``k`` negatives; negatives avoid every movie of the entity the user rated."""
    rated = ratings.sort_values("timestamp", kind="stable")
    rated = rated.iloc[np.argsort(_user_order(rated["user_id"]).to_numpy(), kind="stable")]
    drawn = sample_negatives(rated, catalogue, k, rng, path)
    label = (rated["rating"].to_numpy() >= LABEL_RATING)
    width = np.where(label, k + 1, 1)
    items = [np.r_[[item], drawn[i]] if label[i] else np.array([item], dtype=object)
             for i, item in enumerate(rated["item_id"].to_numpy())]
    is_first = np.zeros(width.sum(), dtype=bool)
    is_first[np.r_[0, np.cumsum(width)[:-1]]] = True
    return pd.DataFrame({
        "user_id": np.repeat(rated["user_id"].to_numpy(), width),
        "item_id": np.concatenate(items),
        "label": np.where(is_first, np.repeat(label.astype(float), width), 0.0),
        "timestamp": np.repeat(rated["timestamp"].to_numpy(), width),
    })


def build_ml100k_entities(
    src: str | Path | None = None,
    *,
    name: str = "ml100k-entities",
    seed: int = 2026,
    negatives: int = 2,
    clusters: int = 32,
    encoder: str | None = None,
    unrelated_source: bool = False,
    command: str | None = None,
) -> AtomicDataset:
    """Read the ml-100k files in ``src`` (default: recbole's copy) and build the two entities.

    ``unrelated_source``: each user's source ratings are another user's (a seeded permutation
    of the users), so the source entity holds real behaviour that tells nothing about the
    target's user: a source a multi-entity model should learn to filter (issue 40)."""
    paths, ratings, users, items, source_root = read_ml100k(src, negatives)
    items["title"] = read_atomic(paths["item"], ("item_id", "movie_title"))["movie_title"].to_numpy()
    items["entity"] = entity_of(items["genre"])
    target = items["entity"] == "target"
    items.loc[target, "title_cluster"] = title_clusters(items.loc[target, "title"], clusters, seed,
                                                        encoder).astype(str)
    entity = ratings["item_id"].map(dict(zip(items["item_id"], items["entity"])))
    notes = []
    if unrelated_source:
        ratings, moved = permute_users(ratings, entity == "source", market_rng(seed, "unrelated"))
        notes.append(f"unrelated source: each user's source ratings are another user's (a "
                     f"seeded permutation of the {moved} users; seed {seed}); target unchanged")
    markets, item_tables, user_tables = {}, {}, {}
    for market in ENTITIES:
        mine = ratings[entity == market]
        if len(mine) == 0:
            raise ValueError(f"{paths['inter']}: no rating of a {market} movie")
        catalogue = pd.Index(items.loc[items["entity"] == market, "item_id"])
        rows = entity_rows(mine, catalogue, negatives, market_rng(seed, market), paths["inter"])
        markets[market] = rows
        item_tables[market] = items.loc[items["entity"] == market, list(ITEM_FIELDS[market])]
        user_tables[market] = users.loc[users["user_id"].isin(set(rows["user_id"])), list(USER_FIELDS)]
        notes.append(f"entity `{market}`: {len(catalogue)} movies, {rows['user_id'].nunique()} "
                     f"users, {len(mine)} ratings -> {len(rows)} rows, {int(rows['label'].sum())} "
                     "positives")
    notes += _method_notes(seed, negatives, clusters, encoder, source_root is not None)
    return AtomicDataset(
        name=name, fmt="ml100k-entities", fields=dict(FIELDS), markets=markets,
        users=user_tables, user_fields=dict(USER_FIELDS), market_items=item_tables,
        market_item_fields={m: dict(f) for m, f in ITEM_FIELDS.items()}, shared_users=True,
        sources=list(paths.values()), source_root=source_root, description=DESCRIPTION,
        notes=notes,
        command=command or call_repr("convert_ml100k_entities", src, name=name, seed=seed,
                                     negatives=negatives, clusters=clusters, encoder=encoder,
                                     **({"unrelated_source": True} if unrelated_source else {})),
    )


def permute_users(ratings: pd.DataFrame, rows: pd.Series, rng: np.random.Generator):
    """``ratings`` with the user of the selected ``rows`` replaced by a permutation of the users.

    Args:
        ratings (pd.DataFrame): the ratings (``user_id``).
        rows (pd.Series): bool, the rows whose user moves (the source entity's).
        rng (np.random.Generator): draws the permutation.

    Returns:
        tuple: ``(ratings copy, number of users permuted)``.
    """
    users = np.sort(ratings.loc[rows, "user_id"].unique())
    moved = dict(zip(users, users[rng.permutation(len(users))]))
    out = ratings.copy()
    out.loc[rows, "user_id"] = out.loc[rows, "user_id"].map(moved)
    return out, len(users)


def _method_notes(seed, negatives, clusters, encoder, default_src):
    notes = [
        f"negative sampling: {negatives} per positive, uniform over the entity's movies the user "
        "never rated, without replacement within one positive; numpy default_rng seeded by "
        f"(seed {seed}, crc32 of the entity name)",
        f"title_cluster: scikit-learn KMeans (k={clusters}, n_init=10, random_state={seed}) over "
        f"the {encoder or 'all-MiniLM-L6-v2'} sentence embeddings of the target movies' titles",
        "row order: by user, then timestamp (ties: ml-100k.inter order), each positive followed "
        "by its negatives (same timestamp)",
        "split recipe (RecBole): `eval_args: {split: {RS: [0.8, 0.1, 0.1]}, order: TO, "
        "group_by: user, mode: labeled}`; click histories per entity: `history_fields` (built by "
        "recbole_cmr after the split, from the entity's training-split clicks strictly before "
        "each row's time)",
    ]
    if default_src:
        notes.append(f"source: the ml-100k atomic files shipped in the recbole "
                     f"{importlib.metadata.version('recbole')} wheel")
    return notes


def convert_ml100k_entities(
    src: str | Path | None, out: str | Path, *, overwrite: bool = False, **kwargs
) -> Path:
    """Convert ml-100k to ``<out>/<name>``; see :func:`build_ml100k_entities`."""
    check_target(out, kwargs.get("name", "ml100k-entities"), overwrite)
    return write_dataset(build_ml100k_entities(src, **kwargs), out, overwrite)
