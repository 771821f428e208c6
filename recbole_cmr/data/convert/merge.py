"""Merge converted dataset folders into one multi-market dataset (e.g. ANT's auxiliary domains
and its target: ``merge dataset/office-products dataset/movielens-markets:ml100k
dataset/scientific --name scientific-transfer``).

Each input is ``<folder>`` (every market) or ``<folder>:<market>,<market>`` (those markets). The
markets keep their names and rows (names must not repeat); the item tables (``<folder>.item``)
become one ``<name>.item`` (an item token in two inputs must have the same row); ``<market>.user``
files go along; every other file of an input named ``<folder>.<suffix>`` (e.g. image features
and their index) is copied as ``<name>.<suffix>``. The interaction fields are those every input
has (the others are dropped, as the README notes); the item table has every input's item fields
(empty where an input lacks one: e.g. ``text`` and ``title`` side by side - name both in
``item_text_fields``); user fields must agree.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .atomic import AtomicDataset, call_repr, check_target, read_atomic, require_dir, write_dataset

OWN = (".inter", ".user", ".item", "README.md")


def parse_input(spec: str) -> tuple[Path, list[str] | None]:
    """``folder[:m1,m2]`` -> (folder, markets or None)."""
    folder, sep, markets = spec.rpartition(":") if ":" in Path(spec).name else (spec, "", "")
    return require_dir(folder, "dataset folder"), (markets.split(",") if sep else None)


def _markets(folder: Path, wanted: list[str] | None) -> list[str]:
    found = sorted(p.name[: -len(".inter")] for p in folder.glob("*.inter"))
    if wanted is None:
        return found
    missing = [m for m in wanted if m not in found]
    if missing:
        raise FileNotFoundError(f"{folder}: no market {missing} (its markets: {found})")
    return wanted


def _same_types(kind, types, path, reference):
    if reference is not None and types != reference[0]:
        raise ValueError(f"{path} and {reference[1]} have different {kind} fields: {types} vs "
                         f"{reference[0]}")
    return reference or (types, path)


def build_merge(inputs: list[str], *, name: str, command: str | None = None) -> AtomicDataset:
    """Read the input folders and combine their markets (see the module docstring)."""
    markets, users, item_frames, extra, sources = {}, {}, [], {}, []
    user_fields = None
    for spec in inputs:
        folder, wanted = parse_input(spec)
        for market in _markets(folder, wanted):
            path = folder / f"{market}.inter"
            if market in markets:
                raise ValueError(f"{path}: market {market!r} is in two inputs; rename one")
            markets[market] = read_atomic(path)
            if (folder / f"{market}.user").is_file():
                users[market] = read_atomic(folder / f"{market}.user")
                user_fields = _same_types("user", users[market].attrs["types"],
                                          folder / f"{market}.user", user_fields)
            sources.append(path)
        item_path = folder / f"{folder.name}.item"
        if item_path.is_file():
            item_frames.append(read_atomic(item_path))
        for path in sorted(folder.glob(f"{folder.name}.*")):
            if not path.name.endswith(OWN):
                target = f"{name}{path.name[len(folder.name):]}"
                if target in extra:
                    raise ValueError(f"{path} and {extra[target]} would both become {target}")
                extra[target] = path
    items, item_fields = _merged_items(item_frames)
    fields, dropped = _common_fields(markets)
    return AtomicDataset(
        name=name, fmt="merge", fields=fields, markets=markets,
        items=items, item_fields=item_fields,
        users=users, user_fields=dict(user_fields[0]) if user_fields else {},
        extra_files=extra, sources=sources,
        description="Markets of several converted datasets, merged: " + ", ".join(inputs),
        notes=[f"market `{m}`: {len(f)} rows, {f['user_id'].nunique()} users"
               for m, f in markets.items()] + [f"dropped (not in every input): {dropped}"] * bool(dropped),
        command=command or call_repr("convert_merge", inputs, name=name))


def _common_fields(markets):
    """``({field: type} every market has, [dropped fields])``; a field typed differently in two
    markets is an error."""
    types = {}
    for market, frame in markets.items():
        for field, ftype in frame.attrs["types"].items():
            if types.setdefault(field, ftype) != ftype:
                raise ValueError(f"field {field!r} is {types[field]} in one input and {ftype} in "
                                 f"market {market!r}")
    common = {f: t for f, t in types.items() if all(f in m.columns for m in markets.values())}
    return common, sorted(set(types) - set(common))


def _merged_items(frames):
    """``(item table, {field: type})``: every input's item fields (empty where an input lacks
    one); a token in two inputs must have the same row."""
    if not frames:
        return None, {}
    types = {}
    for frame in frames:
        for field, ftype in frame.attrs["types"].items():
            if types.setdefault(field, ftype) != ftype:
                raise ValueError(f"item field {field!r} is {types[field]} in one input and {ftype} "
                                 "in another")
    items = pd.concat(frames, ignore_index=True).fillna("").drop_duplicates()
    clash = items["item_id"][items["item_id"].duplicated()]
    if len(clash):
        raise ValueError(f"item {clash.iloc[0]!r} has different rows in two inputs' .item files")
    return items[list(types)], types


def convert_merge(inputs: list[str], out: str | Path, *, name: str, overwrite: bool = False,
                  command: str | None = None) -> Path:
    """Merge ``inputs`` into ``<out>/<name>``; see :func:`build_merge`."""
    check_target(out, name, overwrite)
    return write_dataset(build_merge(inputs, name=name, command=command), out, overwrite)
