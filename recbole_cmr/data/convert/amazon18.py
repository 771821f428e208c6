"""Amazon 2018 sliding-window rows (``amazon18_text``) → a one-market dataset with item text.

Input folder: ``index__<Category>.item.json`` (item index → title, description, brand,
categories) and ``valid__<Category>_*.csv`` / ``test__<Category>_*.csv`` (``user_id``,
``history_item_id`` - a list of at most ``window`` item indices - and the next ``item_id``).
The rows of one user in one file are sliding windows over one sequence: it is rebuilt by chaining
each row's target onto the sequence whose last ``window`` items are the row's history. A user's
test-file sequence continues the valid-file one when its first history is the end of it;
otherwise (and for rows that chain onto nothing) a new sequence starts, as its own user
(``<user>#<k>``). One interaction per position, timestamp = position; item tokens are
``<Category>:<index>``, item text = title + categories + brand (description left out).
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pandas as pd

from .atomic import AtomicDataset, call_repr, check_target, require_dir, require_file, write_dataset

logger = logging.getLogger(__name__)

FIELDS = {"user_id": "token", "item_id": "token", "timestamp": "float"}
ITEM_FIELDS = {"item_id": "token", "text": "token_seq"}
COLUMNS = ("user_id", "history_item_id", "item_id")


def category_files(src: Path, category: str) -> dict[str, Path]:
    """``{"index", "valid", "test"}`` paths of one category (each must exist once)."""
    files = {"index": src / f"index__{category}.item.json"}
    for split in ("valid", "test"):
        found = sorted(src.glob(f"{split}__{category}_*.csv"))
        if len(found) != 1:
            raise FileNotFoundError(f"{src}: expected one {split}__{category}_*.csv, found "
                                    f"{len(found)}")
        files[split] = found[0]
    require_file(files["index"], "item index")
    return files


def read_rows(path: Path) -> pd.DataFrame:
    """``user_id``, ``hist`` (tuple of item indices) and ``item_id`` of one split file."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} are missing (found {list(frame.columns)})")
    try:
        hist = [tuple(str(i) for i in ast.literal_eval(h)) for h in frame["history_item_id"]]
    except (ValueError, SyntaxError):
        raise ValueError(f"{path}: history_item_id must hold Python lists of item indices") from None
    return pd.DataFrame({"user_id": frame["user_id"], "hist": hist, "item_id": frame["item_id"]})


def chain(rows: list[tuple[tuple, str]], window: int) -> list[list[str]]:
    """Sequences rebuilt from (history, target) sliding-window rows, in row order."""
    sequences = []
    for hist, target in rows:
        for seq in sequences:
            if tuple(seq[-window:]) == hist or (len(seq) < window and tuple(seq) == hist):
                seq.append(target)
                break
        else:
            sequences.append([*hist, target])
    return sequences


def user_sequences(splits: dict[str, pd.DataFrame], window: int) -> dict[str, list[str]]:
    """``{user token: item sequence}``: each user's valid-file then test-file sequences, joined
    where the test one continues the valid one."""
    out = {}
    for user in pd.unique(pd.concat([splits["valid"]["user_id"], splits["test"]["user_id"]])):
        parts = []
        for split in ("valid", "test"):
            mine = splits[split][splits[split]["user_id"] == user]
            for seq in chain(list(zip(mine["hist"], mine["item_id"])), window):
                last = parts[-1] if parts else None
                overlap = min(len(seq) - 1, window)
                if last is not None and overlap and last[-overlap:] == seq[:overlap]:
                    last.extend(seq[overlap:])
                else:
                    parts.append(seq)
        for k, seq in enumerate(parts):
            out[user if k == 0 else f"{user}#{k}"] = seq
    return out


def item_table(path: Path, category: str) -> pd.DataFrame:
    """``item_id`` (``<Category>:<index>``) and ``text`` = title + categories + brand."""
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    rows = []
    for key, item in index.items():
        parts = [str(item.get(k) or "").strip() for k in ("title", "categories", "brand")]
        rows.append({"item_id": f"{category}:{key}", "text": ". ".join(p for p in parts if p)})
    return pd.DataFrame(rows)


def build_amazon18(
    src: str | Path, *, category: str = "Office_Products", name: str | None = None,
    market: str | None = None, command: str | None = None,
) -> AtomicDataset:
    """Read one category of ``amazon18_text`` and rebuild its user sequences."""
    src = require_dir(src, "amazon18_text folder")
    files = category_files(src, category)
    name = name or category.lower().replace("_", "-")
    market = market or category.lower().split("_")[0]
    splits = {s: read_rows(files[s]) for s in ("valid", "test")}
    window = max(int(df["hist"].map(len).max()) for df in splits.values())
    seqs = user_sequences(splits, window)
    items = item_table(files["index"], category)
    known = set(items["item_id"])
    frame = pd.DataFrame({
        "user_id": [u for u, s in seqs.items() for _ in s],
        "item_id": [f"{category}:{i}" for s in seqs.values() for i in s],
        "timestamp": [float(p) for s in seqs.values() for p in range(1, len(s) + 1)],
    })
    unknown = sorted(set(frame["item_id"]) - known)
    if unknown:
        raise ValueError(f"{files['index']}: no entry for item {unknown[0]!r} of the split files")
    notes = [f"{len(seqs)} sequences ({frame['user_id'].str.split('#').str[0].nunique()} users), "
             f"{len(frame)} interactions, rebuilt from {sum(map(len, splits.values()))} rows of "
             f"at most {window} history items"]
    return AtomicDataset(
        name=name, fmt="amazon18", fields=dict(FIELDS), markets={market: frame}, items=items,
        item_fields=dict(ITEM_FIELDS), sources=list(files.values()),
        description=f"Amazon 2018 {category} reviews (amazon18_text, Apache-2.0) as item "
        "sequences rebuilt from sliding-window rows; item text = title + categories + brand.",
        notes=notes, command=command or call_repr("convert_amazon18", src, category=category,
                                                  name=name, market=market))


def convert_amazon18(src: str | Path, out: str | Path, *, overwrite: bool = False, **kwargs) -> Path:
    """Convert one category to ``<out>/<name>``; see :func:`build_amazon18`."""
    category = kwargs.get("category", "Office_Products")
    check_target(out, kwargs.get("name") or category.lower().replace("_", "-"), overwrite)
    return write_dataset(build_amazon18(src, **kwargs), out, overwrite)
