"""The ml100k-entities converter (MKT's benchmark data) on RecBole's own ml-100k copy."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import recbole

from recbole_cmr.data.convert import build_ml100k_entities, convert_ml100k_entities
from recbole_cmr.data.convert.ml100k_entities import TARGET_GENRES
from test_convert import call_cli, folder_bytes, read

pytestmark = pytest.mark.usefixtures("shared_text_embeddings")  # MiniLM encodes once per run

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.path.dirname(recbole.__file__)) / "dataset_example" / "ml-100k"
SHIPPED = REPO / "dataset" / "ml100k-entities"
SHIPPED_COMMAND = "python -m recbole_cmr.data.convert ml100k-entities --out dataset"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """The default conversion, made as the shipped copy was made."""
    return convert_ml100k_entities(None, tmp_path_factory.mktemp("mle"), command=SHIPPED_COMMAND)


@pytest.fixture(scope="module")
def movies() -> pd.DataFrame:
    items = read(ML100K / "ml-100k.item")
    items["target"] = items["class"].str.split().apply(lambda g: bool(set(g) & set(TARGET_GENRES)))
    return items.set_index("item_id")


def test_entity_files_and_schemas(out):
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "source.inter", "source.item", "source.user", "target.inter", "target.item",
        "target.user"]
    for entity in ("source", "target"):
        head = (out / f"{entity}.inter").read_text().split("\n", 1)[0]
        assert head == "user_id:token\titem_id:token\tlabel:float\ttimestamp:float"
    assert (out / "source.item").read_text().split("\n", 1)[0] == \
        "item_id:token\trelease_year:token\tgenre:token_seq"
    assert (out / "target.item").read_text().split("\n", 1)[0] == "item_id:token\ttitle_cluster:token"


def test_movies_split_by_genre_and_clusters(out, movies):
    source, target = read(out / "source.item"), read(out / "target.item")
    assert not movies.loc[source["item_id"], "target"].any()
    assert movies.loc[target["item_id"], "target"].all()
    assert len(source) + len(target) == len(movies)
    assert sorted(target["title_cluster"].astype(int).unique()) == list(range(32))


def test_labels_and_negatives(out, movies):
    ratings = read(ML100K / "ml-100k.inter")
    ratings["rating"] = ratings["rating"].astype(float)
    rated = ratings.set_index(["user_id", "item_id"])["rating"]
    for entity in ("source", "target"):
        rows = read(out / f"{entity}.inter")
        own = movies.loc[rows["item_id"], "target"].to_numpy() == (entity == "target")
        assert own.all()  # negatives come from the entity's own movies
        keys = pd.MultiIndex.from_frame(rows[["user_id", "item_id"]])
        is_rated = keys.isin(rated.index)
        mine = ratings[movies.loc[ratings["item_id"], "target"].to_numpy() == (entity == "target")]
        assert is_rated.sum() == len(mine)  # every rating once, every negative unrated
        labels = rows.loc[is_rated, "label"].astype(float).to_numpy()
        assert (labels == (rated.loc[keys[is_rated]].to_numpy() >= 4)).all()
        assert (rows.loc[~is_rated, "label"] == "0").all()
        assert (~is_rated).sum() == 2 * (labels == 1).sum()


def test_shipped_ml100k_entities_equals_fresh_conversion(out):
    assert SHIPPED.is_dir(), f"shipped dataset missing: {SHIPPED}"
    assert folder_bytes(SHIPPED) == folder_bytes(out)


def test_other_seed_other_negatives_and_cli(out, tmp_path):
    other = build_ml100k_entities(seed=7)
    mine = read(out / "target.inter")
    assert len(other.markets["target"]) == len(mine)
    assert (other.markets["target"]["item_id"].to_numpy() != mine["item_id"].to_numpy()).mean() > 0.3
    with pytest.raises(ValueError, match="negatives"):
        build_ml100k_entities(negatives=0)
    done = call_cli("ml100k-entities", ML100K, "--out", tmp_path, "--name", "mle", "--negatives",
                   "1", "--clusters", "8", "-q")
    assert done.returncode == 0, done.stderr
    rows, full = read(tmp_path / "mle" / "target.inter"), read(out / "target.inter")
    positives = (full["label"] == "1").sum()
    assert len(rows) == len(full) - positives  # one negative per positive instead of two
    assert "--negatives 1" in (tmp_path / "mle" / "README.md").read_text()
    assert read(tmp_path / "mle" / "target.item")["title_cluster"].nunique() == 8


def test_unrelated_source_gives_each_user_another_users_source_ratings(out):
    """``unrelated_source``: the target is the default conversion's, the source holds the same
    per-user rating sets, each moved to another user by a seeded permutation."""
    other = build_ml100k_entities(unrelated_source=True, clusters=8)
    target = read(out / "target.inter")
    assert (other.markets["target"]["item_id"].to_numpy() == target["item_id"].to_numpy()).all()

    def positives(rows):
        rows = rows[rows["label"].astype(float) == 1]
        return rows.groupby("user_id")["item_id"].apply(frozenset)

    before, after = positives(read(out / "source.inter")), positives(other.markets["source"])
    assert sorted(before.tolist(), key=sorted) == sorted(after.tolist(), key=sorted)  # the same sets
    shared = before.index.intersection(after.index)
    assert (before[shared] != after[shared]).mean() > 0.9  # nearly every user got another's
    assert any("unrelated source" in note for note in other.notes)
    assert "unrelated_source=True" in other.command
