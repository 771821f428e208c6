"""Validation-only search over the federated stage: strategy, server learning rate, local epochs
or steps, proximal term, FedNova and personal layers, for FedAvg-SASRec on one seed.

    python benchmarks/tune_federated.py --dataset movielens-markets            # the whole grid
    python benchmarks/tune_federated.py --dataset movielens-markets --only fedavgm-m0.9
    python benchmarks/tune_federated.py --dataset movielens-markets --summarise-only

Every grid point is FedAvg-SASRec with the cross-market benchmark's settings (cross_market.py:
same backbone, batch size, protocol and seed 2020), a budget of ``--rounds`` rounds and early
stopping after ``stopping_step`` validations without improvement. A short budget screens the
grid (``--rounds 15``: the valid score after 15 rounds); the promising points then run the full
budget (40 rounds, the convergence target). Only validation is recorded:
the macro valid NDCG@10 per round (full ranking), the best round and the wall time of the rounds;
test metrics are never read, so the choice cannot lean on them. Each point writes
``results/<dataset>-tuning/<point>-r<rounds>.json`` as it ends and is skipped when that file exists (with
the same settings); ``results/<dataset>-tuning.csv`` is rebuilt from the files, best first.
"""

import argparse
import json

from cross_market import MS, RESULTS, ensure_dataset, run_settings
from per_user import write_record
from resumable import resumable

SEED = 2020
# (name, settings), in the order they run; E = fed_local_epochs.
GRID = [
    ("fedavg-E1", {"fed_strategy": "fedavg"}),
    ("fedavgm-lr2-E1", {"fed_strategy": "fedavgm", "server_learning_rate": 2.0}),
    ("fedavgm-m0.5-E1", {"fed_strategy": "fedavgm", "server_momentum": 0.5}),
    ("fedavgm-m0.7-E1", {"fed_strategy": "fedavgm", "server_momentum": 0.7}),
    ("fedavgm-m0.5-etal0.002-E1", {"fed_strategy": "fedavgm", "server_momentum": 0.5,
                                   "eta_l": 0.002}),
    ("fedavgm-m0.9-E1", {"fed_strategy": "fedavgm", "server_momentum": 0.9}),
    ("fedavgm-lr3-E1", {"fed_strategy": "fedavgm", "server_learning_rate": 3.0}),
    ("fedadam-eta0.01-E1", {"fed_strategy": "fedadam", "eta": 0.01, "tau": 1e-3}),
    ("fedyogi-eta0.01-E1", {"fed_strategy": "fedyogi", "eta": 0.01}),
    ("fedadagrad-eta0.01-E1", {"fed_strategy": "fedadagrad", "eta": 0.01, "tau": 1e-3}),
    ("fedavg-etal0.003-E1", {"fed_strategy": "fedavg", "eta_l": 0.003}),
    ("fedavgm-lr2-etal0.003-E1", {"fed_strategy": "fedavgm", "server_learning_rate": 2.0,
                                  "eta_l": 0.003}),
    ("fedavg-E3", {"fed_strategy": "fedavg", "fed_local_epochs": 3}),
    ("fedprox-mu0.01-E3", {"fed_strategy": "fedprox", "proximal_mu": 0.01, "fed_local_epochs": 3}),
    ("fedavg-E5", {"fed_strategy": "fedavg", "fed_local_epochs": 5}),
    # around the chosen client learning rate 0.003: more local epochs, a proximal term
    ("fedavg-etal0.003-E3", {"fed_strategy": "fedavg", "eta_l": 0.003, "fed_local_epochs": 3}),
    ("fedprox-mu0.01-etal0.003-E1", {"fed_strategy": "fedprox", "proximal_mu": 0.01,
                                     "eta_l": 0.003}),
    ("fedavg-etal0.005-E1", {"fed_strategy": "fedavg", "eta_l": 0.005}),
    # XMRec, where most items are sold in one or two markets: each market's softmax over its own
    # items and per-item averaging (``+MS``), at both client learning rates, and with server momentum
    ("ms-rows-E1", MS),
    ("ms-rows-etal0.003-E1", {**MS, "eta_l": 0.003}),
    ("ms-rows-fedavgm-m0.5-E1", {"fed_strategy": "fedavgm", "fed_rowwise": True, "market_softmax": True,
                                 "server_momentum": 0.5}),
    # Issue 41: markets of very different sizes take very different numbers of local steps per
    # epoch (XMRec ca ~20x in). SCAFFOLD corrects client drift with control variates; FedNova
# normalises each update by its steps; fed_local_steps
    # gives every market the same steps; personal layers (FedPer) keep the normalisation layers
    # and the position embedding on each market.
    ("fednova-etal0.003-E1", {"fed_strategy": "fednova", "eta_l": 0.003}),
    ("scaffold-etal0.003-E1", {"fed_strategy": "scaffold", "eta_l": 0.003}),
    ("fedavg-etal0.003-steps20", {"fed_strategy": "fedavg", "eta_l": 0.003, "fed_local_steps": 20}),
    ("fedavg-etal0.003-steps50", {"fed_strategy": "fedavg", "eta_l": 0.003, "fed_local_steps": 50}),
    ("fedbn-etal0.003-E1", {"fed_strategy": "fedavg", "eta_l": 0.003,
                            "fed_local_params": ["*LayerNorm*"]}),
    ("fedper-norm-pos-etal0.003-E1", {"fed_strategy": "fedavg", "eta_l": 0.003,
                                      "fed_local_params": ["*LayerNorm*", "position_embedding.*"]}),
    # FedRep's schedule on the same personal layers: the head alone for an epoch, then the body
    ("fedrep-norm-pos-etal0.003-E1", {"fed_strategy": "fedavg", "eta_l": 0.003,
                                      "fed_local_params": ["*LayerNorm*", "position_embedding.*"],
                                      "fed_rep_head_epochs": 1}),
]


