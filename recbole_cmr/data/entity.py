"""Multi-entity datasets: markets that are entity types of one platform sharing its users.

An entity (e.g. selling products vs content posts) is a market of ``MultiMarketDataset`` whose
files may carry **entity-specific fields** (``entity_fields: {entity: [field, ...]}``), absent
from the other entities' files; every other field is shared. Entity-specific item fields live in
``<entity>.item``. With ``entity_fields`` set:

* the item tables of all entities become one table over the shared item ids (an item's own
  entity's fields filled, the others' padded) plus the token field ``entity_field`` naming the
  item's entity, so pooled training, RecBole's ``join`` and any context-aware model see one schema;
* ``history_fields: {field: entity}`` gives each row the user's last ``history_max_len`` clicks
  (``LABEL_FIELD`` = 1) in that entity that are in the entity's **training split** and strictly
  before the row's ``TIME_FIELD``, for the rows of every split of every entity: a click of an
  entity's valid or test split is never a feature of any row. The fields are declared before
  RecBole's ``build()`` splits the markets (:func:`declare_histories`) and filled in its splits
  (:func:`add_histories`), with times as the split holds them. A history the files hold (a
  ``token_seq`` of item tokens) is checked for look-ahead, then keeps only those clicks.
"""

import os

import numpy as np
import pandas as pd
import torch
from recbole.utils import FeatureSource, FeatureType

import recbole_cmr.data.dataset as market_data  # (imports this module: names are read at call time)


def entity_fields(config, markets):
    """``{entity: [specific field, ...]}`` from ``entity_fields`` (checked against ``markets``);
    ``{}`` when unset."""
    named = config["entity_fields"] or {}
    if not isinstance(named, dict):
        raise ValueError(f"entity_fields must map an entity (market) to its specific fields, got "
                         f"{named!r}.")
    unknown = [e for e in named if e not in markets]
    if unknown:
        raise ValueError(f"entity_fields names entities {unknown} that are not markets of dataset "
                         f"[{config['dataset']}] (its markets: {markets}).")
    fields = {e: [f] if isinstance(f, str) else list(f or []) for e, f in named.items()}
    owners = {}
    for entity, names in fields.items():
        for field in names:
            if owners.setdefault(field, entity) != entity:
                raise ValueError(f"entity_fields names field [{field}] specific to both entity "
                                 f"[{owners[field]}] and entity [{entity}].")
    if fields and not config["shared_user_ids"]:
        raise ValueError("entity_fields: entities share their users; set shared_user_ids: True "
                         "so a user token is one user in every entity.")
    return fields


def _entity_files(config, market):
    """The atomic files of one entity: its interaction file(s), item and user file."""
    files = list(market_data.market_inter_files(config, market))
    for path in (market_data.item_file(config, market), os.path.join(config["data_path"], f"{market}.user")):
        if os.path.isfile(path):
            files.append(path)
    return files


def _first_value_row(path, field, sep):
    """0-based data line of the first non-empty value of ``field`` in ``path``, else None."""
    header = market_data.atomic_header(path, sep)
    column = list(header).index(field)
    values = pd.read_csv(path, sep=sep, usecols=[column], dtype=str, keep_default_na=False).iloc[:, 0]
    filled = np.flatnonzero(values.str.strip().to_numpy() != "")
    return int(filled[0]) if len(filled) else None


def check_entity_files(config, markets):
    """No row of an entity carries another entity's specific field, and each entity's files
    hold all of its own specific fields (ValueError naming file and field)."""
    fields = entity_fields(config, markets)
    sep = config["field_separator"]
    for market in markets:
        files = _entity_files(config, market)
        headers = {path: market_data.atomic_header(path, sep) for path in files}
        for entity, names in fields.items():
            for field in names:
                holders = [p for p, h in headers.items() if field in h]
                if entity == market and not holders:
                    raise ValueError(f"entity_fields: field [{field}] of entity [{entity}] is in "
                                     f"none of its files ({', '.join(files)}).")
                if entity == market:
                    continue
                for path in holders:
                    row = _first_value_row(path, field, sep)
                    if row is not None:
                        raise ValueError(
                            f"{path}, data line {row + 1}: a row of entity [{market}] carries "
                            f"field [{field}], which entity_fields makes specific to entity "
                            f"[{entity}]; leave it empty or drop the column.")
    return fields


