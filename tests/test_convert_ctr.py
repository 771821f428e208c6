"""Tests of the CTR converters (ml100k-scenarios, ali-ccp) and the 0/1 label checks, on real
files: RecBole's own ml-100k copy and the Ali-CCP / AliExpress samples in ../shared/data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import recbole

from recbole_cmr.data.convert import (
    AtomicDataset,
    build_ml100k_scenarios,
    convert_aliccp,
    convert_aliexpress,
    convert_ml100k_scenarios,
    write_dataset,
)
from recbole_cmr.data.convert.__main__ import main
from conftest import shared_data
from test_convert import call_cli, folder_bytes, header, leftovers, read  # the same file helpers

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.path.dirname(recbole.__file__)) / "dataset_example" / "ml-100k"
SHIPPED = REPO / "dataset" / "ml100k-scenarios"
SHIPPED_COMMAND = "python -m recbole_cmr.data.convert ml100k-scenarios --out dataset"
SCENARIOS = {"under25": (0, 25), "25to34": (25, 35), "35to44": (35, 45), "45plus": (45, 200)}
CTR_HEADER = "user_id:token\titem_id:token\tclick:float\tconversion:float\ttimestamp:float"
USER_HEADER = "user_id:token\tage:token\tgender:token\toccupation:token"
ITEM_HEADER = "item_id:token\trelease_year:token\tgenre:token_seq"
ALICCP = {"train": "ali_ccp_train_sample.csv", "valid": "ali_ccp_val_sample.csv",
          "test": "ali_ccp_test_sample.csv"}


def ml100k_copy(tmp_path: Path) -> Path:
    """A writable copy of RecBole's ml-100k .inter/.user/.item."""
    src = tmp_path / "ml-100k"
    src.mkdir()
    for ext in ("inter", "user", "item"):
        shutil.copy(ML100K / f"ml-100k.{ext}", src)
    return src


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ml_out(tmp_path_factory) -> Path:
    """The default conversion of RecBole's ml-100k copy, made as the shipped one was made."""
    return convert_ml100k_scenarios(None, tmp_path_factory.mktemp("mls"), command=SHIPPED_COMMAND)


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    df = read(ML100K / "ml-100k.inter")
    df["rating"] = df["rating"].astype(float)
    return df


@pytest.fixture(scope="module")
def users() -> pd.DataFrame:
    return read(ML100K / "ml-100k.user").set_index("user_id")


@pytest.fixture(scope="module")
def scenario_frames(ml_out) -> dict[str, pd.DataFrame]:
    return {s: read(ml_out / f"{s}.inter") for s in SCENARIOS}


# ------------------------------------------------------------------------------ ml100k-scenarios
def test_ml100k_files_and_headers(ml_out):
    assert sorted(p.name for p in ml_out.iterdir()) == sorted(
        ["README.md", "ml100k-scenarios.item"]
        + [f"{s}.{ext}" for s in SCENARIOS for ext in ("inter", "user")]
    )
    for s in SCENARIOS:
        assert header(ml_out / f"{s}.inter") == CTR_HEADER
        assert header(ml_out / f"{s}.user") == USER_HEADER
    assert header(ml_out / "ml100k-scenarios.item") == ITEM_HEADER


def test_ml100k_users_in_one_scenario_by_age(ml_out, scenario_frames, users, ratings):
    owner: dict[str, str] = {}
    for s, df in scenario_frames.items():
        low, high = SCENARIOS[s]
        ages = users.loc[df["user_id"].unique(), "age"].astype(int)
        assert ((ages >= low) & (ages < high)).all(), s
        for u in df["user_id"].unique():
            assert owner.setdefault(u, s) == s, u
        table = read(ml_out / f"{s}.user").set_index("user_id")
        assert sorted(table.index) == sorted(df["user_id"].unique())
        assert table.equals(users.loc[table.index, ["age", "gender", "occupation"]])
    assert set(owner) == set(ratings["user_id"])  # every rating user, all 943


