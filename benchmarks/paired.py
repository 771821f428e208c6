"""Paired comparisons of two benchmark models from their runs' per-user sidecars (issue 39).

Every summary states its targets ("A above B", "A >= 1.10 x B", "A at least level with B") through
:func:`compare`: seed ``s`` of A is paired with seed ``s`` of B, on the seeds where both runs kept
per-user values (``per_user.py``), users (CTR: rows, or users for the group AUC) are resampled within
each market by ``recbole_cmr.stats`` (BCa, ``scipy.stats.bootstrap``) and markets are averaged as
the macro is. The verdict reads the interval: **met** when it lies wholly on the target's side,
**level** when it straddles, **missed** otherwise; an "at least level" target is met unless the
interval lies wholly below. Runs without per-user values (records written before the sidecars)
are named in the row's ``note`` and give no verdict.

A side of a comparison is a model name (its records ``<folder>/<name>-seed<S>.json``) or
``(name, stage)``: ``stage`` ``final`` (the reported model) or ``federated`` (a fine-tuned federated
model's stage before fine-tuning).
"""

from functools import lru_cache

import numpy as np

from per_user import read_per_user, sidecar_path
from recbole_cmr import stats

KINDS = ("ranking", "auc", "gauc")
RELATIONS = ("above", "at_least")
N_RESAMPLES = 9999


def compare(folder, a, b, seeds, *, protocol, field="ndcg@10", kind="ranking", markets=None,
            tasks=None, contrast="difference", threshold=None, relation="above"):
    """The paired interval and verdict of "A <relation> B" on the seeds both ran.

    Args:
        folder (Path): the folder of the run records.
        a, b (str or tuple): model name, or ``(name, stage)``.
        seeds (Iterable[int]): the seeds both models ran (their records exist).
        protocol (str): the sidecar protocol (``full``, ``uni99``, ``labeled``).
        field (str): the per-user value compared (ranking: ``ndcg@10``, ``hit@10``, ...).
        kind (str): ``ranking`` (per-user values), ``auc`` (rows' AUC) or ``gauc`` (rows' group
            AUC, users resampled).
        markets (list or None): the markets averaged (default: every market of A's first run).
        tasks (list or None): CTR tasks averaged within each market (fields ``label_<task>``,
            ``score_<task>``); None for one task (``label``, ``score``).
        contrast (str): ``difference`` (A - B) or ``ratio`` (A / B).
        threshold (float or None): the value the contrast must beat (default 0, or 1 for a ratio).
        relation (str): ``above`` (interval wholly beyond the threshold) or ``at_least`` (not
            wholly below it).

    Returns:
        dict: ``{"seeds", "contrast", "diff", "ci_low", "ci_high", "n", "method", "verdict"}`` (and ``note``
        naming seeds left out for lack of per-user values), or ``{"seeds": [], "verdict": None,
        "note"}`` when no seed has per-user values on both sides.
    """
    if kind not in KINDS or relation not in RELATIONS:
        raise ValueError(f"kind must be one of {KINDS} and relation one of {RELATIONS}, got "
                         f"{kind!r}, {relation!r}")
    threshold = (1.0 if contrast == "ratio" else 0.0) if threshold is None else threshold
    sides = [_side(a), _side(b)]
    values, missing = {}, []
    for seed in sorted(seeds):
        runs = [_values(folder, name, seed) for name, _ in sides]
        absent = [f"{name}-seed{seed}" + ("" if run is None else f" ({stage}/{protocol})")
                  for (name, stage), run in zip(sides, runs)
                  if run is None or not _holds(run[1], stage, protocol, markets)]
        missing += absent
        if not absent:
            values[seed] = [run[1] for run in runs]
    missing = list(dict.fromkeys(missing))
    note = _missing_note(missing, seeds_left_out=bool(values))
    if not values:
        return {"seeds": [], "verdict": None, "note": note, "without_per_user": missing}
    markets = markets or list(next(iter(values.values()))[0])
    strata = {m: _stratum(values, sides, m, protocol, field, kind, tasks) for m in markets}
    compute = {"ranking": stats.macro_paired_difference, "auc": stats.macro_auc_difference,
               "gauc": stats.macro_gauc_difference}[kind]
    result = compute(strata, contrast=contrast, n_resamples=N_RESAMPLES).to_dict()
    verdict = stats.verdict(result["ci_low"], result["ci_high"], threshold)
    if relation == "at_least" and verdict == "level":
        verdict = "met"
    row = {"seeds": sorted(values), "contrast": contrast, **result, "verdict": verdict}
    return {**row, "note": note, "without_per_user": missing} if missing else row