def unify_item_features(mm, fields):
    """One item table over the shared item ids in every entity (see the module docstring).

    Each item takes its row from the first entity it occurs in; ``entity_field`` holds that
    entity (``[PAD]`` = padding item)."""
    config = mm.config
    iid, name = config["ITEM_ID_FIELD"], config["entity_field"]
    datasets = mm.market_datasets
    item_num = len(mm.item_tokens)
    owner = np.zeros(item_num, dtype=np.int64)
    for k, market in reversed(list(enumerate(mm.markets))):
        owner[mm.catalogue(market)] = k + 1
    parts = []
    for k, market in enumerate(mm.markets):
        table = datasets[market].item_feat
        if table is None:
            table = pd.DataFrame({iid: np.arange(item_num)})
        parts.append(table[owner[table[iid].to_numpy()] == k + 1])
    unified = pd.concat(parts, ignore_index=True, sort=False)
    unified = pd.merge(pd.DataFrame({iid: np.arange(item_num)}), unified, on=iid, how="left")
    unified[name] = owner
    for k, market in enumerate(mm.markets):  # another entity's float fields: 0, not a mean
        for field in fields.get(market, []):
            if field in unified and unified[field].dtype.kind == "f" and \
                    datasets[market].field2type.get(field) == FeatureType.FLOAT:
                unified.loc[owner != k + 1, field] = 0.0
    meta = _field_meta(mm, [c for c in unified.columns if c not in (iid, name)])
    for ds in datasets.values():
        for field, (ftype, tokens, seqlen) in meta.items():
            _set_field(ds, field, ftype, FeatureSource.ITEM, tokens, seqlen)
        _set_field(ds, name, FeatureType.TOKEN, FeatureSource.ITEM,
                   np.array([market_data.PAD, *mm.markets]), 1)
        ds.item_feat = unified.copy()
        ds._fill_nan()


def _field_meta(mm, fields):
    """``{field: (type, id_token or None, seqlen)}`` from the first market that has the field."""
    meta = {}
    for field in fields:
        ds = next(d for d in mm.market_datasets.values() if field in d.field2type)
        meta[field] = (ds.field2type[field], ds.field2id_token.get(field), ds.field2seqlen[field])
    return meta


def _set_field(ds, field, ftype, source, tokens, seqlen):
    """Declare ``field`` in RecBole dataset ``ds`` (type, source, vocabulary, sequence length)."""
    ds.set_field_property(field, ftype, source, seqlen)
    if tokens is not None:
        ds.field2id_token[field] = tokens
        ds.field2token_id[field] = {t: i for i, t in enumerate(tokens)}


def history_fields(config, markets):
    """``{field: entity}`` from ``history_fields`` (checked)."""
    named = config["history_fields"] or {}
    unknown = {f: e for f, e in named.items() if e not in markets}
    if unknown:
        raise ValueError(f"history_fields {unknown} name entities that are not markets of dataset "
                         f"[{config['dataset']}] (its markets: {markets}).")
    if named and not config["shared_user_ids"]:
        raise ValueError("history_fields need shared_user_ids: True (a user's clicks in one "
                         "entity are features of its rows in the others).")
    if named and int(config["history_max_len"] or 0) < 1:
        raise ValueError(f"history_max_len must be >= 1, got {config['history_max_len']}.")
    return dict(named)


def _check_click_fields(config, ds):
    """The time and label fields that tell a market's clicks are loaded (ValueError naming them)."""
    label, time = config["LABEL_FIELD"], config["TIME_FIELD"]
    if time not in ds.inter_feat:
        raise ValueError(f"history_fields need the time field [{time}] of "
                         f"{market_data.market_inter_files(config, ds.market)[0]}: load it "
                         "(load_col['inter']) or set TIME_FIELD.")
    if label not in ds.inter_feat:
        raise ValueError(f"history_fields: market [{ds.market}] has no label field [{label}] to "
                         "tell its clicks (LABEL_FIELD).")