def test_ml100k_positives_negatives_and_labels(scenario_frames, users, ratings):
    band = {u: next(s for s, (lo, hi) in SCENARIOS.items() if lo <= int(a) < hi)
            for u, a in users["age"].items()}
    rated = ratings.groupby("user_id")["item_id"].agg(set)
    rating_of = ratings.set_index(["user_id", "item_id"])["rating"]
    for s, df in scenario_frames.items():
        mine = ratings[ratings["user_id"].map(band) == s]
        click = df["click"].astype(float).to_numpy()
        conversion = df["conversion"].astype(float).to_numpy()
        assert set(np.unique(click)) == {0.0, 1.0} and set(np.unique(conversion)) == {0.0, 1.0}
        pos, neg = df[click == 1], df[click == 0]
        assert len(pos) == len(mine) and len(neg) == 4 * len(pos)
        key = ["user_id", "item_id", "timestamp"]
        assert pos[key].sort_values(key).reset_index(drop=True).equals(
            mine[key].sort_values(key).reset_index(drop=True))
        # conversion only on clicks, and exactly where the rating is >= 4
        assert (conversion[click == 0] == 0).all()
        expected = rating_of.loc[list(zip(pos["user_id"], pos["item_id"]))].to_numpy() >= 4
        assert (pos["conversion"].astype(float).to_numpy() == expected).all()
        # layout: each positive followed by its 4 negatives, same user and timestamp
        assert (click[::5] == 1).all() and click.reshape(-1, 5)[:, 1:].sum() == 0
        for col in ("user_id", "timestamp"):
            groups = df[col].to_numpy().reshape(-1, 5)
            assert (groups == groups[:, :1]).all(), col
        items = df["item_id"].to_numpy().reshape(-1, 5)
        assert all(len(set(g)) == 5 for g in items)  # distinct within one positive
        hit = [i in rated[u] for u, i in zip(neg["user_id"], neg["item_id"])]
        assert not any(hit)
        # sorted by user, then time
        user_key = df["user_id"].astype(int).to_numpy()
        assert (np.diff(user_key) >= 0).all()
        ts = df["timestamp"].astype(float).to_numpy()
        same_user = np.diff(user_key) == 0
        assert (np.diff(ts)[same_user] >= 0).all()


def test_ml100k_negatives_cover_the_catalogue(scenario_frames):
    neg = pd.concat(df[df["click"] == "0"] for df in scenario_frames.values())
    counts = neg["item_id"].value_counts()
    # uniform over unrated movies: every movie is drawn, none dominates
    assert len(counts) == 1682
    assert counts.max() < 10 * counts.median()


def test_ml100k_items(ml_out):
    item = read(ml_out / "ml100k-scenarios.item")
    src = read(ML100K / "ml-100k.item")
    assert len(item) == len(src) == 1682
    merged = item.merge(src, on="item_id", how="left", validate="1:1")
    assert (merged["release_year_x"] == merged["release_year_y"]).all()
    assert (merged["genre"] == merged["class"].str.split().str.join(" ")).all()
    assert "movie_title" not in item.columns


def test_ml100k_readme(ml_out, scenario_frames):
    readme = (ml_out / "README.md").read_text()
    assert SHIPPED_COMMAND in readme
    assert "recbole/dataset_example/ml-100k/ml-100k.inter" in readme
    for s, df in scenario_frames.items():
        clicks = int(df["click"].astype(float).sum())
        conv = int(df["conversion"].astype(float).sum())
        assert f"| {s}.inter | {df['user_id'].nunique()} | " in readme
        assert f"{clicks} clicks, {conv} conversions" in readme
    assert "RS: [0.8, 0.1, 0.1]" in readme and "order: TO" in readme


