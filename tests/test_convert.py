"""Tests of recbole_cmr.data.convert on the real public files in ../shared/data."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

from recbole_cmr.data.convert import (
    AtomicDataset,
    build_xmrec,
    convert_aliexpress,
    convert_movielens,
    convert_unisrec,
    convert_xmrec,
    write_dataset,
)
from recbole_cmr.data.convert import atomic
from recbole_cmr.data.convert.__main__ import main
from conftest import shared_data

REPO = Path(__file__).resolve().parents[1]
XMREC_COUNTS = {  # market: (users, items, interactions), from the data README
    "ca": (4668, 5735, 44779),
    "de": (1851, 2179, 17300),
    "fr": (1838, 1879, 17624),
    "in": (239, 470, 2015),
    "jp": (487, 955, 4485),
    "mx": (1878, 1645, 17095),
    "uk": (3352, 3251, 31547),
}
RATING_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def data(*parts: str) -> Path:
    """A path under the shared data folder (skipped when absent, a failure under ``CI=true``)."""
    return shared_data(*parts)


def read(path: Path) -> pd.DataFrame:
    """An atomic file as strings, columns without their types."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def header(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\n")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    """Everything left in an output folder (including hidden temporary folders)."""
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "recbole_cmr.data.convert", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def call_cli(*args: str) -> subprocess.CompletedProcess:
    """What :func:`run_cli` gives, from the CLI's ``main`` in this process: the converters' own
    checks without a new interpreter's imports (~5 CPU-s each; ``test_cli_subprocess`` runs the
    command itself)."""
    argv, out, err = [str(a) for a in args], io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            status = main(argv)
    except SystemExit as stop:
        status = stop.code
    return subprocess.CompletedProcess(["convert", *argv], status or 0, out.getvalue(), err.getvalue())


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def xmrec_out(tmp_path_factory) -> Path:
    return convert_xmrec(data("xmrec"), tmp_path_factory.mktemp("xmrec"))


@pytest.fixture(scope="module")
def unisrec_out(tmp_path_factory) -> Path:
    return convert_unisrec(data("amazon_scientific", "full"), tmp_path_factory.mktemp("unisrec"))


@pytest.fixture(scope="module")
def movielens_out(tmp_path_factory) -> Path:
    return convert_movielens(data("movielens_titles"), tmp_path_factory.mktemp("ml"))


@pytest.fixture(scope="module")
def ml1m_ratings() -> pd.DataFrame:
    df = read(data("movielens_titles", "ml-1m.inter.gz"))
    df["timestamp"] = df["timestamp"].astype(float)
    return df


def xmrec_copy(tmp_path: Path, markets=("in",)) -> Path:
    """A writable copy of some XMRec market files."""
    src = tmp_path / "src"
    src.mkdir()
    for m in markets:
        shutil.copy(data("xmrec", f"{m}_5core.txt"), src)
    return src


# ------------------------------------------------------------------------------ xmrec
def test_xmrec_counts_match_source(xmrec_out):
    names = sorted(p.name for p in xmrec_out.glob("*.inter"))
    assert names == [f"{m}.inter" for m in sorted(XMREC_COUNTS)]
    assert not list(xmrec_out.glob("*.item"))
    for market, (users, items, rows) in XMREC_COUNTS.items():
        path = xmrec_out / f"{market}.inter"
        assert header(path) == RATING_HEADER
        df = read(path)
        assert (df["user_id"].nunique(), df["item_id"].nunique(), len(df)) == (users, items, rows)
    readme = (xmrec_out / "README.md").read_text()
    assert "| in.inter | 239 | 470 | 2015 |" in readme and "in_5core.txt" in readme


