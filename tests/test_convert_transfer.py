"""Converters of ANT's domains on real files: Amazon 2018 sliding-window rows (Office Products),
UniSRec Scientific with its image features, and merging datasets into one multi-market folder."""

from __future__ import annotations

import ast
import filecmp

import pandas as pd
import pytest

from recbole_cmr.data.convert import build_amazon18, convert_amazon18, convert_merge, convert_unisrec
from recbole_cmr.data.convert.amazon18 import chain
from recbole_cmr.data.modality import image_features
from conftest import shared_data
from test_convert import read


@pytest.fixture(scope="module")
def office(tmp_path_factory):
    return convert_amazon18(shared_data("amazon18_text"), tmp_path_factory.mktemp("office"))


@pytest.fixture(scope="module")
def scientific(tmp_path_factory):
    return convert_unisrec(shared_data("amazon_scientific", "mm_subset"),
                           tmp_path_factory.mktemp("sci"), name="scientific")


def test_chain_rebuilds_sliding_windows_and_starts_anew_after_a_gap():
    rows = [(("a",), "b"), (("a", "b"), "c"), (("b", "c"), "d"), (("x", "y"), "z")]
    assert chain(rows, window=2) == [["a", "b", "c", "d"], ["x", "y", "z"]]


def test_office_sequences_hold_every_row_in_order(office):
    frame = read(office / "office.inter")
    assert (office / "office-products.item").is_file()
    seqs = {u: g["item_id"].tolist() for u, g in frame.groupby("user_id", sort=False)}
    src = shared_data("amazon18_text")
    rows = pd.concat([pd.read_csv(p, dtype=str) for p in sorted(src.glob("*__Office_Products_5_*.csv"))])
    for _, row in rows.sample(300, random_state=0).iterrows():
        window = [f"Office_Products:{i}" for i in ast.literal_eval(row["history_item_id"])]
        window.append(f"Office_Products:{row['item_id']}")
        mine = [s for u, s in seqs.items() if u.split("#")[0] == row["user_id"]]
        assert any(window == s[k:k + len(window)] for s in mine for k in range(len(s))), row["user_id"]
    positions = frame.groupby("user_id", sort=False)["timestamp"].apply(lambda t: t.astype(float).tolist())
    assert all(p == list(range(1, len(p) + 1)) for p in positions)
    items = read(office / "office-products.item")
    assert items["item_id"].str.startswith("Office_Products:").all() and (items["text"] != "").all()


def test_unisrec_copies_the_image_features_with_their_index(scientific):
    src = shared_data("amazon_scientific", "mm_subset")
    assert filecmp.cmp(scientific / "scientific.feat3CLS", src / "Scientific.feat3CLS", shallow=False)
    assert filecmp.cmp(scientific / "scientific.item2index", src / "Scientific.item2index", shallow=False)


def test_merge_joins_markets_items_and_features(office, scientific, tmp_path):
    out = convert_merge([str(office), f"{scientific}:scientific"], tmp_path, name="transfer")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "office.inter", "scientific.inter", "transfer.feat1CLS", "transfer.feat3CLS",
        "transfer.item", "transfer.item2index"]
    items = read(out / "transfer.item")
    assert len(items) == len(read(office / "office-products.item")) + len(read(scientific / "scientific.item"))
    tokens = ["[PAD]", *items["item_id"]]
    config = {"data_path": str(out), "image_feature_file": "transfer.feat3CLS",
              "image_feature_index": "transfer.item2index", "image_feature_dim": 512}
    features, present = image_features(config, tokens)
    assert int(present.sum()) == 1585  # the Scientific items; Office items have no image
    assert not features[[i for i, t in enumerate(tokens) if t.startswith("Office_")]].any()
    with pytest.raises(FileNotFoundError, match=r"no market \['nope'\]"):
        convert_merge([f"{scientific}:nope"], tmp_path / "x", name="bad")
    with pytest.raises(ValueError, match="market 'office' is in two inputs"):
        convert_merge([str(office), str(office)], tmp_path / "y", name="twice")


def test_amazon18_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"valid__Nope_\*\.csv"):
        build_amazon18(shared_data("amazon18_text"), category="Nope")
    src = tmp_path / "a18"
    src.mkdir()
    for path in shared_data("amazon18_text").glob("*Office_Products*"):
        (src / path.name).write_bytes(path.read_bytes())
    test_csv = next(src.glob("test__*.csv"))
    frame = pd.read_csv(test_csv, dtype=str)
    frame.loc[0, "history_item_id"] = "not a list"
    frame.to_csv(test_csv, index=False)
    with pytest.raises(ValueError, match="history_item_id must hold Python lists"):
        build_amazon18(src)
