"""UniSRec-format Amazon data → one-market RecBole atomic dataset with item text.

Input folder: ``<Name>.{train,valid,test}.inter`` (``user_id:token item_id_list:token_seq
item_id:token``, integer ids, leave-one-out), ``<Name>.text`` (``item_id:token text:token_seq``
keyed by ASIN), ``<Name>.item2index`` / ``<Name>.user2index`` (``key<TAB>index``).

Precomputed item features beside them (``<Name>.feat*``, e.g. ``feat3CLS`` image vectors in
``item2index`` row order) are copied as ``<name>.feat*`` with ``<name>.item2index``.

Each user's full sequence is rebuilt by chaining the train rows (histories may be truncated
to the last W items, so the longest history alone is not enough), then the valid and the
test target.  One interaction per position with timestamp = position (1, 2, ...), so
RecBole's leave-one-out by time (``LS: valid_and_test``, order ``TO``) gives back the
original valid/test targets.  Tokens are the original user ids and ASINs.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import pandas as pd

from .atomic import (
    AtomicDataset,
    call_repr,
    check_target,
    read_atomic,
    read_table,
    require_dir,
    require_file,
    require_rows,
    write_dataset,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
INTER_COLUMNS = ("user_id", "item_id_list", "item_id")
FIELDS = {"user_id": "token", "item_id": "token", "timestamp": "float"}
ITEM_FIELDS = {"item_id": "token", "text": "token_seq"}
DESCRIPTION = (
    "Amazon 2018 review data in the UniSRec format (Hou et al., \"Towards Universal Sequence "
    "Representation Learning for Recommender Systems\", KDD 2022): leave-one-out train/valid/"
    "test splits, item text keyed by ASIN. Each user's sequence is rebuilt in order; "
    "`timestamp` is the synthetic position 1..n, so RecBole's leave-one-out by time "
    "(`LS: valid_and_test`, order `TO`) reproduces the original valid and test targets."
)


def find_dataset(src: str | Path, dataset: str | None = None) -> str:
    """The ``<Name>`` of the ``<Name>.train.inter`` in ``src`` (must be unique if not given)."""
    src = require_dir(src, "UniSRec folder")
    found = sorted(p.name[: -len(".train.inter")] for p in src.glob("*.train.inter"))
    if dataset is not None:
        if dataset not in found:
            raise FileNotFoundError(
                f"{src}: no {dataset}.train.inter (found: {', '.join(found) or 'none'})"
            )
        return dataset
    if len(found) != 1:
        raise ValueError(
            f"{src}: expected exactly one <Name>.train.inter, found {len(found)} "
            f"({', '.join(found) or 'none'}); choose one with --dataset"
        )
    return found[0]


def read_index(path: Path) -> dict[str, str]:
    """A ``key<TAB>index`` file as ``{index: key}``; ValueError on a bad or duplicate row."""
    df = read_table(path, "\t", (), header=None)
    if df.shape[1] != 2:
        raise ValueError(
            f"{path}: expected 2 tab-separated columns (key, index), got {df.shape[1]}"
        )
    df.columns = ["key", "index"]
    if not df["index"].str.fullmatch(r"\d+").all() or df["index"].duplicated().any():
        raise ValueError(f"{path}: the index column must hold unique non-negative integers")
    require_rows(df, path)
    return dict(zip(df["index"], df["key"]))


def read_split(path: Path) -> pd.DataFrame:
    """One ``.inter`` split with the history as a tuple of item indices."""
    df = require_rows(read_atomic(path, INTER_COLUMNS), path)
    df["hist"] = [tuple(s.split()) for s in df["item_id_list"]]
    if (df["hist"].map(len) == 0).any():
        raise ValueError(f"{path}: a row has an empty item_id_list")
    return df[["user_id", "hist", "item_id"]]


def user_sequence(
    user: str, train: list, valid: tuple, test: tuple, window: int, where: Path
) -> list:
    """Rebuild one user's ordered item sequence from (history, target) rows."""
    start = min((h for h, _ in train), key=len, default=valid[0])
    seq = list(start)
    pending = defaultdict(list)
    for hist, target in train:
        pending[hist].append(target)
    for _ in range(len(train)):
        targets = pending.get(tuple(seq[-window:]))
        if not targets:
            raise ValueError(f"{where}: cannot chain the train rows of user {user!r}")
        seq.append(targets.pop())
    for split, (hist, target) in (("valid", valid), ("test", test)):
        if tuple(seq[-window:]) != hist:
            raise ValueError(
                f"{where}: the {split} history of user {user!r} does not continue its train rows"
            )
        seq.append(target)
    return seq