def test_xmrec_keeps_order_dates_and_shares_items(xmrec_out):
    src = pd.read_csv(data("xmrec", "in_5core.txt"), sep=" ", dtype=str)
    df = read(xmrec_out / "in.inter")
    assert df["item_id"].tolist() == src["itemId"].tolist()  # file order kept (stable ties)
    assert df["user_id"].tolist() == ("in_" + src["userId"]).tolist()
    assert df["timestamp"].iloc[0] == "1451779200"  # 2016-01-03 UTC
    owner, items = {}, {}
    for path in xmrec_out.glob("*.inter"):
        frame = read(path)
        for user in frame["user_id"].unique():
            assert owner.setdefault(user, path.stem) == path.stem, user
        for item in frame["item_id"].unique():
            items.setdefault(item, set()).add(path.stem)
    assert sum(len(m) > 1 for m in items.values()) > 1000  # ASINs shared across markets


def test_xmrec_sample_filter_and_determinism(tmp_path):
    src = data("xmrec")
    kw = dict(markets=["in", "jp"], max_users_per_market=50, seed=7, min_item_inter=2)
    first = convert_xmrec(src, tmp_path / "a", **kw)
    again = convert_xmrec(src, tmp_path / "b", **kw)
    assert folder_bytes(first) == folder_bytes(again)
    frames = {m: read(first / f"{m}.inter") for m in ("in", "jp")}
    assert all(f["user_id"].nunique() <= 50 for f in frames.values())
    counts = pd.concat(frames.values())["item_id"].value_counts()
    assert counts.min() >= 2
    other = convert_xmrec(src, tmp_path / "c", **{**kw, "seed": 8})
    assert read(other / "in.inter")["user_id"].nunique() > 0
    assert set(read(other / "in.inter")["user_id"]) != set(frames["in"]["user_id"])
    # a market's sample does not depend on the other markets chosen
    alone = build_xmrec(src, markets=["in"], max_users_per_market=50, seed=7)
    pair = build_xmrec(src, markets=["in", "jp"], max_users_per_market=50, seed=7)
    assert alone.markets["in"].equals(pair.markets["in"])


# ------------------------------------------------------------------------------ unisrec
def test_unisrec_reproduces_valid_and_test_targets(unisrec_out):
    full = data("amazon_scientific", "full")
    items = pd.read_csv(full / "Scientific.item2index", sep="\t", header=None, dtype=str)
    users = pd.read_csv(full / "Scientific.user2index", sep="\t", header=None, dtype=str)
    asin, user = dict(zip(items[1], items[0])), dict(zip(users[1], users[0]))
    inter = unisrec_out / "scientific.inter"
    assert header(inter) == "user_id:token\titem_id:token\ttimestamp:float"
    df = read(inter)
    df["timestamp"] = df["timestamp"].astype(float)
    # what RecBole does for LS valid_and_test / TO: stable sort by time, split per user
    ordered = df.sort_values("timestamp", kind="stable")
    seqs = ordered.groupby("user_id", sort=False)["item_id"].agg(list)
    train_rows = sum(1 for _ in open(full / "Scientific.train.inter")) - 1
    assert len(seqs) == 8442 and len(df) == train_rows + 3 * 8442 == 59427
    for split, offset in (("test", 1), ("valid", 2)):
        orig = read(full / f"Scientific.{split}.inter")
        for u, hist, target in orig.itertuples(index=False):
            seq = seqs[user[u]]
            assert seq[-offset] == asin[target], (split, u)
            hist = [asin[i] for i in hist.split()]
            assert seq[: len(seq) - offset][-len(hist):] == hist, (split, u)


def test_unisrec_item_text(unisrec_out):
    full = data("amazon_scientific", "full")
    assert header(unisrec_out / "scientific.item") == "item_id:token\ttext:token_seq"
    item = read(unisrec_out / "scientific.item")
    text = read(full / "Scientific.text")
    assert len(item) == 4385
    assert set(item["item_id"]) == set(read(unisrec_out / "scientific.inter")["item_id"])
    assert dict(zip(item["item_id"], item["text"])) == dict(zip(text["item_id"], text["text"]))