def test_ml100k_same_seed_same_bytes_other_seed_other_negatives(ml_out, tmp_path):
    again = convert_ml100k_scenarios(ML100K, tmp_path / "a", command=SHIPPED_COMMAND)
    fresh = {k: v for k, v in folder_bytes(again).items() if k != "README.md"}
    assert fresh == {k: v for k, v in folder_bytes(ml_out).items() if k != "README.md"}
    other = build_ml100k_scenarios(seed=7)
    mine = read(ml_out / "25to34.inter")
    theirs = other.markets["25to34"]
    assert len(theirs) == len(mine)
    pos = mine["click"] == "1"
    assert theirs.loc[pos.to_numpy(), "item_id"].tolist() == mine.loc[pos, "item_id"].tolist()
    changed = theirs.loc[~pos.to_numpy(), "item_id"].to_numpy() != mine.loc[~pos, "item_id"]
    assert changed.mean() > 0.9


def test_shipped_ml100k_scenarios_equals_fresh_conversion(ml_out):
    assert SHIPPED.is_dir(), f"shipped dataset missing: {SHIPPED}"
    assert folder_bytes(SHIPPED) == folder_bytes(ml_out)


def test_ml100k_bad_input(tmp_path):
    src = ml100k_copy(tmp_path)
    out = tmp_path / "out"
    user = src / "ml-100k.user"
    lines = user.read_text().splitlines()
    user.write_text("\n".join(lines[:3] + ["x" + lines[3]] + lines[4:]) + "\n")  # user 3 gone
    with pytest.raises(ValueError, match=r"ml-100k\.user: no row for user_id '3'"):
        convert_ml100k_scenarios(src, out)
    user.write_text("\n".join(lines[:3] + [lines[3].replace("\t23\t", "\tabc\t")] + lines[4:]))
    with pytest.raises(ValueError, match=r"ml-100k\.user: column 'age'.*'abc'"):
        convert_ml100k_scenarios(src, out)
    shutil.copy(ML100K / "ml-100k.user", user)
    (src / "ml-100k.item").unlink()
    with pytest.raises(FileNotFoundError, match=r"ml-100k\.item"):
        convert_ml100k_scenarios(src, out)
    with pytest.raises(ValueError, match="negatives"):
        convert_ml100k_scenarios(src, out, negatives=0)
    assert leftovers(out) == []


def test_ml100k_too_few_unrated_movies(tmp_path):
    src = ml100k_copy(tmp_path)
    items = read(ML100K / "ml-100k.item")
    rated = set(read(ML100K / "ml-100k.inter").query("user_id == '1'")["item_id"])
    keep = items[items["item_id"].isin(rated) | (items.index < 1)]  # few unrated for user 1
    with open(src / "ml-100k.item", "w") as f:
        f.write(header(ML100K / "ml-100k.item") + "\n")
        keep.to_csv(f, sep="\t", header=False, index=False)
    inter = read(ML100K / "ml-100k.inter")
    inter = inter[inter["item_id"].isin(set(keep["item_id"]))]
    with open(src / "ml-100k.inter", "w") as f:
        f.write(header(ML100K / "ml-100k.inter") + "\n")
        inter.to_csv(f, sep="\t", header=False, index=False)
    with pytest.raises(ValueError, match=r"ml-100k\.inter: user '\d+' rated .*fewer than 4"):
        convert_ml100k_scenarios(src, tmp_path / "out")


def test_ml100k_cli(tmp_path):
    done = call_cli("ml100k-scenarios", ML100K, "--out", tmp_path, "--name", "mls", "--seed", "3",
                   "--negatives", "1", "-q")
    assert done.returncode == 0, done.stderr
    df = read(tmp_path / "mls" / "45plus.inter")
    assert (df["click"] == "0").sum() == (df["click"] == "1").sum()
    assert "--negatives 1" in (tmp_path / "mls" / "README.md").read_text()
    with pytest.raises(SystemExit) as exc:
        main(["ml100k-scenarios", "--out", str(tmp_path), "--negatives", "0"])
    assert exc.value.code == 2