def _column(feat, field):
    """One column of a DataFrame or a RecBole ``Interaction`` as a numpy array ``[N]``."""
    return np.asarray(feat[field])


def _rows(config, feat):
    """``user, time`` of every row of ``feat`` (DataFrame or ``Interaction``)."""
    return pd.DataFrame({"user": _column(feat, config["USER_ID_FIELD"]),
                         "time": _column(feat, config["TIME_FIELD"]).astype(np.float64)})


def _clicks(config, feat):
    """The clicks (``LABEL_FIELD`` = 1) among the rows of ``feat`` (DataFrame or ``Interaction``):
    DataFrame ``user, item, time``."""
    clicked = _column(feat, config["LABEL_FIELD"]) == 1
    rows = _rows(config, feat)[clicked]
    return pd.DataFrame({"user": rows["user"].to_numpy(),
                         "item": _column(feat, config["ITEM_ID_FIELD"])[clicked],
                         "time": rows["time"].to_numpy()})


def build_history(rows, clicks, max_len):
    """Each row's last ``max_len`` clicks of its user strictly before its time.

    Args:
        rows (DataFrame): ``user, time`` of N rows.
        clicks (DataFrame): ``user, item, time`` of one entity's clicks.
    Returns:
        list of N int64 arrays (oldest first, at most ``max_len`` items).
    """
    clicks = clicks.sort_values(["user", "time"], kind="stable")
    times = np.unique(np.r_[clicks["time"].to_numpy(), rows["time"].to_numpy()])
    scale = len(times) + 1
    key_of = lambda users, t: users.astype(np.int64) * scale + np.searchsorted(times, t)  # noqa: E731
    click_key = key_of(clicks["user"].to_numpy(), clicks["time"].to_numpy())
    users = rows["user"].to_numpy()
    end = np.searchsorted(click_key, key_of(users, rows["time"].to_numpy()), side="left")
    start = np.maximum(np.searchsorted(click_key, users.astype(np.int64) * scale, side="left"),
                       end - max_len)
    items = clicks["item"].to_numpy()
    return [items[s:e].astype(np.int64) for s, e in zip(start, end)]


def _history_items(rows, history, clicks):
    """One line per item of each row's history, in row then history order: DataFrame ``row,
    user, time, item, time_click`` (``time_click``: the user's first click of the item in
    ``clicks``, NaN if none)."""
    lengths = np.array([len(h) for h in history], dtype=np.int64)
    exploded = pd.DataFrame({"row": np.repeat(np.arange(len(rows)), lengths),
                             "user": np.repeat(rows["user"].to_numpy(), lengths),
                             "time": np.repeat(rows["time"].to_numpy(), lengths),
                             "item": np.concatenate(history) if lengths.sum() else
                             np.zeros(0, dtype=np.int64)})
    first = clicks.groupby(["user", "item"], as_index=False)["time"].min()
    return exploded.merge(first, on=["user", "item"], how="left", suffixes=("", "_click"))


def check_history(path, field, rows, history, clicks):
    """ValueError naming ``path`` when a row's history holds an item its user did not click in
    the entity strictly before the row's time (look-ahead)."""
    merged = _history_items(rows, history, clicks)
    bad = merged[~(merged["time_click"] < merged["time"])]
    if len(bad):
        row = bad.iloc[0]
        raise ValueError(
            f"{path}: field [{field}] of row {int(row['row']) + 1} holds an item the user did "
            f"not click in that entity before the row's time {row['time']:g} (first click: "
            f"{'never' if pd.isna(row['time_click']) else format(row['time_click'], 'g')}): a "
            "history may hold only earlier clicks.")


def keep_earlier_clicks(rows, history, clicks, max_len):
    """Each row's history less the items its user did not click in ``clicks`` strictly before
    the row's time; the last ``max_len`` of the rest (same arguments and result as
    :func:`build_history`, ``history``: N int64 arrays)."""
    merged = _history_items(rows, history, clicks)
    kept = merged[merged["time_click"] < merged["time"]]
    counts = np.bincount(kept["row"].to_numpy(), minlength=len(rows))
    parts = np.split(kept["item"].to_numpy(np.int64), np.cumsum(counts)[:-1])
    return [p[-max_len:] for p in parts]