# ------------------------------------------------------------------------------ movielens
def test_movielens_markets_follow_zip_rule_and_caps(movielens_out):
    zips = read(data("movielens_titles", "ml-1m.user")).set_index("user_id")["zip_code"]
    digits = {"east": "012", "south": "37", "central": "456", "west": "89"}
    seen: dict[str, str] = {}
    for market in ("ml100k", *digits):
        path = movielens_out / f"{market}.inter"
        assert header(path) == RATING_HEADER
        df = read(path)
        per_user = df.groupby("user_id").size()
        assert 0 < len(per_user) <= 600 and per_user.max() <= 30
        for u in per_user.index:
            assert seen.setdefault(u, market) == market
        if market == "ml100k":
            assert df["user_id"].str.startswith("100k_").all()
        else:
            assert zips[per_user.index].str[0].isin(list(digits[market])).all()
    readme = (movielens_out / "README.md").read_text()
    assert "dropped for a zip code" in readme and "| west.inter | 600 |" in readme


def test_movielens_keeps_last_k_ratings(movielens_out, ml1m_ratings):
    kept = read(movielens_out / "east.inter")
    kept["timestamp"] = kept["timestamp"].astype(float)
    src = ml1m_ratings[ml1m_ratings["user_id"].isin(set(kept["user_id"]))]
    for user, rows in src.groupby("user_id"):
        mine = kept[kept["user_id"] == user]
        assert len(mine) == min(30, len(rows))
        dropped = rows.loc[~rows["item_id"].isin(set(mine["item_id"])), "timestamp"]
        assert dropped.empty or dropped.max() <= mine["timestamp"].min()


def test_movielens_item_text(movielens_out):
    path = movielens_out / "movielens-markets.item"
    assert header(path) == "item_id:token\ttitle:token_seq"
    item = read(path)
    used = set().union(*(set(read(p)["item_id"]) for p in movielens_out.glob("*.inter")))
    assert set(item["item_id"]) == used and item["item_id"].is_unique
    title = dict(zip(item["item_id"], item["title"]))
    if "Toy Story (1995)" in title:
        assert title["Toy Story (1995)"] == "Toy Story (1995). Animation, Children's, Comedy"
    assert all(t.startswith(i) for i, t in title.items())
    # items are shared between the 100K market and the 1M markets
    ml100k, west = (set(read(movielens_out / f"{m}.inter")["item_id"]) for m in ("ml100k", "west"))
    assert ml100k & west


def test_movielens_deterministic(movielens_out, tmp_path):
    again = convert_movielens(data("movielens_titles"), tmp_path)
    assert folder_bytes(again) == folder_bytes(movielens_out)
    other = convert_movielens(data("movielens_titles"), tmp_path, name="ml-other", seed=1,
                              max_users=100, last_k=5)
    df = read(other / "south.inter")
    assert df["user_id"].nunique() == 100 and df.groupby("user_id").size().max() <= 5


# ------------------------------------------------------------------------------ aliexpress
def test_aliexpress_train_and_test(tmp_path):
    train = data("ctr_samples", "aliexpress_train_sample.csv")
    test = data("ctr_samples", "aliexpress_test_sample.csv")
    out = convert_aliexpress({"nl": train}, tmp_path, test_markets={"nl": test})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "nl.inter", "nl.test.inter"]
    head = header(out / "nl.inter").split("\t")
    assert head[0] == "search_id:token" and head[16] == "categorical_16:token"
    assert head[17] == "numerical_1:float" and head[-2:] == ["click:float", "conversion:float"]
    assert len(head) == 82
    for name, src in (("nl.inter", train), ("nl.test.inter", test)):
        assert read(out / name).equals(pd.read_csv(src, dtype=str, keep_default_na=False))