# Every point starts from plain FedAvg at the client learning rate ``learning_rate``, whatever
# defaults the yaml files hold (None = the strategy's own default / learning_rate).
BASE = {"fed_strategy": "fedavg", "eta_l": None,
        "server_learning_rate": None, "server_momentum": None}


def point_settings(dataset, name, rounds):
    """``config_dict`` of one grid point: the benchmark's FedAvg-SASRec settings + the point's."""
    _, settings = run_settings(dataset, "FedAvg-SASRec", SEED)
    return {**settings, **BASE, **dict(GRID)[name], "fed_rounds": rounds}


def _comparable(settings):
    """Settings without the None pins (a record from before the pins holds the same run)."""
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if v is not None}


def run_point(dataset, name, rounds, out_file):
    """Train the federated stage of one grid point; write its validation record."""
    from recbole_cmr import run_recbole_cmr

    settings = point_settings(dataset, name, rounds)
    with resumable(out_file, settings) as run:  # a point cut off continues from its last round
        result = run_recbole_cmr(model="FedAvgSASRec", dataset=dataset,
                                 config_dict={**settings, **run.settings})
        rounds_info = result["federated_rounds"]
        write_record({"point": name, "dataset": dataset, "seed": SEED, "settings": settings,
                    "selected_by": "macro valid ndcg@10 (full ranking)",
                    "best_valid_ndcg@10": result["best_valid_score"],
                    "best_valid_per_market": {m: r["valid"]["ndcg@10"]
                                              for m, r in result["per_market"].items()},
                    "best_round": rounds_info["best_round"], "rounds": rounds_info["rounds"],
                    "rounds_wall_s": rounds_info["rounds_wall_s"], **run.record,
                    "history": rounds_info["history"]}, out_file)


def summarise(dataset):
    """Rebuild ``<dataset>-tuning.csv`` (best valid first) from the point files; returns rows."""
    import pandas as pd

    rows = []
    for path in sorted((RESULTS / f"{dataset}-tuning").glob("*.json")):
        record = json.loads(path.read_text())
        scores = [r["valid_score"] for r in record["history"] if r["valid_score"] is not None]
        at = {f"valid@{k}": max(scores[:k]) if len(scores) >= k else None for k in (5, 10, 15, 20, 40)}
        point = dict(GRID).get(record["point"], {})
        rows.append({"point": record["point"], "budget": record["settings"]["fed_rounds"],
                     "fed_strategy": point.get("fed_strategy"),
                     "params": json.dumps({k: v for k, v in point.items() if k != "fed_strategy"}),
                     "best_valid_ndcg@10": round(record["best_valid_ndcg@10"], 6),
                     "best_round": record["best_round"] + 1, "rounds": record["rounds"],
                     "rounds_wall_min": round(record["rounds_wall_s"] / 60, 1),
                     "min_per_round": round(record["rounds_wall_s"] / 60 / max(record["rounds"], 1), 2),
                     **at})
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values("best_valid_ndcg@10", ascending=False)
        frame.to_csv(RESULTS / f"{dataset}-tuning.csv", index=False)
        print(frame.to_string(index=False))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="movielens-markets")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--only", nargs="*", help="grid points to run (default: all, in order)")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()
    if not args.summarise_only:
        ensure_dataset(args.dataset)
        for name in args.only or [n for n, _ in GRID]:
            out_file = RESULTS / f"{args.dataset}-tuning" / f"{name}-r{args.rounds}.json"
            if out_file.exists() and _comparable(json.loads(out_file.read_text())["settings"]) \
                    == _comparable(point_settings(args.dataset, name, args.rounds)):
                print(f"done already: {out_file.name}", flush=True)
                continue
            print(f"running {name} on {args.dataset}", flush=True)
            run_point(args.dataset, name, args.rounds, out_file)
    summarise(args.dataset)


if __name__ == "__main__":
    main()
