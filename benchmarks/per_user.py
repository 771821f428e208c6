"""Per-user test values of a benchmark run record (issue 39): what a paired comparison of two runs
needs, kept beside the record as one compressed sidecar.

A record ``<stem>.json`` with per-user values has ``<stem>.per_user.npz`` next to it
(``np.savez_compressed``, no pickled objects): one array per
``<market>/<stage>/<protocol>/<field>``, where ``stage`` is ``final`` (the reported model) or
``federated`` (a fine-tuned federated model's stage before fine-tuning), ``protocol`` the test
protocol (``full``, ``uni99``; ``labeled`` for CTR) and ``field`` ``user`` or a value field
(``ndcg@10``, ``hit@10``, ... per test user; ``label``, ``score`` or ``label_<task>``,
``score_<task>`` per CTR row; float32), all of one length per ``(market, stage, protocol)``. The
user tokens are stored once per market, ``<market>/users`` (a fixed-width unicode array), and each
``user`` array holds int32 positions into it: every stage and protocol lists the same users, and
the tokens are most of the file (xmrec-mini, FeCoSR: 87 % when stored per protocol). The sidecar is written before the record, which marks a finished
run, and the record names it under ``per_user`` (:func:`describe`). Records without one (every
record written before) stay valid: :func:`read_per_user` gives None for them.
"""

import json
import os
from pathlib import Path

import numpy as np

SUFFIX = ".per_user.npz"
KEY = "<market>/<stage>/<protocol>/<field>"
USER = "user"


def sidecar_path(record_file):
    """``<stem>.per_user.npz`` beside the record ``<stem>.json`` (a path or a string)."""
    record_file = Path(record_file)
    return record_file.with_name(record_file.stem + SUFFIX)


def _arrays(values):
    """``{"<market>/<stage>/<protocol>/<field>": array}`` of ``{market: {stage: {protocol:
    {field: list}}}}``: ``user`` as int32 positions ``(n,)`` in ``<market>/users`` (unicode tokens
    ``(n_users,)``), every other field float32 ``(n,)``; a protocol without values (``{}``) is
    left out."""
    arrays = {}
    for market, stages in values.items():
        tokens = {}  # token -> position in <market>/users
        for stage, protocols in stages.items():
            for protocol, fields in protocols.items():
                if not fields:
                    continue
                names = (market, stage, protocol)
                if any("/" in str(name) for name in names):
                    raise ValueError(f"per-user values of {'/'.join(map(str, names))}: market, stage "
                                     "and protocol names must not contain '/' (they join the npz keys)")
                arrays.update(_fields(names, fields, tokens))
        if tokens:
            arrays[f"{market}/users"] = np.asarray(list(tokens), dtype=str)
    return arrays


def _fields(names, fields, tokens):
    """One ``(market, stage, protocol)``'s arrays, each checked to be as long as its ``user``;
    ``user`` as int32 positions in ``tokens`` (``{token: position}``, new tokens added)."""
    if USER not in fields:
        raise ValueError(f"per-user values of {'/'.join(names)} have no '{USER}' tokens: pass the "
                         "trainer's last_per_user (or a result's per_user) as it is")
    prefix = "/".join(names)
    users = np.asarray([tokens.setdefault(str(u), len(tokens)) for u in fields[USER]], dtype=np.int32)
    out = {f"{prefix}/{USER}": users}
    for field, column in fields.items():
        if field != USER:
            out[f"{prefix}/{field}"] = np.asarray(column, dtype=np.float32)
            if out[f"{prefix}/{field}"].shape != users.shape:
                raise ValueError(f"per-user values of {prefix}: field '{field}' has "
                                 f"{len(column)} values for {users.size} users")
    return out


def describe(record_file, arrays):
    """What the record says of its sidecar: ``{"file", "keys", "markets": {market: {stage:
    {protocol: rows}}}, "fields", "dtype"}``."""
    markets, fields = {}, set()
    for key, array in arrays.items():
        if key.count("/") != 3:  # <market>/users
            continue
        market, stage, protocol, field = key.split("/")
        markets.setdefault(market, {}).setdefault(stage, {})[protocol] = int(array.shape[0])
        fields.add(field)
    return {"file": sidecar_path(record_file).name, "keys": KEY, "markets": markets,
            "fields": sorted(fields),
            "dtype": "float32 values; user: int32 positions in <market>/users (unicode tokens)"}


def write_per_user(values, record_file):
    """Write ``values`` (``{market: {stage: {protocol: {field: [n]}}}}``) to the record's sidecar
    atomically (a temporary file, then a rename); returns :func:`describe` of it."""
    arrays = _arrays(values)
    path = sidecar_path(record_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:  # a file object: numpy adds no second ".npz"
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, path)
    return describe(record_file, arrays)


def lacks_per_user(record_file):
    """True when the record in ``record_file`` names no per-user sidecar, or its sidecar file is
    missing (a run from before the sidecars, which a paired comparison cannot use)."""
    record = json.loads(Path(record_file).read_text())
    return "per_user" not in record or not sidecar_path(record_file).exists()


def read_per_user(record_file):
    """``{market: {stage: {protocol: {field: array (n,)}}}}`` of the record's sidecar (``user``:
    unicode tokens; values float32), or None when the record has none."""
    path = sidecar_path(record_file)
    if not path.exists():
        return None
    nested = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            if key.count("/") != 3:  # <market>/users: read with its positions
                continue
            market, stage, protocol, field = key.split("/")
            array = data[f"{market}/users"][data[key]] if field == USER else data[key]
            nested.setdefault(market, {}).setdefault(stage, {}).setdefault(protocol, {})[field] = array
    return nested


def write_record(record, out_file, per_user=None):
    """Write a run record (JSON; numpy numbers as Python numbers) to ``out_file`` atomically; with
    ``per_user`` (see :func:`write_per_user`), its sidecar first, and the record names it under
    ``per_user``."""
    if per_user:
        record = {**record, "per_user": write_per_user(per_user, out_file)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_number))
    os.replace(tmp, out_file)


def _number(value):
    """A numpy scalar as the Python number it holds (``json.dumps``'s ``default``)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a run record holds {type(value).__name__} {value!r}, which JSON cannot store")
