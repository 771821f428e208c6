"""Ali-CCP train/valid/test CSVs → one market per scenario, in RecBole benchmark files.

Input: three CSVs in the widely used processed layout of Ali-CCP (Alibaba Click and Conversion
Prediction, Ma et al., SIGIR 2018; as used by torch-rechub and Scenario-Wise-Rec): ``click``,
``purchase``, categorical feature columns named by their field id (``101``, ``121``, ...,
``109_14``, ...) and dense columns ``D<field>`` (``D109_14``, ..., ``D853``).  Column ``301`` is
the scenario: value ``v`` becomes market ``scenario<v>``.  Per market the rows of each CSV are
written, in file order, to ``<market>.train.inter``, ``<market>.valid.inter`` and
``<market>.test.inter`` (RecBole's ``benchmark_filename: [train, valid, test]``), all with the
header ``click:float purchase:float <feature>:token ... D<field>:float ...``.  Values are copied
verbatim after checking that the labels are 0/1 and the dense columns parse.  There is no
user/item column and no .item.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .atomic import (
    AtomicDataset,
    call_repr,
    check_binary,
    check_names,
    check_target,
    parse_float,
    read_table,
    require_rows,
    write_dataset,
)

logger = logging.getLogger(__name__)

LABELS = ("click", "purchase")
SCENARIO = "301"
SPLITS = ("train", "valid", "test")
DENSE_PREFIX = "D"
DESCRIPTION = (
    "Ali-CCP (Alibaba Click and Conversion Prediction; Ma et al., \"Entire Space Multi-Task "
    "Model\", SIGIR 2018) in the widely used processed CSV layout (as in torch-rechub and "
    "Scenario-Wise-Rec): `click`, `purchase`, categorical features named by their field id and "
    "dense `D*` features. Column `301` is the scenario; scenario `v` is market `scenario<v>`, "
    "and each input CSV (train, valid, test) becomes `<market>.<split>.inter` for RecBole's "
    "`benchmark_filename: [train, valid, test]`."
)


def fields_of(columns: list[str]) -> dict[str, str]:
    """The output fields: labels (float), categorical (token), then dense ``D*`` (float)."""
    features = [c for c in columns if c not in LABELS and c != SCENARIO]
    tokens = [c for c in features if not c.startswith(DENSE_PREFIX)]
    dense = [c for c in features if c.startswith(DENSE_PREFIX)]
    return {**{c: "float" for c in LABELS}, **{c: "token" for c in tokens},
            **{c: "float" for c in dense}}


def read_split(path: str | Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """One Ali-CCP CSV as strings (labels and dense columns checked) and its fields."""
    path = Path(path)
    logger.info("reading %s", path)
    df = require_rows(read_table(path, ",", [*LABELS, SCENARIO]), path)
    fields = fields_of(list(df.columns))
    for col in LABELS:
        check_binary(df[col], col, path)
    for col, ftype in fields.items():
        if ftype == "float" and col not in LABELS:
            parse_float(df[col], col, path)
    empty = df[SCENARIO].str.strip() == ""
    if empty.any():
        line = int(empty.to_numpy().nonzero()[0][0]) + 1
        raise ValueError(f"{path}: column {SCENARIO!r} (scenario) is empty on data line {line}")
    return df, fields


def _same_columns(fields: dict[str, str], other: dict[str, str], path: Path, train: Path) -> None:
    """ValueError naming ``path`` if its feature columns differ from the train CSV's."""
    if set(other) != set(fields):
        missing = [c for c in fields if c not in other]
        extra = [c for c in other if c not in fields]
        raise ValueError(
            f"{path}: columns differ from the train CSV {train} (missing: "
            f"{', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'})"
        )


def _scenario_key(value: str):
    """Sort key of scenario values: numbers numerically, before other strings."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def build_aliccp(
    train: str | Path,
    valid: str | Path,
    test: str | Path,
    *,
    name: str = "ali-ccp",
    command: str | None = None,
) -> AtomicDataset:
    """Read the three CSVs and split every one of them by scenario."""
    paths = dict(zip(SPLITS, (Path(train), Path(valid), Path(test))))
    frames, fields = {}, {}
    for split, path in paths.items():
        frames[split], fields[split] = read_split(path)
        _same_columns(fields["train"], fields[split], path, paths["train"])
    scenarios = {s: sorted(pd.unique(f[SCENARIO]), key=_scenario_key) for s, f in frames.items()}
    for split in SPLITS[1:]:
        unknown = [v for v in scenarios[split] if v not in set(scenarios["train"])]
        if unknown:
            raise ValueError(
                f"{paths[split]}: scenario(s) {', '.join(unknown)} (column {SCENARIO!r}) do not "
                f"occur in the train CSV {paths['train']}"
            )
    market_of = {v: f"scenario{v}" for v in scenarios["train"]}
    check_names(name, market_of.values())
    splits: dict[str, dict[str, pd.DataFrame]] = {m: {} for m in market_of.values()}
    notes = []
    for value, market in market_of.items():
        for split, frame in frames.items():
            rows = frame[frame[SCENARIO] == value]
            if len(rows) == 0:
                raise ValueError(
                    f"{paths[split]}: no row of scenario {value} (column {SCENARIO!r}), which "
                    f"occurs in the train CSV; every split needs every scenario"
                )
            splits[market][split] = rows[list(fields["train"])]
        notes.append(_note(market, splits[market]))
    return AtomicDataset(
        name=name,
        fmt="ali-ccp",
        fields=dict(fields["train"]),
        markets={},
        splits=splits,
        sources=list(paths.values()),
        description=DESCRIPTION,
        notes=notes,
        command=command
        or call_repr("convert_aliccp", *map(str, paths.values()), name=name),
    )


def _note(market: str, parts: dict[str, pd.DataFrame]) -> str:
    counts = "; ".join(
        f"{split}: {len(f)} rows, clicks {int(f['click'].astype(float).sum())}, "
        f"purchases {int(f['purchase'].astype(float).sum())}"
        for split, f in parts.items()
    )
    return f"`{market}`: {counts}"


def convert_aliccp(train: str | Path, valid: str | Path, test: str | Path, out: str | Path, *,
                   overwrite: bool = False, **kwargs) -> Path:
    """Convert Ali-CCP CSVs to ``<out>/<name>``; see :func:`build_aliccp`."""
    check_target(out, kwargs.get("name", "ali-ccp"), overwrite)
    return write_dataset(build_aliccp(train, valid, test, **kwargs), out, overwrite)
