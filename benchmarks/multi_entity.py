"""Multi-entity CTR benchmark: MKT against the target-only DNN, the joint SharedBottom and PLE,
Finetune, and MKT's ablations, on the shipped ml100k-entities (entities source and target sharing
users; the task is the target entity's CTR).

    python benchmarks/multi_entity.py --seeds 2020 2021 2022
    python benchmarks/multi_entity.py --models MKT DNN-target --seeds 2020
    python benchmarks/multi_entity.py --summarise-only
    python benchmarks/multi_entity.py --pair unrelated    # a source unrelated to the target's users

Protocol: RecBole's labeled evaluation per entity, split per user by time (80/10/10); every
model is selected by the target entity's valid AUC (``valid_markets: [target]``; fine-tuned
models: their fine-tuning's valid AUC) and reports test AUC, CTRGAUC (impression-weighted user
AUC) and LogLoss per entity; the headline is the target entity.

``--pair unrelated`` runs the same grid where each user's source ratings are another user's
(``ml100k-entities --unrelated-source``, converted into ``benchmarks/data``; results in
``results/mkt-ml100k-unrelated``).

Resumable: every (model, seed) run writes ``results/mkt-ml100k/<model>-seed<S>.json`` as soon as
it ends and is skipped when that file exists with the current settings and code ``revision``
(``REVISION``; older records are rerun and left out of the summaries). ``summarise`` rebuilds
``results/mkt-ml100k.json`` (``models -> per_market -> metric``, entities as markets),
``results/mkt-ml100k.md`` and ``results/mkt-ml100k.png`` from those files, with the targets
checked.

Sizing (about 3 hours for the 3-seed grid, one run at a time on 2 CPU cores): embeddings of 8,
networks [256, 128] (the paper's [1024, 512] scaled down), histories of 20 clicks, batches of
2048, at most 20 epochs per stage with early stopping after 3 validations without gain.
"""

import json

from cross_market import RESULTS, _cell, seed_table
from multi_scenario import (current_runs, data_variant, harness_main, paired_bars, ran_with,
                            spec_settings, write_run, write_summary)
import paired
from per_user import write_record

DATASET = "ml100k-entities"
NAME = "mkt-ml100k"
TARGET = "target"
SELECTED_BY = "valid auc of the target entity"
METRICS = ["auc", "ctrgauc", "logloss"]
SETTINGS = {
    "epochs": 20,
    "stopping_step": 3,
    "learning_rate": 0.001,
    "train_batch_size": 2048,
    "eval_batch_size": 8192,
    "show_progress": False,
    "valid_markets": [TARGET],
}
# Code changes that change every model's numbers at unchanged settings; a run file recorded under
# an older revision is stale (rerun, left out of summaries). Absent = 1.
# 2: history fields hold only clicks of their entity's training split (before: every earlier
# click, so source training rows carried the target's valid and test clicks and the other way
# round); the two-stage models fine-tune the target only.
REVISION = 2
# MKT fine-tunes the target only by default (its stage 2 cannot learn the source): not set here.
MODELS = {
    "DNN-target": {"model": "EntityDNN", "pooled_markets": [TARGET]},
    "SharedBottom": {"model": "SharedBottom"},
    "PLE": {"model": "PLE"},
    "Finetune": {"model": "EntityDNN", "finetune": True, "finetune_markets": [TARGET]},
    "MKT": {"model": "MKT"},
    "MKT-noHFA": {"model": "MKT", "hfa": False},
    "MKT-noPDL": {"model": "MKT", "pdl": False},
    "MKT-noGates": {"model": "MKT", "stage2_gates": False},
    # The paper's own ablation: the multi-entity model of stage 1 alone, without fine-tuning.
    "MKT-noStage2": {"model": "MKT", "finetune": False},
}
BASELINES = ["DNN-target", "SharedBottom", "PLE", "Finetune"]
ABLATIONS = [n for n in MODELS if n.startswith("MKT-")]


# The entity pairs this harness runs (``--pair``): the shipped one, and one whose source entity
# tells nothing about the target's users (each user's source ratings are another user's), so
# the gates and HFA have something to filter (issue 40).
PAIRS = {
    "ml100k": {"dataset": DATASET, "name": NAME},
    "unrelated": {"dataset": f"{DATASET}-unrelated", "name": f"{NAME}-unrelated",
                  "convert": ["ml100k-entities", "--unrelated-source"]},
}
DATA_SETTINGS = {}  # the chosen pair's data settings (use_pair)


def run_settings(name, seed):
    """``(RecBole model, config_dict)`` of one run."""
    return spec_settings(MODELS, {**SETTINGS, **DATA_SETTINGS}, name, seed)


