"""What a round costs under each drift remedy, against FedAvg's round (issue 41's target: at most
1.05 x): SCAFFOLD (control variates both ways, a correction term in every step) and FedNova (step
counting, normalised averaging).

    python benchmarks/strategy_overhead.py --dataset xmrec-mini --rounds 5

FedAvg-SASRec on every market of ``--dataset``, in process, one torch thread, the same seed for
every strategy; the strategies run in turn and then again in reverse order (so no strategy
always runs first), ``--rounds`` rounds each time, and the median over both runs' rounds after
the first (which warms up) of the round's time, its training time and its aggregation time are
reported, with the ratio to FedAvg's and the tensor bytes per round. Writes
``results/strategy_overhead-<dataset>.json``. Any other ``--key=value`` is a RecBole setting.
"""

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ["fedavg", "fednova", "scaffold"]


def rounds_of(dataset, strategy, rounds):
    """The round records of ``rounds`` rounds of FedAvg-SASRec under ``strategy``."""
    from recbole_cmr import Config, create_dataset, data_preparation
    from recbole_cmr.federated import FederatedServer, build_clients

    settings = {"fed_rounds": rounds, "fed_strategy": strategy, "stopping_step": 10**6,
                "show_progress": False, "state": "WARNING"}
    config = Config(model="FedAvgSASRec", dataset=dataset, config_dict=settings, argv=[])
    train, valid, _ = data_preparation(config, create_dataset(config))
    server = FederatedServer(config, build_clients(config, train, valid))
    server.fit(verbose=False)
    return server.history[1:] or server.history  # round 0 warms up


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="xmrec-mini")
    parser.add_argument("--rounds", type=int, default=5)
    args, _ = parser.parse_known_args()

    import torch

    torch.set_num_threads(1)
    out = {"dataset": args.dataset, "rounds": args.rounds, "torch_threads": 1, "strategies": {}}
    runs = {strategy: [] for strategy in STRATEGIES}
    for strategy in STRATEGIES + STRATEGIES[::-1]:
        runs[strategy] += rounds_of(args.dataset, strategy, args.rounds)
    for strategy, rounds in runs.items():
        out["strategies"][strategy] = {
            key: statistics.median(r[f"{key}_time"] for r in rounds)
            for key in ("round", "train", "aggregate")}
        out["strategies"][strategy].update(bytes_up=rounds[-1]["bytes_up"],
                                           bytes_down=rounds[-1]["bytes_down"])
    base = out["strategies"]["fedavg"]
    for entry in out["strategies"].values():
        entry["round_over_fedavg"] = entry["round"] / base["round"]
        entry["train_over_fedavg"] = entry["train"] / base["train"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"strategy_overhead-{args.dataset}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