def test_aliexpress_names_missing_columns(tmp_path):
    src = pd.read_csv(data("ctr_samples", "aliexpress_train_sample.csv"), dtype=str)
    bad = tmp_path / "bad.csv"
    src.drop(columns=["numerical_5", "click"]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"bad\.csv.*numerical_5, click"):
        convert_aliexpress({"es": bad}, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown market"):
        convert_aliexpress({"es": bad}, tmp_path / "out", test_markets={"fr": bad})
    assert leftovers(tmp_path / "out") == []


# ------------------------------------------------------------------------------ bad input
def test_missing_files(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert_xmrec(tmp_path / "nowhere", out)
    src = tmp_path / "uni"
    src.mkdir()
    for p in data("amazon_scientific", "full").iterdir():
        if p.suffix != ".text":
            shutil.copy(p, src)
    with pytest.raises(FileNotFoundError, match=r"Scientific\.text"):
        convert_unisrec(src, out)
    ml = tmp_path / "ml"
    ml.mkdir()
    with pytest.raises(FileNotFoundError, match=r"ml-1m\.user"):
        convert_movielens(ml, out)
    assert leftovers(out) == []


def test_bad_header_date_and_empty_market(tmp_path):
    src = xmrec_copy(tmp_path)
    path = src / "in_5core.txt"
    lines = path.read_text().splitlines()
    out = tmp_path / "out"
    path.write_text("\n".join(["user item rate date"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"in_5core\.txt.*missing column\(s\) userId, itemId"):
        convert_xmrec(src, out)
    path.write_text("\n".join(lines[:5] + ["u1 i1 5.0 2016-13-45"] + lines[5:]) + "\n")
    with pytest.raises(ValueError, match=r"in_5core\.txt: unparsable date '2016-13-45'.*line 5"):
        convert_xmrec(src, out)
    path.write_text(lines[0] + "\n")
    with pytest.raises(ValueError, match=r"in_5core\.txt.*empty market"):
        convert_xmrec(src, out)
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id\titem_id:token\n")
    with pytest.raises(ValueError, match=r"bad\.inter: bad RecBole header column 'user_id'"):
        atomic.read_atomic(bad)
    assert leftovers(out) == []


def test_unknown_market_and_filters_emptying_a_market(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown market\(s\) zz \(available: ca, de, fr, in"):
        convert_xmrec(data("xmrec"), out, markets=["in", "zz"])
    with pytest.raises(ValueError, match="market 'in' is empty"):
        convert_xmrec(data("xmrec"), out, markets=["in"], min_item_inter=10**6)
    assert leftovers(out) == []


def test_output_exists_overwrite_and_atomicity(tmp_path, monkeypatch):
    src = xmrec_copy(tmp_path)
    out = tmp_path / "out"
    target = out / "xmrec"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_xmrec(src, out)
    assert leftovers(target) == ["keep.txt"]

    def broken(frame, fields, path):  # fail while writing: nothing may be left behind
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "write_atomic", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_xmrec(src, out, overwrite=True)
    assert leftovers(out) == ["xmrec"] and leftovers(target) == ["keep.txt"]
    with pytest.raises(OSError):
        convert_xmrec(src, tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    convert_xmrec(src, out, overwrite=True)
    assert leftovers(out) == ["xmrec"] and leftovers(target) == ["README.md", "in.inter"]


def test_writer_rejects_users_in_two_markets(tmp_path):
    frame = pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"]})
    ds = AtomicDataset(name="x", fmt="test", fields={"user_id": "token", "item_id": "token"},
                       markets={"a": frame, "b": frame})
    with pytest.raises(ValueError, match="user 'u1' occurs in markets 'a' and 'b'"):
        write_dataset(ds, tmp_path)
    ds.markets = {"a.b": frame}
    with pytest.raises(ValueError, match="invalid market name"):
        write_dataset(ds, tmp_path)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ CLI
def test_cli_in_process_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["xmrec", str(data("xmrec")), "--out", str(tmp_path), "--markets", "zz"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "error: " in err and "zz" in err
    for bad in (["aliexpress", "--market", "nl", "--out", "x"], ["movielens", "--out", "x", "s",
                                                                "--max-users", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2


def test_cli_subprocess(tmp_path):
    helped = call_cli("--help")
    assert helped.returncode == 0
    assert all(f in helped.stdout for f in ("xmrec", "unisrec", "movielens", "aliexpress"))
    args = ("xmrec", data("xmrec"), "--out", tmp_path, "--markets", "in", "--name", "xm-in")
    done = run_cli(*args, "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "xm-in")
    readme = (tmp_path / "xm-in" / "README.md").read_text()
    assert "python -m recbole_cmr.data.convert xmrec" in readme and "--markets in" in readme
    again = call_cli(*args)  # the error path is main()'s own; no second interpreter needed
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "output exists" in again.stderr
    assert "Traceback" not in again.stderr