def use_pair(pair):
    """Run and summarise the entity ``pair`` (:data:`PAIRS`); returns its results folder."""
    global DATASET, NAME, DATA_SETTINGS
    DATASET, NAME, DATA_SETTINGS = data_variant(PAIRS[pair], "ml100k-entities")
    return RESULTS / NAME


def run_one(name, seed, out_file):
    """Train and test one model (both stages where it has two); write ``out_file`` with the
    code ``revision`` (a run cut before the stamp reads as stale)."""
    model, settings = run_settings(name, seed)
    write_run(model, DATASET, settings, name, seed, SELECTED_BY, out_file)  # + per-user sidecar
    write_record({**json.loads(out_file.read_text()), "revision": REVISION}, out_file)


def is_current(record):
    """True when ``record`` ran with the settings and the code revision the harness would use
    now."""
    return record.get("revision", 1) == REVISION and \
        ran_with(record, run_settings(record["name"], record["seed"])[1])


def summarise_runs(runs, folder=None):
    """``{"dataset", "selected_by", "seeds", "models": {name: {per_market, macro, runs, wall_s}},
    "targets"}``: means and sample std over seeds; ``target`` is the headline market.
    ``folder``: the records, whose per-user sidecars the targets read (default: the harness's)."""
    summary = {"dataset": DATASET, "selected_by": SELECTED_BY, "headline_market": TARGET,
               "seeds": [], "models": {}}
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        summary["seeds"] = sorted(set(summary["seeds"]) | {r["seed"] for r in mine})
        summary["models"][name] = seed_table(mine, lambda res: res["test"], METRICS)
    summary["targets"] = target_checks(runs, folder)
    return summary


def target_checks(runs, folder=None):
    """``[{"target", "seeds", "measured", "verdict", "paired", ...}]`` (``paired.target_row``):
    MKT above every baseline on the target entity's AUC (rows resampled) and CTRGAUC (users
    resampled); MKT above every ablation on the target's AUC. ``folder``: the records (default:
    the harness's)."""
    folder = RESULTS / NAME if folder is None else folder
    rows = []

    def row(target, a, b, metric):
        kind = "gauc" if metric == "ctrgauc" else "auc"
        rows.append(paired.target_row(
            folder, target, runs, a, b, protocol="labeled", kind=kind, markets=[TARGET],
            measured=paired.means_of(runs, a, b, lambda r: r["per_market"][TARGET]["test"][metric])))

    for other in BASELINES:
        for metric in ("auc", "ctrgauc"):
            row(f"MKT above {other} (target {metric})", "MKT", other, metric)
    for ablation in ABLATIONS:
        row(f"MKT above its ablation {ablation} (target auc)", "MKT", ablation, "auc")
    return rows


def markdown(summary):
    """The summary as markdown: the target entity's table, the source entity's, targets."""
    models = summary["models"]
    lines = [f"# MKT on {DATASET}", "",
             f"Seeds {summary['seeds']}; model selected by {summary['selected_by']}; test "
             "metrics, mean ± sample std over seeds (ctrgauc: impression-weighted user AUC).", ""]
    for market in (TARGET, "source"):
        lines += [f"Entity `{market}`:", "", "| model | runs | " + " | ".join(METRICS)
                  + " | wall (min) |", "|---" * (len(METRICS) + 3) + "|"]
        for name, m in models.items():
            res = m["per_market"][market]
            lines.append(f"| {name} | {m['runs']} | "
                         + " | ".join(_cell(res[k], res[f"{k}_std"]) for k in METRICS)
                         + f" | {m['wall_s'] / 60:.1f} |")
        lines.append("")
    lines += ["The source rows of DNN-target are only evaluated (it trains on the target only). "
              "The two-stage models (Finetune, MKT and its ablations) fine-tune the target only; "
              "their source rows are the first stage's network trained on both entities.", "",
              "Click histories hold only clicks of their entity's training split, strictly "
              "before the row.", "", "Targets (MKT against each model, target entity):", "",
              *paired.targets_table(summary["targets"])]
    return "\n".join(lines) + "\n"


def chart(summary, path):
    """Bars of the target entity's test AUC and CTRGAUC per model (error bars: std over seeds)."""
    results = [m["per_market"][TARGET] for m in summary["models"].values()]
    bars = {key.upper(): [(r[key], r[f"{key}_std"]) for r in results] for key in ("auc", "ctrgauc")}
    paired_bars(list(summary["models"]), bars, f"test, entity {TARGET}",
                f"{DATASET}: seeds {summary['seeds']}", path, margin=0.03)


def summarise():
    return write_summary(NAME, current_runs(RESULTS / NAME, is_current, MODELS), summarise_runs,
                         markdown, chart)


def main():
    harness_main(__doc__, MODELS, RESULTS / NAME, is_current, run_one, summarise,
                 choose=("--pair", PAIRS, "ml100k", use_pair))


if __name__ == "__main__":
    main()
