"""Shared reading/validation helpers and the ONE atomic writer of multi-market datasets.

A multi-market dataset is a folder ``<out>/<name>/`` with one ``<market>.inter`` per market
(RecBole atomic file: tab separated, typed header such as ``user_id:token``) and/or split files
``<market>.<suffix>.inter`` (e.g. RecBole's ``benchmark_filename`` train/valid/test), optional
per-market ``<market>.user`` files, an optional shared ``<name>.item`` and a ``README.md``
describing its provenance.  Everything is written into a temporary sibling folder and renamed
into place only when complete.

Only stdlib, numpy and pandas are imported here (no recbole, no torch).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MARKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_WS_RE = r"[\t\r\n]+"


# --------------------------------------------------------------------------------------
# the dataset description handed to the writer
# --------------------------------------------------------------------------------------
@dataclass
class AtomicDataset:
    """An in-memory multi-market dataset, ready for :func:`write_dataset`.

    ``fields`` maps the ``.inter`` columns (in output order) to RecBole types; every frame in
    ``markets`` (written as ``<market>.inter``) and in ``splits`` (``{market: {suffix: frame}}``,
    written as ``<market>.<suffix>.inter``) must hold them.  A market may have a plain file,
    split files or both.  ``items`` (optional) is the shared item table typed by
    ``item_fields``; only items that occur in a written market are kept.  ``users`` (optional)
    maps a market to its user table typed by ``user_fields`` (written as ``<market>.user``):
    every user of the market's interaction files needs a row, and only those users are kept.
    ``market_items`` (optional) maps a market to its own item table typed by
    ``market_item_fields[market]`` (written as ``<market>.item``, e.g. an entity's specific item
    fields), restricted to the market's items. Users are disjoint across markets unless
    ``shared_users`` (entity types of one platform). ``extra_files`` (``{name: source path}``)
    are copied as they are (e.g. precomputed image features).
    ``sources`` are listed in the README with their SHA-256, relative to ``source_root`` when
    it is set (for files inside an installed package, whose absolute path varies).
    ``sections`` (``{title: markdown}``) are extra README sections, written after the notes.
    """

    name: str
    fmt: str
    fields: dict[str, str]
    markets: dict[str, pd.DataFrame]
    splits: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)
    items: pd.DataFrame | None = None
    item_fields: dict[str, str] = field(default_factory=dict)
    users: dict[str, pd.DataFrame] = field(default_factory=dict)
    user_fields: dict[str, str] = field(default_factory=dict)
    market_items: dict[str, pd.DataFrame] = field(default_factory=dict)
    market_item_fields: dict[str, dict[str, str]] = field(default_factory=dict)
    shared_users: bool = False
    extra_files: dict[str, Path] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    source_root: Path | None = None
    description: str = ""
    notes: list[str] = field(default_factory=list)
    command: str = ""
    sections: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------
def require_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """Return ``path`` as a Path, raising FileNotFoundError if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_dir(path: str | os.PathLike, what: str = "input folder") -> Path:
    """Return ``path`` as a Path, raising FileNotFoundError if it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_columns(columns: Iterable[str], required: Sequence[str], path: Path) -> None:
    """Raise ValueError naming ``path`` and the missing columns, if any."""
    present = set(columns)
    missing = [c for c in required if c not in present]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(map(str, columns)) or 'nothing'})"
        )


def require_rows(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Raise ValueError if ``df`` (read from ``path``) has no rows."""
    if len(df) == 0:
        raise ValueError(f"{path}: no data rows (empty market)")
    return df


def read_table(path: Path, sep: str, required: Sequence[str], **kwargs) -> pd.DataFrame:
    """Read a plain delimited text file as strings and check its header columns."""
    require_file(path)
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot parse ({_one_line(exc)})") from exc
    require_columns(df.columns, required, path)
    return df


def parse_typed_header(line: str, path: Path) -> dict[str, str]:
    """Parse a RecBole header line ``name:type<TAB>...`` into ``{name: type}``."""
    fields: dict[str, str] = {}
    for col in line.rstrip("\r\n").split("\t"):
        name, sep, ftype = col.partition(":")
        if not sep or not name or ftype not in FIELD_TYPES:
            raise ValueError(
                f"{path}: bad RecBole header column {col!r} (expected name:type with type "
                f"in {', '.join(FIELD_TYPES)})"
            )
        fields[name] = ftype
    return fields