def reconstruct(splits: dict[str, pd.DataFrame], where: Path) -> dict[str, list]:
    """``{user index: full item-index sequence}`` in user-index order."""
    window = max(int(df["hist"].map(len).max()) for df in splits.values())
    one_row = {}
    for split in ("valid", "test"):
        df = splits[split]
        if df["user_id"].duplicated().any():
            raise ValueError(f"{where}.{split}.inter: a user has more than one row")
        one_row[split] = dict(zip(df["user_id"], zip(df["hist"], df["item_id"])))
    if set(one_row["valid"]) != set(one_row["test"]):
        raise ValueError(f"{where}: the valid and test splits hold different users")
    train = defaultdict(list)
    for user, hist, target in splits["train"].itertuples(index=False):
        train[user].append((hist, target))
    unknown = set(train) - set(one_row["test"])
    if unknown:
        raise ValueError(f"{where}.train.inter: user(s) without a test row, e.g. {min(unknown)!r}")
    users = sorted(one_row["test"], key=lambda u: (len(u), u))
    return {
        u: user_sequence(
            u, train.get(u, []), one_row["valid"][u], one_row["test"][u], window, where
        )
        for u in users
    }


def _lookup(index: dict[str, str], keys, path: Path) -> list[str]:
    """Map integer ids to their original tokens; ValueError naming the first unknown id."""
    try:
        return [index[k] for k in keys]
    except KeyError as exc:
        raise ValueError(
            f"{path}: id {exc.args[0]!r} is used in the .inter files but missing"
        ) from None


def sequences_frame(seqs: dict[str, list], users: dict, items: dict, base: Path) -> pd.DataFrame:
    """One interaction per position, with tokens and timestamp = position (1..n)."""
    user_idx = [u for u, s in seqs.items() for _ in s]
    item_idx = [i for s in seqs.values() for i in s]
    stamps = [float(p) for s in seqs.values() for p in range(1, len(s) + 1)]
    return pd.DataFrame(
        {
            "user_id": _lookup(users, user_idx, Path(f"{base}.user2index")),
            "item_id": _lookup(items, item_idx, Path(f"{base}.item2index")),
            "timestamp": stamps,
        }
    )


def build_unisrec(
    src: str | Path,
    *,
    dataset: str | None = None,
    name: str | None = None,
    market: str | None = None,
    command: str | None = None,
) -> AtomicDataset:
    """Read a UniSRec folder and rebuild it as a one-market dataset with item text."""
    src = require_dir(src, "UniSRec folder")
    dataset = find_dataset(src, dataset)
    name = name or dataset.lower()
    market = market or dataset.lower()
    base = src / dataset
    paths = [require_file(f"{base}.{s}.inter") for s in SPLITS]
    paths += [require_file(f"{base}.{ext}") for ext in ("text", "item2index", "user2index")]
    logger.info("reading %s.*", base)
    splits = {s: read_split(p) for s, p in zip(SPLITS, paths)}
    seqs = reconstruct(splits, base)
    frame = sequences_frame(seqs, read_index(paths[5]), read_index(paths[4]), base)
    text = read_atomic(paths[3], tuple(ITEM_FIELDS))
    extra = {f"{name}{p.name[len(dataset):]}": p for p in sorted(src.glob(f"{dataset}.feat*"))}
    if extra:  # precomputed features, in item2index row order: keep the index beside them
        extra[f"{name}.item2index"] = paths[4]
    return AtomicDataset(
        extra_files=extra,
        name=name,
        fmt="unisrec",
        fields=dict(FIELDS),
        markets={market: frame},
        items=text[list(ITEM_FIELDS)],
        item_fields=dict(ITEM_FIELDS),
        sources=paths,
        description=DESCRIPTION,
        notes=_notes(splits, seqs),
        command=command
        or call_repr("convert_unisrec", src, dataset=dataset, name=name, market=market),
    )


def _notes(splits: dict[str, pd.DataFrame], seqs: dict[str, list]) -> list[str]:
    window = max(int(df["hist"].map(len).max()) for df in splits.values())
    longer = sum(len(s) - 1 > window for s in seqs.values())
    return [
        f"{len(seqs)} users, {sum(map(len, seqs.values()))} interactions; the last two of each "
        "user are the original valid and test targets",
        f"source histories hold at most {window} items; {longer} user(s) have longer sequences, "
        "rebuilt by chaining their train rows",
    ]


def convert_unisrec(
    src: str | Path, out: str | Path, *, overwrite: bool = False, **kwargs
) -> Path:
    """Convert a UniSRec folder to ``<out>/<name>``; see :func:`build_unisrec`."""
    name = kwargs.get("name") or find_dataset(src, kwargs.get("dataset")).lower()
    check_target(out, name, overwrite)
    return write_dataset(build_unisrec(src, **kwargs), out, overwrite)