def test_ml100k_scenarios_by_gender_or_occupation_hold_each_user_once(tmp_path, users):
    """``--split gender`` / ``occupation``: every user is in exactly one scenario, by the rule
    its README states; an occupation no group holds is an error naming it."""
    from recbole_cmr.data.convert.ml100k_scenarios import OCCUPATIONS

    done = call_cli("ml100k-scenarios", ML100K, "--out", tmp_path, "--name", "mlg", "--split",
                   "gender", "--negatives", "1", "-q")
    assert done.returncode == 0, done.stderr
    seen = {}
    for scenario, gender in (("female", "F"), ("male", "M")):
        mine = read(tmp_path / "mlg" / f"{scenario}.user")["user_id"]
        assert (users.loc[mine, "gender"] == gender).all()
        seen.update(dict.fromkeys(mine, scenario))
        assert set(read(tmp_path / "mlg" / f"{scenario}.inter")["user_id"]) <= set(mine)
    assert len(seen) == len(users)
    readme = (tmp_path / "mlg" / "README.md").read_text()
    assert "scenario `female` (gender in F)" in readme and "--split gender" in readme
    by_occupation = {o: g for g, members in OCCUPATIONS.items() for o in members}
    assert set(users["occupation"]) == set(by_occupation)  # every occupation has a group
    odd = ml100k_copy(tmp_path)
    text = (odd / "ml-100k.user").read_text().replace("\tstudent\t", "\tastronaut\t", 1)
    (odd / "ml-100k.user").write_text(text)
    done = call_cli("ml100k-scenarios", odd, "--out", tmp_path, "--name", "mlo", "--split",
                   "occupation", "-q")
    assert done.returncode == 2 and "occupation ['astronaut'] belongs to no scenario" in done.stderr
    assert not (tmp_path / "mlo").exists()


# ------------------------------------------------------------------------------ writer
def test_writer_user_tables_and_split_suffixes(tmp_path):
    inter = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"]})
    fields = {"user_id": "token", "item_id": "token"}
    ds = AtomicDataset(name="x", fmt="test", fields=fields, markets={"a": inter},
                       users={"a": pd.DataFrame({"user_id": ["u1"], "age": ["3"]})},
                       user_fields={"user_id": "token", "age": "token"})
    with pytest.raises(ValueError, match=r"a\.user: no row for 1 user\(s\) of market 'a'.*'u2'"):
        write_dataset(ds, tmp_path)
    ds.users = {"a": pd.DataFrame({"user_id": ["u1", "u2", "u3"], "age": ["3", "4", "5"]})}
    ds.splits = {"a": {"test": inter.iloc[:1]}, "b": {"train": inter.assign(user_id="u9")}}
    out = write_dataset(ds, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "a.inter", "a.test.inter", "a.user", "b.train.inter"]
    assert read(out / "a.user")["user_id"].tolist() == ["u1", "u2"]  # u3 has no interaction
    ds.splits = {"a": {"te.st": inter}}
    with pytest.raises(ValueError, match="invalid split suffix"):
        write_dataset(ds, tmp_path, overwrite=True)
    ds.splits = {"b": {"test": inter}}
    with pytest.raises(ValueError, match="user 'u1' occurs in markets 'a' and 'b'"):
        write_dataset(ds, tmp_path, overwrite=True)


# ------------------------------------------------------------------------------ ali-ccp
@pytest.fixture
def aliccp_csv() -> dict[str, Path]:
    return {split: shared_data("ctr_samples", name) for split, name in ALICCP.items()}


