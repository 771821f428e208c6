"""The movielens-catalogues converter and its shipped output: each market sells its own
catalogue, shaped like XMRec's overlap, with real MovieLens ratings and item text."""

from __future__ import annotations

import re
import shlex
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from recbole_cmr.data.convert import build_xmrec, convert_movielens_catalogues
from recbole_cmr.data.convert import movielens_catalogues as mc
from recbole_cmr.data.convert.__main__ import main
from recbole_cmr.data.convert.movielens import MARKETS, build_movielens, select
from recbole_cmr.utils import resource_path
from conftest import SHARED_DATA, shared_data

REPO = Path(__file__).resolve().parents[1]
SHIPPED = Path(resource_path("dataset", mc.NAME))
MOVIELENS_MARKETS = Path(resource_path("dataset", "movielens-markets"))
SEED = 2026  # the shipped dataset's seed (the converter's default)


def read(path: Path) -> pd.DataFrame:
    """An atomic file as strings, columns without their types."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def catalogues(markets: dict[str, pd.DataFrame]) -> dict[str, set[str]]:
    return {m: set(f["item_id"]) for m, f in markets.items()}


def largest(markets: dict[str, pd.DataFrame]) -> str:
    return max(markets, key=lambda m: markets[m]["user_id"].nunique())


@pytest.fixture(scope="module")
def shipped() -> dict[str, pd.DataFrame]:
    """The shipped markets (those of movielens-markets, in the converter's order)."""
    assert sorted(p.stem for p in SHIPPED.glob("*.inter")) == sorted(MARKETS)
    return {m: read(SHIPPED / f"{m}.inter") for m in MARKETS}


@pytest.fixture(scope="module")
def source() -> dict[str, pd.DataFrame]:
    """Every MovieLens market's full ratings (the converter's input)."""
    return build_movielens(shared_data("movielens_titles"), max_users=None, last_k=None).markets


def shipped_command() -> str:
    readme = (SHIPPED / "README.md").read_text(encoding="utf-8")
    return re.search(r"## Command\n\n```\n(.*)\n```", readme).group(1)


# ------------------------------------------------------------------------------ shipped files
def test_shipped_files_are_reproduced_by_their_command(tmp_path, monkeypatch):
    """The converter, run from the repository root with the arguments of the README's command
    (default seed and settings), writes the shipped folder byte for byte."""
    shared_data("movielens_titles")
    shared_data("xmrec")
    monkeypatch.chdir(REPO)
    rel = Path("..") / SHARED_DATA.relative_to(REPO.parent)
    command = shipped_command()
    assert shlex.split(command)[3:] == ["movielens-catalogues", str(rel / "movielens_titles"),
                                        "--xmrec", str(rel / "xmrec"), "--out", "dataset"]
    out = convert_movielens_catalogues(rel / "movielens_titles", tmp_path,
                                       xmrec=rel / "xmrec", command=command)
    files = sorted(p.name for p in SHIPPED.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    for name in files:
        assert (out / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def test_shipped_shares_fall_in_the_xmrec_ranges(shipped):
    cats = catalogues(shipped)
    big = largest(shipped)
    sellers = Counter(item for items in cats.values() for item in items)
    for market, items in cats.items():
        exclusive = sum(sellers[i] == 1 for i in items) / len(items)
        if market == big:
            low, high = mc.RANGE_LARGEST_EXCLUSIVE
            assert low <= exclusive <= high, market
            continue
        in_largest = len(items & cats[big]) / len(items)
        assert mc.RANGE_EXCLUSIVE[0] <= exclusive <= mc.RANGE_EXCLUSIVE[1], market
        assert mc.RANGE_IN_LARGEST[0] <= in_largest <= mc.RANGE_IN_LARGEST[1], market


def test_shipped_readme_overlap_table_matches_the_files(shipped):
    readme = (SHIPPED / "README.md").read_text(encoding="utf-8")
    table = mc.overlap_table(shipped, largest(shipped))
    assert mc.markdown_table(table) in readme
    assert "ratings and the item text are real; the catalogues are constructed" in readme


def test_shipped_market_sizes_are_unequal(shipped):
    users = pd.Series({m: f["user_id"].nunique() for m, f in shipped.items()})
    ratings = pd.Series({m: len(f) for m, f in shipped.items()})
    assert users.is_unique and ratings.is_unique
    assert 0.05 <= users.min() / users.max() <= 0.2
    assert 0.05 <= ratings.min() / ratings.max() <= 0.2
    assert users.idxmax() == ratings.idxmax() == largest(shipped)


def test_shipped_users_keep_exactly_their_ratings_of_sold_movies(shipped, source):
    """Each user keeps every candidate rating (last ``LAST_K``) of a movie their market sells
    and no other; a dropped user had fewer than ``MIN_RATINGS`` of them; every candidate movie
    is sold somewhere."""
    candidates = {m: select(source[m], m, mc.USERS[m], SEED, mc.LAST_K) for m in shipped}
    for market, kept in shipped.items():
        cand = candidates[market]
        sold = cand[cand["item_id"].isin(set(kept["item_id"]))]
        per_user = sold.groupby("user_id").size()
        assert set(kept["user_id"]) == set(per_user.index[per_user >= mc.MIN_RATINGS])
        expected = sold[sold["user_id"].isin(set(kept["user_id"]))]
        assert kept["user_id"].tolist() == expected["user_id"].tolist()
        assert kept["item_id"].tolist() == expected["item_id"].tolist()
        assert kept["timestamp"].astype(float).tolist() == expected["timestamp"].tolist()
    everything = set().union(*(set(f["item_id"]) for f in candidates.values()))
    assert set().union(*catalogues(shipped).values()) == everything


def test_shipped_item_text_is_read_like_movielens_markets(shipped):
    path = SHIPPED / f"{mc.NAME}.item"
    with open(path, encoding="utf-8") as f:
        assert f.readline().rstrip("\n") == "item_id:token\ttitle:token_seq"
    item = read(path)
    assert item["item_id"].is_unique
    assert set(item["item_id"]) == set().union(*catalogues(shipped).values())
    title = dict(zip(item["item_id"], item["title"]))
    assert all(t.startswith(i) for i, t in title.items())
    other = read(MOVIELENS_MARKETS / "movielens-markets.item")
    common = other[other["item_id"].isin(title)]
    assert len(common) > 0.9 * len(other)
    assert common["title"].tolist() == [title[i] for i in common["item_id"]]


# ------------------------------------------------------------------------------ the converter
def test_xmrec_ranges_and_targets_are_measured_from_xmrec():
    """The constants the converter aims at are XMRec's: its range ends, in whole percent, and
    its means; 3,708 of 8,304 items sold in >= 2 markets (the issue's numbers)."""
    markets = build_xmrec(shared_data("xmrec")).markets
    table = mc.overlap_table(markets, largest(markets)).set_index("market")
    others = table.drop(index=table.attrs["largest"])
    assert table.attrs["largest"] == "ca"
    assert (table.attrs["shared"], table.attrs["items"]) == (3708, 8304)
    for column, (low, high), target in (("exclusive", mc.RANGE_EXCLUSIVE, mc.TARGET_EXCLUSIVE),
                                        ("in_largest", mc.RANGE_IN_LARGEST, mc.TARGET_IN_LARGEST)):
        assert (round(others[column].min(), 2), round(others[column].max(), 2)) == (low, high)
        assert others[column].mean() == pytest.approx(target, abs=0.01)
    ca = table.loc["ca", "exclusive"]
    assert ca == pytest.approx(mc.TARGET_LARGEST_EXCLUSIVE, abs=0.005)
    low, high = mc.RANGE_LARGEST_EXCLUSIVE
    assert (low + high) / 2 == pytest.approx(mc.TARGET_LARGEST_EXCLUSIVE)
    assert high - low == pytest.approx(mc.RANGE_EXCLUSIVE[1] - mc.RANGE_EXCLUSIVE[0])


def test_catalogues_are_seeded(source, shipped):
    """The same seed gives the same catalogues; another seed, on the same users, others (in
    range too)."""
    settings = dict(caps=mc.USERS, last_k=mc.LAST_K, min_ratings=mc.MIN_RATINGS)
    again = mc.make_catalogues(source, seed=SEED, **settings)
    assert catalogues(again.markets) == catalogues(shipped)
    cand = mc.encode(again.candidates, again.largest)
    _, keep, _ = mc.calibrate(cand, SEED, mc.MIN_RATINGS)
    _, other, _ = mc.calibrate(cand, SEED + 1, mc.MIN_RATINGS)
    assert keep.sum() == sum(len(f) for f in shipped.values())
    assert (keep != other).any()
    start = 0
    for market, frame in again.candidates.items():
        kept = frame[other[start:start + len(frame)]]
        assert set(kept["item_id"]) != set(shipped[market]["item_id"]), market
        start += len(frame)
    moved = mc.make_catalogues(source, seed=SEED + 1, **settings)
    mc.check_ranges(mc.overlap_table(moved.markets, moved.largest))


def test_shares_outside_the_ranges_are_an_error(shipped):
    table = mc.overlap_table(shipped, largest(shipped))
    mc.check_ranges(table)
    table.loc[table["market"] == "south", "exclusive"] = 0.05
    with pytest.raises(ValueError, match=r"market 'south': exclusive share 5\.0% is outside "
                       r"the XMRec range 7\.0%-21\.0%; change --users"):
        mc.check_ranges(table)


def test_a_tie_for_the_largest_market_is_an_error(source):
    with pytest.raises(ValueError, match="markets east, west tie as the largest"):
        mc.make_catalogues(source, seed=SEED, caps={**mc.USERS, "west": mc.USERS["east"]},
                           last_k=mc.LAST_K, min_ratings=mc.MIN_RATINGS)


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "MovieLens folder not found: {tmp}/nowhere"),
    (["src", "--users", "east"], "--users: expected MARKET=N once per market, got 'east'"),
    (["src", "--users", "mars=5"], "--users: unknown market 'mars' (markets: ml100k, east,"),
    (["src", "--users", "east=0"], "--users: east=0 is not a positive number of users"),
    (["src", "--min-ratings", "2"], "--min-ratings must be >= 3 for leave-one-out, got 2"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["movielens-catalogues", str(tmp_path / args[0]), *args[1:],
              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()
