"""How much do the scenarios' updates conflict? PF-MSMTrec's server measures, each round, the
pairwise cosine of the clients' expert updates (``Strategy.round_report``); this runs PF-MSMTrec
for a few rounds on every scenario split of ``multi_scenario.py`` (age bands, gender, occupation
groups) and writes the cosines, to pick the split whose scenarios conflict most (issue 40).

    python benchmarks/scenario_conflict.py                 # 5 rounds, seed 2020
    python benchmarks/scenario_conflict.py --rounds 10 --seed 2021

Writes ``results/pfmsmtrec-split-conflict.json``: per split the clients, the mean pairwise cosine
per round, each pair's mean over the rounds and the last round's mean per expert network; and
prints a table. Validation only at the last round; no test metric is used to choose anything.
"""

import argparse
import json

import numpy as np

import multi_scenario
from cross_market import RESULTS

OUT = RESULTS / "pfmsmtrec-split-conflict.json"


def measure(split, rounds, seed):
    """PF-MSMTrec for ``rounds`` rounds on ``split``: the cosines its server reported."""
    from recbole_cmr import run_recbole_cmr
    from recbole_cmr.config import mode_settings

    multi_scenario.use_split(split)
    model, settings = multi_scenario.run_settings("PF-MSMTrec", seed)
    settings.update(fed_rounds=rounds, eval_step=rounds)
    dataset = multi_scenario.DATASET
    result = run_recbole_cmr(model=model, dataset=dataset, saved=False,
                             config_dict=mode_settings(model, dataset, settings))
    reports = [r["strategy"] for r in result["federated_rounds"]["history"]]
    clients = reports[0]["clients"]
    cosines = np.array([r["expert_cosine"] for r in reports])  # [rounds, N, N]
    upper = np.triu_indices(len(clients), k=1)
    return {"dataset": dataset, "clients": clients, "rounds": rounds, "seed": seed,
            "mean_cosine_per_round": [round(float(c[upper].mean()), 4) for c in cosines],
            "pairs": {f"{clients[i]}/{clients[j]}": round(float(cosines[:, i, j].mean()), 4)
                      for i, j in zip(*upper)},
            "last_round_by_expert": {g: round(v, 4) for g, v in
                                     reports[-1]["expert_cosine_by_group"].items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--splits", nargs="+", default=list(multi_scenario.SPLITS),
                        choices=list(multi_scenario.SPLITS))
    args = parser.parse_args()
    out = {split: measure(split, args.rounds, args.seed) for split in args.splits}
    OUT.write_text(json.dumps(out, indent=2))
    print("| split | mean pairwise cosine per round | mean over rounds and pairs |")
    print("|---|---|---|")
    for split, entry in out.items():
        per_round = ", ".join(f"{c:+.3f}" for c in entry["mean_cosine_per_round"])
        print(f"| {split} | {per_round} | {np.mean(list(entry['pairs'].values())):+.3f} |")


if __name__ == "__main__":
    main()
