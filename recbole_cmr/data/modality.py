"""Frozen item modality features for multi-modal models (ANT): text, image and price.

* text: the sentence embeddings of the item text (``dataset.item_text_embedding``);
* image: a precomputed vector file - raw float32 rows of ``image_feature_dim`` values - whose row
  ``r`` belongs to the item token that ``image_feature_index`` (``token<TAB>row`` lines, e.g.
  UniSRec's ``<Name>.item2index``) maps to ``r``; items without a row get zeros and mask False;
* target_text: precomputed text vectors of the target's items, read like the image file
  (``target_text_feature_file``, ``_index``, ``_dim``; e.g. the CLIP-sized ``feat1CLS``), which a
  model may use in place of ``text`` on the target (ANT: its adaptation stage);
* price: a float item field (``price_field``), log-price bucketised one-hot over
  ``price_buckets`` quantile buckets of the known prices; items without a price get zeros.

Relative file names are looked up in the dataset folder ``<data_path>``.
"""

import os
from logging import getLogger

import numpy as np
import pandas as pd
import torch


def _dataset_file(config, name):
    return name if os.path.isabs(name) else os.path.join(config["data_path"], name)


def read_feature_index(path, key="image_feature_index"):
    """``{item token: row}`` of an index file (``token<TAB>row`` per line) named by setting
    ``key``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no file {path}")
    frame = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False,
                        names=["token", "row"])
    rows = pd.to_numeric(frame["row"], errors="coerce")
    if rows.isna().any() or len(frame) == 0:
        bad = int(np.flatnonzero(rows.isna().to_numpy())[0]) + 1 if len(frame) else 0
        raise ValueError(f"{path}: line {bad} is not 'item token<TAB>row number'.")
    return dict(zip(frame["token"], rows.astype(int)))


def image_features(config, item_tokens, prefix="image"):
    """``(features [n_items, dim], has_row [n_items] bool)`` in the order of ``item_tokens``
    (row 0 = padding) from the vector file of settings ``<prefix>_feature_file``,
    ``<prefix>_feature_index`` and ``<prefix>_feature_dim``, or None when the file is unset."""
    name = config[f"{prefix}_feature_file"]
    if not name:
        return None
    path, dim = _dataset_file(config, name), int(config[f"{prefix}_feature_dim"])
    index_path = _dataset_file(config, config[f"{prefix}_feature_index"] or "")
    index = read_feature_index(index_path, f"{prefix}_feature_index")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{prefix}_feature_file: no file {path}")
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % dim or raw.size // dim != len(index):
        raise ValueError(
            f"{path}: {raw.size} float32 values are not {len(index)} rows (the items of "
            f"{index_path}) of {prefix}_feature_dim {dim}; check the file, its index and the "
            "width.")
    table = raw.reshape(-1, dim)
    out = np.zeros((len(item_tokens), dim), dtype=np.float32)
    rows = np.array([index.get(str(t), -1) for t in item_tokens])
    rows[0] = -1  # padding
    has = rows >= 0
    if rows.max() >= len(table):
        raise ValueError(f"{index_path}: row {rows.max()} is beyond the {len(table)} rows of {path}.")
    out[has] = table[rows[has]]
    has &= np.abs(out).sum(1) > 0  # an all-zero row is no vector
    getLogger().info(f"{prefix} features: {int(has.sum())} of {len(item_tokens) - 1} items from {path}")
    return torch.from_numpy(out), torch.from_numpy(has)


def price_features(prices, buckets):
    """One-hot quantile bucket of log(price): ``prices`` ``[n]`` (NaN or <= 0: no price) ->
    ``[n, buckets]`` float (zero rows without a price)."""
    prices = np.asarray(prices, dtype=np.float64)
    known = np.isfinite(prices) & (prices > 0)
    out = np.zeros((len(prices), buckets), dtype=np.float32)
    if not known.any():
        return torch.from_numpy(out)
    logs = np.log(prices[known])
    edges = np.quantile(logs, np.linspace(0, 1, buckets + 1)[1:-1])
    out[np.flatnonzero(known), np.searchsorted(edges, logs, side="right")] = 1.0
    return torch.from_numpy(out)


def item_prices(config, dataset, item_tokens):
    """The raw ``price_field`` of each item token, ``[n_items]`` float (NaN: no price), read from
    the item file (RecBole fills a missing float with the mean); None without that field."""
    from recbole_cmr.data.dataset import atomic_header, item_file

    field = config["price_field"]
    path = item_file(config, getattr(dataset, "market", config["dataset"]))
    if not field or not os.path.isfile(path):
        return None
    header = list(atomic_header(path, config["field_separator"]))
    if field not in header:
        return None
    iid = config["ITEM_ID_FIELD"]
    frame = pd.read_csv(path, sep=config["field_separator"], dtype=str, keep_default_na=False,
                        usecols=[header.index(iid), header.index(field)])
    frame.columns = [c.split(":")[0] for c in frame.columns]
    values = pd.to_numeric(frame[field].replace("", np.nan), errors="coerce")
    by_token = dict(zip(frame[iid], values))
    return np.array([by_token.get(str(t), np.nan) for t in item_tokens], dtype=np.float64)


def item_modalities(config, dataset):
    """``{modality: (features [n_items, d], present [n_items] bool)}`` of the modalities the data
    has and the config enables (``text_modality``: ``text`` and ``target_text``,
    ``image_modality``, ``price_modality``)."""
    found = {}
    tokens = dataset.field2id_token[dataset.iid_field]
    if config["text_modality"]:
        target_text = image_features(config, tokens, prefix="target_text")  # its errors first
        if target_text is not None:
            found["target_text"] = target_text
        try:
            text = dataset.item_text_embedding.float()
            found["text"] = (text, text.abs().sum(1) > 0)
        except (AttributeError, ValueError, FileNotFoundError) as err:
            getLogger().info(f"no text modality: {err}")
    elif config["target_text_feature_file"]:
        raise ValueError("target_text_feature_file is read only with text_modality: True; drop "
                         "it or set text_modality: True.")
    if config["image_modality"]:
        image = image_features(config, tokens)
        if image is not None:
            found["image"] = image
    prices = item_prices(config, dataset, tokens) if config["price_modality"] else None
    if prices is not None:
        price = price_features(prices, int(config["price_buckets"]))
        found["price"] = (price, price.sum(1) > 0)
    getLogger().info(f"item modalities: {sorted(found) or 'none'}")
    return found