def padded(history, width):
    """N item arrays (each at most ``width`` long) as a ``[N, width]`` LongTensor: each row's
    items first, then 0 (padding)."""
    lengths = np.array([len(h) for h in history], dtype=np.int64)
    out = np.zeros((len(history), width), dtype=np.int64)
    out[np.arange(width) < lengths[:, None]] = np.concatenate(history) if lengths.sum() else []
    return torch.from_numpy(out)


def unpadded(tensor):
    """A ``[N, L]`` token_seq tensor as N int64 arrays without the padding (0)."""
    return [row[row != 0] for row in tensor.numpy()]


def declare_histories(mm, named):
    """Declare the ``history_fields`` in every market, before the split: token_seq fields over
    the shared item ids (a history the files hold is checked for look-ahead against all of the
    entity's clicks and re-numbered into those ids). :func:`add_histories` fills them."""
    config = mm.config
    max_len = int(config["history_max_len"])
    for ds in mm.market_datasets.values():
        _check_click_fields(config, ds)
    clicks = {m: _clicks(config, ds.inter_feat) for m, ds in mm.market_datasets.items()}
    for market, ds in mm.market_datasets.items():
        for field, entity in named.items():
            width = max_len
            if field in ds.inter_feat:
                history = _given_history(mm, ds, field)
                check_history(market_data.market_inter_files(config, market)[0], field,
                              _rows(config, ds.inter_feat), history, clicks[entity])
                ds.inter_feat[field] = history
                width = max([max_len, *map(len, history)])  # build() keeps this many: all
            _set_field(ds, field, FeatureType.TOKEN_SEQ, FeatureSource.INTERACTION, mm.item_tokens,
                       width)


def add_histories(mm, built):
    """Fill the ``history_fields`` of the rows of every split, after RecBole's ``build()``: of
    each entity only the clicks of its training split strictly before the row's time.

    Args:
        mm (MultiMarketDataset): the markets, their history fields declared.
        built (dict): ``{market: [train, valid, test]}`` RecBole datasets of ``build()``; each
            split's ``inter_feat[field]`` becomes a ``[N, history_max_len]`` LongTensor.
    """
    config = mm.config
    named = history_fields(config, mm.markets)
    if not named:
        return
    max_len = int(config["history_max_len"])
    clicks = {m: _clicks(config, splits[0].inter_feat) for m, splits in built.items()}
    for market, splits in built.items():
        for split in splits:
            rows = _rows(config, split.inter_feat)
            for field, entity in named.items():
                if field in split.inter_feat:
                    history = keep_earlier_clicks(rows, unpadded(split.inter_feat[field]),
                                                  clicks[entity], max_len)
                else:
                    history = build_history(rows, clicks[entity], max_len)
                split.inter_feat[field] = padded(history, max_len)
        for field in named:
            mm.market_datasets[market].field2seqlen[field] = max_len


def _given_history(mm, ds, field):
    """A history field read from the file, as shared item ids (ValueError on unknown items)."""
    if ds.field2type[field] != FeatureType.TOKEN_SEQ:
        raise ValueError(f"history field [{field}] of market [{ds.market}] must be token_seq "
                         f"(item tokens), not {ds.field2type[field].value}.")
    tokens = ds.field2id_token[field]
    lut = np.array([mm.item_token_id.get(t, -1) for t in tokens], dtype=np.int64)
    lut[0] = 0
    raw = [np.asarray(seq, dtype=np.int64) for seq in ds.inter_feat[field].values]
    used = np.unique(np.concatenate(raw)) if raw else np.array([], dtype=np.int64)
    unknown = used[lut[used] < 0]
    if len(unknown):
        raise ValueError(f"{market_data.market_inter_files(mm.config, ds.market)[0]}: field [{field}] holds "
                         f"item tokens that are no item of the dataset, e.g. {tokens[unknown[0]]!r}.")
    return [lut[seq] for seq in raw]
