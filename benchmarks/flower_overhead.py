"""What Flower costs: wall time per round and bytes on the wire of a federation on a local Flower
deployment (``python -m recbole_cmr.flower``) against the same run in-process.

    python benchmarks/flower_overhead.py --dataset movielens-markets --rounds 3
    python benchmarks/flower_overhead.py --dataset xmrec-mini --markets de fr --rounds 2

FedAvg-SASRec, one local epoch per round, no early stop; both runs use the same settings and give
the same numbers (tests/test_flower.py). Reported: median round time of rounds 1.. (round 0 warms
up) under Flower and in-process, their ratio (target: at most 1.25), and the message bytes of the
training messages against the tensor bytes they carry (target: within 5 %). Any other
``--key=value`` is a RecBole setting. Writes ``results/flower_overhead-<dataset>.json``.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def median_round(history):
    rounds = history[1:] or history
    return statistics.median(r["round_time"] for r in rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="movielens-markets")
    parser.add_argument("--markets", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--executor", default="fork", help="the launcher's --executor (fork, subprocess)")
    args, rest = parser.parse_known_args()

    import torch

    from recbole_cmr import flower, run_recbole_cmr

    work = tempfile.mkdtemp(prefix="flower_overhead_")
    load = os.getloadavg()[0]  # other work on the machine (both runs share it alike)
    common = {"fed_rounds": args.rounds, "stopping_step": 10**6, "show_progress": False, "state": "WARNING"}
    argv = [f"--{k}={v}" for k, v in common.items()] + rest
    start = time.time()
    remote = flower.deploy(["--model=FedAvgSASRec", f"--dataset={args.dataset}",
                            *(["--markets", *args.markets] if args.markets else []),
                            f"--executor={args.executor}", *argv,
                            f"--checkpoint_dir={os.path.join(work, 'flower')}"])
    flower_wall = time.time() - start
    start = time.time()
    local = run_recbole_cmr(model="FedAvgSASRec", dataset=args.dataset, argv=rest, config_dict={
        **common, **({"markets": args.markets} if args.markets else {}),
        "checkpoint_dir": os.path.join(work, "in-process")})
    local_wall = time.time() - start
    history = remote["federated_rounds"]["history"]
    flower_round, local_round = median_round(history), median_round(local["federated_rounds"]["history"])
    last = history[-1]
    out = {
        "dataset": args.dataset, "markets": sorted(remote["per_market"]), "rounds": args.rounds,
        "executor": args.executor,
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "flower_median_round_s": flower_round, "in_process_median_round_s": local_round,
        "round_ratio": flower_round / local_round, "round_ratio_target": 1.25,
        "flower_run_wall_s": flower_wall, "in_process_run_wall_s": local_wall,
        "tensor_bytes_up": last["bytes_up"], "wire_bytes_up": last["wire_up"],
        "tensor_bytes_down": last["bytes_down"], "wire_bytes_down": last["wire_down"],
        "wire_over_tensor_up": last["wire_up"] / last["bytes_up"],
        "wire_over_tensor_down": last["wire_down"] / last["bytes_down"],
        "same_test_metrics": all(
            remote["per_market"][m]["test"] == {k: float(v) for k, v in r["test"].items()}
            for m, r in local["per_market"].items()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"flower_overhead-{args.dataset}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