def per_market(folder, a, b, seeds, **options):
    """``{market: compare(...)}`` of each market on its own (options as in :func:`compare`);
    ``{}`` when A kept no per-user values on these seeds."""
    runs = [_values(folder, _side(a)[0], seed) for seed in sorted(seeds)]
    run = next((r for r in runs if r is not None), None)
    if run is None:
        return {}
    return {m: compare(folder, a, b, seeds, markets=[m], **options) for m in run[1]}


def no_market_below(folder, a, b, seeds, **options):
    """``{"verdict", "paired", "markets"}`` of "no market where A is significantly below B":
    missed when some market's paired interval of A - B lies wholly below zero, met otherwise,
    None where a run kept no per-user values (options as in :func:`compare`)."""
    rows = per_market(folder, a, b, seeds, **options)
    if not rows or any(r["verdict"] is None for r in rows.values()):
        note = next((r["note"] for r in rows.values() if r.get("note")), None)
        return {"verdict": None, "paired": note or _absent(folder, [a, b], seeds), "markets": rows}
    below = [m for m, r in rows.items() if r["ci_high"] < 0]
    lowest = min(rows, key=lambda m: rows[m]["ci_high"])
    text = (f"significantly below in {', '.join(below)}" if below else "no market significantly "
            f"below; lowest {lowest}: {interval_text(rows[lowest])}")
    return {"verdict": "missed" if below else "met", "paired": text, "markets": rows}


def target_row(folder, target, runs, a, b, measured=None, **options):
    """One benchmark target "A vs B" on the seeds both ran: ``{"target", "seeds", "measured",
    "verdict", "paired", ...}`` with :func:`compare`'s fields (``paired_seeds``: the seeds with
    per-user values), or ``verdict`` None and ``measured`` "not run yet" / "no seed run by both".

    Args:
        folder (Path): the records' folder.
        target (str): the target's wording.
        runs (list[dict]): the current run records (``name``, ``seed``).
        a, b: the sides, as in :func:`compare`.
        measured (callable or None): ``measured(seeds)`` -> text comparing the means.
        options: :func:`compare`'s keyword arguments; ``per_market=True`` reads the target as
            :func:`no_market_below`.
    """
    seeds_a, seeds_b = ({r["seed"] for r in runs if r["name"] == _side(side)[0]} for side in (a, b))
    seeds = sorted(seeds_a & seeds_b)
    if not seeds:
        measured_text = "no seed run by both" if seeds_a and seeds_b else "not run yet"
        return {"target": target, "seeds": [], "measured": measured_text, "verdict": None}
    row = {"target": target, "seeds": seeds, "measured": measured(seeds) if measured else ""}
    if options.pop("per_market", False):
        return {**row, **no_market_below(folder, a, b, seeds, **options)}
    compared = compare(folder, a, b, seeds, **options)
    return {**row, **compared, "seeds": seeds, "paired_seeds": compared["seeds"],
            "paired": interval_text(compared)}


def means_of(runs, a, b, value):
    """``measured(seeds)`` for :func:`target_row`: the two models' means of ``value(run)`` on
    ``seeds`` as ``"0.7792 vs 0.7765 (+0.3 %)"``."""
    def measured(seeds):
        means = [float(np.mean([value(r) for r in runs if r["name"] == _side(side)[0]
                                and r["seed"] in seeds])) for side in (a, b)]
        return f"{means[0]:.4f} vs {means[1]:.4f} ({100 * (means[0] / means[1] - 1):+.1f} %)"
    return measured


def targets_table(rows):
    """Markdown lines of target rows: wording, seeds, means, paired interval, verdict."""
    lines = ["Verdicts read the paired 95 % bootstrap interval (BCa; users, or rows for AUC, "
             "resampled within each market and markets averaged as the macro is; seeds paired): "
             "met = wholly on the target's side, level = straddles, missed = wholly on the other "
             "side; an \"at least level\" target is met unless wholly below.", "",
             "| target | seeds | means | paired difference [95 % CI] | verdict |",
             "|---|---|---|---|---|"]
    for row in rows:
        verdict = {"met": "met", "level": "level", "missed": "**missed**", None: "–"}[row["verdict"]]
        lines.append(f"| {row['target']} | {row['seeds']} | {row.get('measured') or '–'} | "
                     f"{row.get('paired', '–')} | {verdict} |")
    return lines + [""]


