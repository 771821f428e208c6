"""Validation-only search over FeCoSR's own settings, with the budget FedAvg-SASRec's federated
stage got (issue 39: 11 grid points, as ``tune_federated.py`` ran on movielens-markets).

    python benchmarks/tune_fecosr.py --dataset movielens-catalogues            # the whole grid
    python benchmarks/tune_fecosr.py --dataset xmrec --only s2ce-eps0.2
    python benchmarks/tune_fecosr.py --dataset xmrec --summarise-only

Every point is FeCoSR with the cross-market benchmark's settings (cross_market.py: backbone,
round budget, protocol, seed 2020) and one setting changed from its yaml default, one at a time:

* the S²CE loss (``s2ce_eps``, ``s2ce_tau``, ``s2ce_topk``) changes the federated stage, so those
  points train it and fine-tune (``stage`` points);
* the fine-tuning settings (``adapter_rank``, ``finetune_lr_scale``, ``finetune_keep_pretrained``)
  fine-tune from the default point's federated stage (``fed_pretrained``: its finished round
  checkpoint in ``saved/``, also that of a cross-market FeCoSR run of seed 2020 with the same
  settings), so they differ from it in fine-tuning only (``finetune`` points).

A ``stage`` point whose federated stage has already finished here (its round checkpoint, e.g. the
default point's from that cross-market run) fine-tunes from it instead of training the rounds
again; its record names the stage it took (``federated_stage``).

Only validation is recorded: the macro valid NDCG@10 (full ranking) of the fine-tuned models (what
FeCoSR reports and what selects it), the federated stage's best macro valid NDCG@10 and round, and
the wall time; test metrics are never read, so the choice cannot lean on them. Each point writes
``results/<dataset>-fecosr-tuning/<point>.json`` as it ends and is skipped when that file exists
with the same settings; ``results/<dataset>-fecosr-tuning.csv`` is rebuilt from the files, best
first.
"""

import argparse
import json
import os

from cross_market import RESULTS, ensure_dataset, round_checkpoint, run_settings
from per_user import write_record
from resumable import resumable

SEED = 2020
MODEL = "FeCoSR"
DEFAULT = "default"
# (name, kind, settings), in the order they run: one setting off its FeCoSR.yaml default each.
GRID = [
    (DEFAULT, "stage", {}),
    ("s2ce-eps0.05", "stage", {"s2ce_eps": 0.05}),
    ("s2ce-eps0.2", "stage", {"s2ce_eps": 0.2}),
    ("s2ce-tau0.02", "stage", {"s2ce_tau": 0.02}),
    ("s2ce-tau0.1", "stage", {"s2ce_tau": 0.1}),
    ("s2ce-topk50", "stage", {"s2ce_topk": 50}),
    ("adapter-rank4", "finetune", {"adapter_rank": 4}),
    ("adapter-rank16", "finetune", {"adapter_rank": 16}),
    ("finetune-lrscale0", "finetune", {"finetune_lr_scale": 0.0}),
    ("finetune-lrscale1", "finetune", {"finetune_lr_scale": 1.0}),
    ("finetune-keep", "finetune", {"finetune_keep_pretrained": True}),
]
POINTS = {name: (kind, settings) for name, kind, settings in GRID}


def point_settings(dataset, name):
    """``config_dict`` of one point: the benchmark's FeCoSR settings + the point's change."""
    _, settings = run_settings(dataset, MODEL, SEED)
    return {**settings, **POINTS[name][1]}


def finished_stage(dataset, name):
    """The finished round checkpoint (path) of the federated stage point ``name`` fine-tunes
    from (its own for a ``stage`` point, the default point's for a ``finetune`` point), or None
    when that stage has not run here."""
    owner = name if POINTS[name][0] == "stage" else DEFAULT
    path, _ = round_checkpoint(MODEL, dataset, point_settings(dataset, owner))
    return path


def run_point(dataset, name, out_file):
    """Run one point: fine-tuning from its federated stage when that has finished here, else the
    stage and fine-tuning (a ``finetune`` point needs the default's stage); write its validation
    record."""
    from recbole_cmr import run_recbole_cmr

    kind, _ = POINTS[name]
    settings = point_settings(dataset, name)
    extra, stage = {}, finished_stage(dataset, name)
    if stage is None and kind == "finetune":
        raise RuntimeError(f"{name} fine-tunes from the default point's federated stage, "
                           f"which has not run here: run --only {DEFAULT} first.")
    if stage is not None:
        extra["fed_pretrained"] = stage
    with resumable(out_file, {**settings, **extra}) as run:  # a point cut off continues where it was
        result = run_recbole_cmr(model=MODEL, dataset=dataset,
                                 config_dict={**settings, **extra, **run.settings})
        rounds = result.get("federated_rounds") or {}
        write_record({"point": name, "kind": kind, "dataset": dataset, "seed": SEED, "settings": settings,
                    "federated_stage": os.path.basename(stage) if stage else None,
                    "selected_by": "macro valid ndcg@10 of the fine-tuned models (full ranking)",
                    "best_valid_ndcg@10": result["best_valid_score"],
                    "best_valid_per_market": {m: r["valid"]["ndcg@10"]
                                              for m, r in result["per_market"].items()},
                    "stage_valid_ndcg@10": _stage_valid(result),
                    "best_round": rounds.get("best_round"), "rounds": rounds.get("rounds"),
                    **run.record}, out_file)


def _stage_valid(result):
    """The federated stage's macro valid NDCG@10 (its per-market results), or None."""
    stages = [r["federated"]["valid"]["ndcg@10"] for r in result["per_market"].values()
              if "federated" in r]
    return sum(stages) / len(stages) if stages else None


def _comparable(settings):
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if v is not None}


def summarise(dataset):
    """Rebuild ``<dataset>-fecosr-tuning.csv`` (best valid first) from the point files; returns
    the rows (the first is the validation choice)."""
    import pandas as pd

    rows = []
    for path in sorted((RESULTS / f"{dataset}-fecosr-tuning").glob("*.json")):
        record = json.loads(path.read_text())
        rows.append({"point": record["point"], "kind": record["kind"],
                     "change": json.dumps(POINTS.get(record["point"], ("", {}))[1]),
                     "best_valid_ndcg@10": round(record["best_valid_ndcg@10"], 6),
                     "stage_valid_ndcg@10": record["stage_valid_ndcg@10"],
                     "best_round": record["best_round"], "rounds": record["rounds"],
                     "wall_min": round(record["wall_s"] / 60, 1)})
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values("best_valid_ndcg@10", ascending=False)
        frame.to_csv(RESULTS / f"{dataset}-fecosr-tuning.csv", index=False)
        print(frame.to_string(index=False))
    return frame.to_dict("records")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="movielens-catalogues")
    parser.add_argument("--only", nargs="*", choices=list(POINTS), help="points to run (default: all)")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    if not args.summarise_only:
        ensure_dataset(args.dataset)
        for name in args.only or list(POINTS):
            out_file = RESULTS / f"{args.dataset}-fecosr-tuning" / f"{name}.json"
            if out_file.exists() and _comparable(json.loads(out_file.read_text())["settings"]) \
                    == _comparable(point_settings(args.dataset, name)):
                print(f"done already: {out_file.name}", flush=True)
                continue
            print(f"running {name} on {args.dataset}", flush=True)
            run_point(args.dataset, name, out_file)
    summarise(args.dataset)


if __name__ == "__main__":
    main()