def test_aliccp_scenarios_and_splits(aliccp_csv, tmp_path):
    out = convert_aliccp(aliccp_csv["train"], aliccp_csv["valid"], aliccp_csv["test"], tmp_path)
    markets = ["scenario1", "scenario2", "scenario3"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md"] + [f"{m}.{s}.inter" for m in markets for s in ALICCP])
    expected = header(out / "scenario1.train.inter")
    cols = dict(c.split(":") for c in expected.split("\t"))
    assert list(cols)[:2] == ["click", "purchase"] and "301" not in cols
    assert cols["click"] == cols["purchase"] == "float"
    assert cols["101"] == cols["109_14"] == cols["853"] == "token"
    assert cols["D109_14"] == cols["D853"] == "float"
    assert all(t == "float" for c, t in cols.items() if c.startswith("D"))
    for split, csv in aliccp_csv.items():
        src = pd.read_csv(csv, dtype=str, keep_default_na=False)
        assert set(cols) == set(src.columns) - {"301"}
        total = 0
        for m in markets:
            path = out / f"{m}.{split}.inter"
            assert header(path) == expected
            df = read(path)
            mine = src[src["301"] == m.removeprefix("scenario")][list(cols)]
            assert df.equals(mine.reset_index(drop=True)), path  # rows verbatim, file order
            total += len(df)
        assert total == len(src)
    readme = (out / "README.md").read_text()
    assert "ali_ccp_train_sample.csv" in readme and "| scenario2.valid.inter | - | - | 7 |" in readme


def test_aliccp_bad_labels_and_values(aliccp_csv, tmp_path):
    src = pd.read_csv(aliccp_csv["train"], dtype=str, keep_default_na=False)
    bad = tmp_path / "bad_train.csv"
    out = tmp_path / "out"
    src.assign(click=src["click"].where(src.index != 4, "2")).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"bad_train\.csv: column 'click' must be 0 or 1, "
                                         r"found '2' on data line 5"):
        convert_aliccp(bad, aliccp_csv["valid"], aliccp_csv["test"], out)
    src.assign(purchase=src["purchase"].where(src.index != 0, "0.5")).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"bad_train\.csv: column 'purchase'.*'0\.5'"):
        convert_aliccp(bad, aliccp_csv["valid"], aliccp_csv["test"], out)
    src.assign(D508=src["D508"].where(src.index != 2, "n/a")).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"bad_train\.csv: column 'D508'.*'n/a'"):
        convert_aliccp(bad, aliccp_csv["valid"], aliccp_csv["test"], out)
    src[src["301"] != "3"].to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"val_sample\.csv: scenario\(s\) 3 .*train CSV"):
        convert_aliccp(bad, aliccp_csv["valid"], aliccp_csv["test"], out)
    src.drop(columns=["D853"]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"val_sample\.csv: columns differ.*extra: D853"):
        convert_aliccp(bad, aliccp_csv["valid"], aliccp_csv["test"], out)
    assert leftovers(out) == []


def test_aliccp_cli(aliccp_csv, tmp_path):
    args = ["ali-ccp", "--train", aliccp_csv["train"], "--valid", aliccp_csv["valid"],
            "--test", aliccp_csv["test"], "--out", tmp_path, "--name", "ccp"]
    done = call_cli(*args, "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "ccp")
    assert "python -m recbole_cmr.data.convert ali-ccp --train" in (
        tmp_path / "ccp" / "README.md").read_text()
    missing = call_cli("ali-ccp", "--train", tmp_path / "nope.csv", "--valid", aliccp_csv["valid"],
                      "--test", aliccp_csv["test"], "--out", tmp_path, "-q")
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "nope.csv" in missing.stderr
    assert "Traceback" not in missing.stderr
    with pytest.raises(SystemExit) as exc:
        main(["ali-ccp", "--train", str(aliccp_csv["train"]), "--out", str(tmp_path)])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------ aliexpress
def test_aliexpress_labels_must_be_binary(tmp_path):
    src = pd.read_csv(shared_data("ctr_samples", "aliexpress_train_sample.csv"), dtype=str,
                      keep_default_na=False)
    bad = tmp_path / "ae.csv"
    for col, value in (("click", "3"), ("conversion", "-1")):
        src.assign(**{col: src[col].where(src.index != 1, value)}).to_csv(bad, index=False)
        with pytest.raises(ValueError, match=rf"ae\.csv: column '{col}' must be 0 or 1, found "
                                             rf"'{value}' on data line 2"):
            convert_aliexpress({"nl": bad}, tmp_path / "out")
    assert leftovers(tmp_path / "out") == []