def _absent(folder, sides, seeds):
    """The note for runs without per-user values."""
    names = [f"{_side(side)[0]}-seed{seed}" for seed in seeds for side in sides
             if _values(folder, _side(side)[0], seed) is None]
    return _missing_note(names, seeds_left_out=False) or "no per-user values"


def _missing_note(names, seeds_left_out):
    """``"no interval: 2 runs without per-user values (...)"`` or, where other seeds gave one,
    ``"seeds left out: ..."``; "" when nothing is missing."""
    if not names:
        return ""
    listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    head = "seeds left out" if seeds_left_out else "no interval"
    return (f"{head}: {len(names)} run{'s' * (len(names) > 1)} without per-user values "
            f"({listed}; run before the sidecars, rerun for an interval)")


def interval_text(row, digits=4):
    """``"+0.0031 [-0.0012, +0.0075]"`` (a ratio: ``"1.02× [0.99, 1.05]"``) of a compared row,
    or its note when it has no interval."""
    if row.get("verdict") is None:
        return row.get("note") or "no paired runs"
    if row.get("contrast") == "ratio":
        text = f"{row['diff']:.3f}× [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    else:
        text = f"{row['diff']:+.{digits}f} [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]"
    return f"{text}; {row['note']}" if row.get("note") else text


def _side(side):
    """``(name, stage)`` of a side given as a name or a pair."""
    return (side, "final") if isinstance(side, str) else tuple(side)


@lru_cache(maxsize=256)
def _read(path, modified):
    """``read_per_user(path)``, cached per file version (``modified``: the sidecar's mtime)."""
    return read_per_user(path)


def _values(folder, name, seed):
    """``(path, sidecar values)`` of one run, or None when the run kept none."""
    path = folder / f"{name}-seed{seed}.json"
    sidecar = sidecar_path(path)
    values = _read(path, sidecar.stat().st_mtime_ns) if sidecar.exists() else None
    return None if values is None else (path, values)


def _holds(values, stage, protocol, markets):
    """True when a sidecar's ``values`` hold ``stage``/``protocol`` in ``markets`` (all markets
    when None); a sidecar written before a stage existed lacks it."""
    return all(values.get(m, {}).get(stage, {}).get(protocol) for m in markets or values)


def _stratum(values, sides, market, protocol, field, kind, tasks):
    """One market's arrays for ``stats``, seeds pooled (``{seed: [values_a, values_b]}``)."""
    def runs(side, fields):
        (name, stage), out = sides[side], {}
        for seed, pair in values.items():
            try:
                cols = pair[side][market][stage][protocol]
            except KeyError:
                raise ValueError(f"{name}-seed{seed} has no per-user values of market {market}, "
                                 f"stage {stage}, protocol {protocol}") from None
            missing = [f for f in fields if f not in cols]
            if missing:
                raise ValueError(f"{name}-seed{seed}: no per-user {missing} in {market}/{stage}/"
                                 f"{protocol} (it has {sorted(cols)})")
            out[seed] = (cols["user"], np.stack([cols[f] for f in fields]))
        return out

    def pooled(fields):
        return stats.pool_seeds(runs(0, fields), runs(1, fields))

    if kind == "ranking":
        _, a, b = pooled([field])
        return a[:, 0], b[:, 0]
    names = [("label", "score")] if tasks is None else [(f"label_{t}", f"score_{t}") for t in tasks]
    per_task = []
    for label, score in names:
        users, a, b = pooled([label, score])
        labels, scores_a, scores_b = stats.split_rows(a, b)
        per_task.append((users, labels, scores_a, scores_b) if kind == "gauc"
                        else (labels, scores_a, scores_b))
    if kind == "gauc":
        if len(per_task) != 1:
            raise ValueError("the group AUC compares one task at a time: pass tasks=[task]")
        return per_task[0]
    return per_task[0] if len(per_task) == 1 else per_task
