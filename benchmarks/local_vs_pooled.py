"""Benchmark: Local vs Pooled RecBole SASRec on every market of a multi-market dataset.

    python benchmarks/local_vs_pooled.py --dataset xmrec --seeds 2020

Protocol: leave-one-out by time per market (RecBole ``LS: valid_and_test``, order ``TO``); each
model is selected by full-ranking valid NDCG@10 and its test split is evaluated twice, by full
ranking (foreign items masked) and by uni99 (99 negatives from the market's own catalogue).

Resumable: every (train_mode, seed) run writes ``results/<dataset>/SASRec-<mode>-seed<S>.json``
as soon as it ends and is skipped when that file exists; ``summarise`` rebuilds
``results/<dataset>-local_vs_pooled.{json,md}`` from those files.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
DATA = HERE / "data"
RESULTS = HERE / "results"
METRICS = ["hit@10", "ndcg@10", "mrr@10"]

SETTINGS = {
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "MAX_ITEM_LIST_LENGTH": 20,
    "hidden_size": 64,
    "inner_size": 256,
    "n_layers": 2,
    "n_heads": 2,
    "loss_type": "CE",
    "epochs": 200,
    "stopping_step": 10,
    "train_batch_size": 2048,
    "eval_batch_size": 4096,
    "learning_rate": 0.001,
    "metrics": ["Hit", "NDCG", "MRR"],
    "topk": [10],
    "valid_metric": "NDCG@10",
    "show_progress": False,
}
PROTOCOLS = {"full": "full", "uni99": "uni99"}


def ensure_dataset(name):
    """Convert the source files with recbole_cmr's converter unless already done."""
    if (DATA / name).is_dir():
        return
    sources = {"xmrec": ["xmrec", str(SHARED / "xmrec")]}
    if name not in sources:
        raise SystemExit(f"no recipe for dataset {name}; convert it into {DATA} first")
    cmd = [sys.executable, "-m", "recbole_cmr.data.convert", *sources[name], "--out", str(DATA),
           "--name", name]
    subprocess.run(cmd, check=True)


def eval_args(test_mode):
    return {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
            "mode": {"valid": "full", "test": test_mode}}


def evaluate_protocol(checkpoints, test_mode):
    """Test metrics of each saved model under another protocol: ``{market: result}``."""
    from recbole.utils import init_seed

    from recbole_cmr import get_trainer, load_data_and_model

    out = {}
    for checkpoint in sorted(set(checkpoints)):
        config, model, _, _, _, test = load_data_and_model(
            checkpoint, config_dict={"eval_args": eval_args(test_mode)}
        )
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        init_seed(config["seed"], config["reproducibility"])
        out.update(trainer.evaluate(test, load_best_model=False))
    return out


def run_one(dataset, mode, seed, out_file):
    from recbole_cmr import run_recbole_cmr

    settings = {**SETTINGS, "data_path": str(DATA), "train_mode": mode, "seed": seed,
                "eval_args": eval_args("full"), "checkpoint_dir": str(HERE / "saved")}
    start = time.time()
    result = run_recbole_cmr(model="SASRec", dataset=dataset, config_dict=settings)
    train_s = time.time() - start
    per_market = {m: {"valid": dict(r["valid"]), "test": {"full": dict(r["test"])}}
                  for m, r in result["per_market"].items()}
    checkpoints = [r["checkpoint"] for r in result["per_market"].values()]
    for protocol in PROTOCOLS:
        if protocol == "full":
            continue
        for market, res in evaluate_protocol(checkpoints, protocol).items():
            per_market[market]["test"][protocol] = {k: float(v) for k, v in res.items()}
    record = {"model": "SASRec", "train_mode": mode, "dataset": dataset, "seed": seed,
              "selected_by": "valid ndcg@10 (full ranking)", "settings": settings,
              "train_and_full_eval_s": round(train_s, 1), "wall_s": round(time.time() - start, 1),
              "per_market": per_market}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=float))
    os.replace(tmp, out_file)


def summarise(dataset):
    """Mean (and std over seeds) per market and macro, per protocol, from the run files."""
    import numpy as np

    runs = [json.loads(p.read_text()) for p in sorted((RESULTS / dataset).glob("SASRec-*.json"))]
    summary = {"dataset": dataset, "selected_by": "valid ndcg@10 (full ranking)", "models": {}}
    lines = [f"# Local vs Pooled SASRec on {dataset}", "",
             "Leave-one-out by time; selected by full-ranking valid NDCG@10.", ""]
    for mode in ("local", "pooled"):
        mine = [r for r in runs if r["train_mode"] == mode]
        if not mine:
            continue
        markets = list(mine[0]["per_market"])
        entry = {"seeds": [r["seed"] for r in mine], "wall_s": float(np.mean([r["wall_s"] for r in mine]))}
        for protocol in PROTOCOLS:
            table = {}
            for m in markets + ["macro"]:
                vals = {k: [] for k in METRICS}
                for r in mine:
                    for k in METRICS:
                        if m == "macro":
                            vals[k].append(np.mean([r["per_market"][x]["test"][protocol][k] for x in markets]))
                        else:
                            vals[k].append(r["per_market"][m]["test"][protocol][k])
                table[m] = {**{k: float(np.mean(v)) for k, v in vals.items()},
                            **{f"{k}_std": float(np.std(v)) for k, v in vals.items()}}
            entry[protocol] = table
        summary["models"][f"SASRec-{mode}"] = entry
    for protocol in PROTOCOLS:
        lines += [f"## Test, {protocol}", "", "| model | " + " | ".join(
            f"{m} NDCG@10" for m in markets) + " | macro Hit@10 | macro NDCG@10 | macro MRR@10 |",
            "|---" * (len(markets) + 4) + "|"]
        for name, entry in summary["models"].items():
            t = entry[protocol]
            lines.append(f"| {name} | " + " | ".join(f"{t[m]['ndcg@10']:.4f}" for m in markets)
                         + " | " + " | ".join(f"{t['macro'][k]:.4f}" for k in METRICS) + " |")
        lines.append("")
    lines += ["Wall time per run (train + both evaluations): " + ", ".join(
        f"{n} {e['wall_s'] / 60:.1f} min" for n, e in summary["models"].items())]
    (RESULTS / f"{dataset}-local_vs_pooled.json").write_text(json.dumps(summary, indent=2))
    (RESULTS / f"{dataset}-local_vs_pooled.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="xmrec")
    parser.add_argument("--modes", nargs="+", default=["local", "pooled"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[2020])
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()
    if not args.summarise_only:
        ensure_dataset(args.dataset)
        for seed in args.seeds:
            for mode in args.modes:
                out_file = RESULTS / args.dataset / f"SASRec-{mode}-seed{seed}.json"
                if out_file.exists():
                    print(f"skip {out_file.name}: done")
                    continue
                run_one(args.dataset, mode, seed, out_file)
    summarise(args.dataset)


if __name__ == "__main__":
    main()