def read_atomic(path: str | os.PathLike, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a RecBole atomic file (``.gz`` allowed) as strings; columns lose their types.

    The field types are kept in ``df.attrs["types"]``.  Quoting follows pandas' defaults,
    i.e. exactly how RecBole itself reads the file.
    """
    path = require_file(path)
    df = read_table(path, "\t", ())
    types = parse_typed_header("\t".join(map(str, df.columns)), path)
    df.columns = list(types)
    require_columns(df.columns, required, path)
    df.attrs["types"] = types
    return df


def parse_float(values: pd.Series, column: str, path: Path) -> pd.Series:
    """Parse ``values`` as floats; raise ValueError naming file, column, line and value."""
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna() & (values.astype(str).str.strip() != "")
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: column {column!r} has {int(bad.sum())} non-numeric value(s), first "
            f"{values.iloc[pos]!r} on data line {pos + 1}"
        )
    return num.astype(float)


def check_binary(values: pd.Series, column: str, path: Path) -> pd.Series:
    """Parse a label column as floats that must all be 0 or 1; ValueError naming a bad value."""
    num = parse_float(values, column, path)
    bad = ~num.isin((0.0, 1.0))
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: column {column!r} must be 0 or 1, found {values.iloc[pos]!r} on data line "
            f"{pos + 1} ({int(bad.sum())} bad value(s))"
        )
    return num


def parse_dates(values: pd.Series, column: str, path: Path, fmt: str = "%Y-%m-%d") -> pd.Series:
    """Parse dates (``fmt``, UTC) into unix seconds as float64; ValueError on a bad date."""
    dt = pd.to_datetime(values, format=fmt, errors="coerce", utc=True)
    bad = dt.isna()
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: unparsable date {values.iloc[pos]!r} in column {column!r} on data line "
            f"{pos + 1} (expected format {fmt})"
        )
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    return ((dt - epoch) // pd.Timedelta(seconds=1)).astype("float64")


def clean_text(values: pd.Series) -> pd.Series:
    """Strings with tabs/newlines replaced by single spaces (missing → empty string)."""
    return values.fillna("").astype(str).str.replace(_WS_RE, " ", regex=True)


def check_names(name: str, markets: Iterable[str]) -> None:
    """Validate the dataset and market names (they become file names)."""
    if not NAME_RE.match(name or ""):
        raise ValueError(f"invalid dataset name {name!r} (letters, digits, '.', '_', '-')")
    for market in markets:
        if not MARKET_RE.match(market or ""):
            raise ValueError(f"invalid market name {market!r} (letters, digits, '_', '-')")


def select_markets(
    available: Sequence[str], wanted: Sequence[str] | None, where: Path
) -> list[str]:
    """Return ``wanted`` (default: all ``available``), raising ValueError on unknown names."""
    if not available:
        raise ValueError(f"{where}: no market found")
    if not wanted:
        return list(available)
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ValueError(
            f"{where}: unknown market(s) {', '.join(unknown)} (available: {', '.join(available)})"
        )
    return list(dict.fromkeys(wanted))


# --------------------------------------------------------------------------------------
# filters shared by the converters
# --------------------------------------------------------------------------------------
def market_rng(seed: int, market: str) -> np.random.Generator:
    """A generator seeded by (seed, market): one market's sample ignores the others."""
    return np.random.default_rng([int(seed), zlib.crc32(market.encode("utf-8"))])


def sample_users(
    df: pd.DataFrame, max_users: int | None, seed: int, market: str, user_col: str = "user_id"
) -> pd.DataFrame:
    """Keep the rows of a seeded random sample of at most ``max_users`` users (row order kept)."""
    if max_users is None:
        return df
    if max_users < 1:
        raise ValueError(f"max users per market must be >= 1, got {max_users}")
    users = np.sort(df[user_col].unique().astype(str))
    if len(users) <= max_users:
        return df
    keep = market_rng(seed, market).choice(users, size=max_users, replace=False)
    return df[df[user_col].isin(keep)]


def last_k_per_user(
    df: pd.DataFrame, k: int | None, user_col: str = "user_id", time_col: str = "timestamp"
) -> pd.DataFrame:
    """Keep each user's last ``k`` rows by time (stable: ties keep file order; order kept)."""
    if k is None:
        return df
    if k < 1:
        raise ValueError(f"last-k must be >= 1, got {k}")
    order = df.reset_index(drop=True).sort_values(time_col, kind="stable")
    kept = np.sort(order.groupby(user_col, sort=False).tail(k).index.to_numpy())
    return df.iloc[kept]


def min_item_interactions(
    frames: dict[str, pd.DataFrame], n: int | None, item_col: str = "item_id"
) -> dict[str, pd.DataFrame]:
    """Drop items with fewer than ``n`` interactions summed over all markets (one pass)."""
    if not n or n <= 1:
        return frames
    counts = pd.concat([f[item_col] for f in frames.values()]).value_counts()
    keep = set(counts.index[counts >= n])
    return {m: f[f[item_col].isin(keep)] for m, f in frames.items()}


# --------------------------------------------------------------------------------------
# the writer
# --------------------------------------------------------------------------------------
def check_target(out: str | os.PathLike, name: str, overwrite: bool) -> Path:
    """Return ``<out>/<name>``; FileExistsError if it exists and ``overwrite`` is false."""
    check_names(name, ())
    target = Path(out) / name
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise FileExistsError(f"output exists: {target} (use --overwrite to replace it)")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output exists and is not a folder: {target}")
    return target


def write_dataset(ds: AtomicDataset, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate ``ds`` and write it atomically to ``<out>/<ds.name>``; return that path."""
    target = check_target(out, ds.name, overwrite)
    items, users = _validate(ds)
    created = _make_parents(Path(out))
    tmp = Path(tempfile.mkdtemp(prefix=f".{ds.name}.", suffix=".tmp", dir=out))
    try:
        os.chmod(tmp, 0o755)
        stats = _write_files(ds, items, users, tmp)
        (tmp / "README.md").write_text(_readme(ds, stats), encoding="utf-8")
        _swap_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            _rmdir_quiet(d)
        raise
    logger.info("wrote %s (%s)", target, ", ".join(f"{k}: {v[2]} rows" for k, v in stats.items()))
    return target


def _validate(ds: AtomicDataset) -> tuple[pd.DataFrame | None, dict[str, pd.DataFrame]]:
    """Check names, fields, non-empty markets and user disjointness; return the item table
    and the per-market user tables."""
    check_names(ds.name, _market_names(ds))
    for market, parts in ds.splits.items():
        for suffix in parts:
            if not MARKET_RE.match(suffix or ""):
                raise ValueError(
                    f"market {market!r}: invalid split suffix {suffix!r} "
                    "(letters, digits, '_', '-')"
                )
    if not _market_names(ds):
        raise ValueError(f"dataset {ds.name!r}: no market to write")
    for fields in (ds.fields, ds.item_fields, ds.user_fields, *ds.market_item_fields.values()):
        bad = {c: t for c, t in fields.items() if t not in FIELD_TYPES}
        if bad:
            raise ValueError(f"dataset {ds.name!r}: unsupported field type(s) {bad}")
    for stem, _, frame in _inter_frames(ds):
        require_columns(frame.columns, list(ds.fields), Path(f"{stem}.inter"))
        if len(frame) == 0:
            raise ValueError(f"market {stem!r} is empty (no interactions left)")
    if not ds.shared_users:
        _check_user_disjoint(ds)
    return _items_in_markets(ds), _users_of_markets(ds)


def _market_names(ds: AtomicDataset) -> list[str]:
    """Every market of ``ds``: those with a plain file first, then split-only ones."""
    return list(dict.fromkeys([*ds.markets, *ds.splits]))


def _market_frames(ds: AtomicDataset, market: str):
    """Yield (file stem, frame) for the .inter files of one market: plain, then splits."""
    if market in ds.markets:
        yield market, ds.markets[market]
    for suffix, frame in ds.splits.get(market, {}).items():
        yield f"{market}.{suffix}", frame


def _inter_frames(ds: AtomicDataset):
    """Yield (file stem, market, frame) for every .inter file of ``ds``, market by market."""
    for market in _market_names(ds):
        for stem, frame in _market_frames(ds, market):
            yield stem, market, frame


def _market_users(ds: AtomicDataset) -> dict[str, np.ndarray]:
    """The user tokens of each market's interaction files (first-seen order)."""
    frames: dict[str, list[pd.Series]] = {}
    for _, market, frame in _inter_frames(ds):
        frames.setdefault(market, []).append(frame["user_id"])
    return {m: pd.unique(pd.concat(cols)) for m, cols in frames.items()}


def _check_user_disjoint(ds: AtomicDataset) -> None:
    """Raise ValueError if a user token occurs in two markets."""
    if "user_id" not in ds.fields:
        return
    owner: dict[str, str] = {}
    for market, users in _market_users(ds).items():
        for user in users:
            other = owner.setdefault(user, market)
            if other != market:
                raise ValueError(f"user {user!r} occurs in markets {other!r} and {market!r}")


def _users_of_markets(ds: AtomicDataset) -> dict[str, pd.DataFrame]:
    """Each ``<market>.user`` table, checked to cover the market's users and restricted to them."""
    if not ds.users:
        return {}
    unknown = [m for m in ds.users if m not in _market_names(ds)]
    if unknown:
        raise ValueError(f"user table(s) for unknown market(s) {', '.join(unknown)}")
    if "user_id" not in ds.user_fields or "user_id" not in ds.fields:
        raise ValueError(
            f"dataset {ds.name!r}: user tables need a user_id field in .inter and .user"
        )
    used = _market_users(ds)
    tables = {}
    for market, table in ds.users.items():
        path = Path(f"{market}.user")
        require_columns(table.columns, list(ds.user_fields), path)
        dup = table["user_id"][table["user_id"].duplicated()]
        if len(dup):
            raise ValueError(f"{path}: user {dup.iloc[0]!r} has more than one row")
        have = set(table["user_id"])
        missing = [u for u in used[market] if u not in have]
        if missing:
            raise ValueError(
                f"{path}: no row for {len(missing)} user(s) of market {market!r}, first "
                f"{missing[0]!r}"
            )
        tables[market] = table.loc[table["user_id"].isin(set(used[market])), list(ds.user_fields)]
    return tables


def _items_in_markets(ds: AtomicDataset) -> pd.DataFrame | None:
    """The item table restricted (and extended with empty rows) to items in the markets."""
    if ds.items is None:
        return None
    require_columns(ds.items.columns, list(ds.item_fields), Path(f"{ds.name}.item"))
    if "item_id" not in ds.item_fields:
        raise ValueError(f"{ds.name}.item: the item table needs an item_id field")
    used = pd.unique(pd.concat([f["item_id"] for _, _, f in _inter_frames(ds)]))
    table = ds.items.drop_duplicates("item_id").set_index("item_id")
    table = table.reindex(sorted(used)).rename_axis("item_id").reset_index()
    return table[list(ds.item_fields)]


def _market_item_tables(ds: AtomicDataset) -> dict[str, pd.DataFrame]:
    """Each ``<market>.item`` table: one row per item of the market's interaction files."""
    tables = {}
    for market, table in ds.market_items.items():
        path = Path(f"{market}.item")
        if market not in _market_names(ds) or market not in ds.market_item_fields:
            raise ValueError(f"{path}: item table of an unknown market or without its fields")
        fields = ds.market_item_fields[market]
        require_columns(table.columns, list(fields), path)
        used = pd.unique(pd.concat([f["item_id"] for _, f in _market_frames(ds, market)]))
        missing = sorted(set(used) - set(table["item_id"]))
        if missing:
            raise ValueError(f"{path}: no row for item {missing[0]!r} of market {market!r}")
        table = table.drop_duplicates("item_id").set_index("item_id").reindex(sorted(used))
        tables[market] = table.rename_axis("item_id").reset_index()[list(fields)]
    return tables


def _make_parents(out: Path) -> list[Path]:
    """mkdir -p ``out``; return the folders created (to remove them on failure)."""
    missing = []
    p = out.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _swap_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``target``; an existing target is replaced only if ``overwrite``."""
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(f"output exists: {target} (use --overwrite to replace it)")
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    old = backup / target.name
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _write_files(
    ds: AtomicDataset, items: pd.DataFrame | None, users: dict[str, pd.DataFrame], folder: Path
) -> dict:
    """Write every .inter, .user and .item file; return per-file (users, items, rows)."""
    stats = {}
    for market in _market_names(ds):
        for stem, frame in _market_frames(ds, market):
            write_atomic(frame, ds.fields, folder / f"{stem}.inter")
            stats[f"{stem}.inter"] = _counts(frame)
        if market in users:
            table = users[market]
            write_atomic(table, ds.user_fields, folder / f"{market}.user")
            stats[f"{market}.user"] = (len(table), "-", len(table))
    for market, table in _market_item_tables(ds).items():
        write_atomic(table, ds.market_item_fields[market], folder / f"{market}.item")
        stats[f"{market}.item"] = ("-", len(table), len(table))
    if items is not None:
        write_atomic(items, ds.item_fields, folder / f"{ds.name}.item")
        stats[f"{ds.name}.item"] = ("-", len(items), len(items))
    for name, source in ds.extra_files.items():
        shutil.copyfile(require_file(source, "extra file"), folder / name)
        stats[name] = ("-", "-", f"{os.path.getsize(folder / name)} bytes")
    return stats


def write_atomic(frame: pd.DataFrame, fields: Mapping[str, str], path: Path) -> None:
    """Write ``frame[fields]`` as a RecBole atomic file with a typed header."""
    out = pd.DataFrame(
        {col: _format_column(frame[col], ftype) for col, ftype in fields.items()}
    )
    out.columns = [f"{col}:{ftype}" for col, ftype in fields.items()]
    out.to_csv(path, sep="\t", index=False, lineterminator="\n", encoding="utf-8")


def _format_column(values: pd.Series, ftype: str) -> pd.Series:
    """Text for one column: floats without a spurious '.0', tokens without tabs/newlines."""
    if ftype == "float" and pd.api.types.is_numeric_dtype(values):
        return pd.Series(_fmt_floats(values.to_numpy(dtype=float)), index=values.index)
    return clean_text(values)


def _fmt_floats(values: np.ndarray) -> np.ndarray:
    """Whole numbers (below 2**53) as integers, NaN as empty, any other value by ``repr``."""
    text = np.full(len(values), "", dtype=object)
    whole = np.isfinite(values) & (np.abs(values) < 2**53)
    whole[whole] = values[whole] == np.trunc(values[whole])
    text[whole] = values[whole].astype(np.int64).astype(str)
    other = ~whole & ~np.isnan(values)
    text[other] = [repr(float(v)) for v in values[other]]
    return text


def _counts(frame: pd.DataFrame) -> tuple:
    users = frame["user_id"].nunique() if "user_id" in frame else "-"
    items = frame["item_id"].nunique() if "item_id" in frame else "-"
    return users, items, len(frame)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _readme(ds: AtomicDataset, stats: dict) -> str:
    """README.md text: origin, command line, files and per-market counts."""
    lines = [f"# {ds.name}", "", f"Multi-market RecBole atomic dataset written by "
             f"`recbole_cmr.data.convert` ({ds.fmt} converter).", ""]
    if ds.description:
        lines += ["## Origin", "", ds.description.strip(), ""]
    if ds.sources:
        lines += ["Source files (SHA-256):", ""]
        lines += [f"- `{_shown(p, ds.source_root)}` ({sha256(Path(p))})" for p in ds.sources]
        lines += [""]
    lines += ["## Command", "", "```", ds.command or "(unknown)", "```", ""]
    lines += ["## Files", "", "| file | users | items | rows |", "|---|---|---|---|"]
    lines += [f"| {name} | {u} | {i} | {n} |" for name, (u, i, n) in stats.items()]
    lines += ["", f"`.inter` header: `{_header(ds.fields)}`"]
    if ds.users:
        lines += ["", f"`.user` header: `{_header(ds.user_fields)}`"]
    if ds.items is not None:
        lines += ["", f"`.item` header: `{_header(ds.item_fields)}`"]
    if ds.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in ds.notes]
    for title, body in ds.sections.items():
        lines += ["", f"## {title}", "", body.strip()]
    return "\n".join(lines) + "\n"


def _shown(path: str | os.PathLike, root: Path | None) -> str:
    """``path`` as listed in the README: relative to ``root`` (POSIX style) when given."""
    if root is None:
        return str(path)
    return Path(path).relative_to(root).as_posix()


def _header(fields: Mapping[str, str]) -> str:
    return "\\t".join(f"{c}:{t}" for c, t in fields.items())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def call_repr(func: str, *args, **kwargs) -> str:
    """A Python-call description of a conversion, for the README of API-made datasets."""
    def _r(value):
        return repr(str(value)) if isinstance(value, os.PathLike) else repr(value)

    parts = [_r(a) for a in args] + [f"{k}={_r(v)}" for k, v in kwargs.items()]
    return f"{func}({', '.join(parts)})"
