"""Overhead of a federated round against RecBole's own Trainer doing the same local work.

    python benchmarks/federated_overhead.py --dataset xmrec-mini --rounds 5
    python benchmarks/federated_overhead.py --dataset xmrec --rounds 3 --data_path=benchmarks/data \
        "--load_col={'inter':['user_id','item_id','timestamp']}"

Any other ``--key=value`` is a RecBole setting (read by RecBole's Config), e.g. ``--data_path``.

A federated round (FedAvg-SASRec, ``fed_local_epochs`` E) trains E epochs on every market,
aggregates, validates every market and checkpoints. The reference is RecBole's Trainer running
the same E epochs (``_train_epoch``) and one validation (``_valid_epoch``) on each market, from
the same initial model. Reported: median round time / median reference time, and aggregation
time as a share of the round. Writes ``results/federated_overhead-<dataset>.json``.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def reference_times(config, train, valid, epochs, repeats):
    """Per repeat: seconds RecBole's Trainer needs for ``epochs`` epochs + 1 validation, all markets."""
    from recbole_cmr.trainer import new_market_trainer

    trainers = {m: new_market_trainer(config, train[m]._dataset, m, [m])[1] for m in train}
    for m, trainer in trainers.items():
        trainer.eval_collector.data_collect(train[m])
    times = []
    for rep in range(repeats):
        start = time.perf_counter()
        for m, trainer in trainers.items():
            for epoch in range(epochs):
                trainer._train_epoch(train[m], rep * epochs + epoch)
            trainer._valid_epoch(valid[m])
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="xmrec-mini")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local_epochs", type=int, default=1)
    args, _ = parser.parse_known_args()

    import torch

    from recbole_cmr import Config, create_dataset, data_preparation
    from recbole_cmr.federated import FederatedServer, build_clients
    from recbole_cmr.trainer import checkpoint_file

    settings = {"fed_rounds": args.rounds, "fed_local_epochs": args.local_epochs,
                "stopping_step": 10**6, "show_progress": False, "state": "WARNING"}
    config = Config(model="FedAvgSASRec", dataset=args.dataset, config_dict=settings, argv=[])
    train, valid, _ = data_preparation(config, create_dataset(config))
    reference = reference_times(config, train, valid, args.local_epochs, args.rounds)
    server = FederatedServer(config, build_clients(config, train, valid),
                             checkpoint_file=checkpoint_file(config, "overhead"))
    server.fit(verbose=False)
    rounds = server.history[1:] or server.history  # round 0 warms up
    round_s = statistics.median(r["round_time"] for r in rounds)
    agg_s = statistics.median(r["aggregate_time"] for r in rounds)
    ref_s = statistics.median(reference[1:] or reference)
    out = {
        "dataset": args.dataset, "markets": list(train), "torch_threads": torch.get_num_threads(),
        "local_epochs": args.local_epochs,
        "rounds": args.rounds, "median_round_s": round_s, "median_reference_s": ref_s,
        "round_over_reference": round_s / ref_s, "median_aggregate_s": agg_s,
        "aggregate_share_of_round": agg_s / round_s,
        "median_train_s": statistics.median(r["train_time"] for r in rounds),
        "median_valid_s": statistics.median(r["valid_time"] for r in rounds),
        "bytes_up_per_round": rounds[-1]["bytes_up"], "bytes_down_per_round": rounds[-1]["bytes_down"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"federated_overhead-{args.dataset}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
