"""Cross-market benchmark: Local, Pooled, FedAvg-SASRec, PretrainFinetune and FeCoSR (+ ablations).

    python benchmarks/cross_market.py --dataset xmrec --seeds 2020 2021 2022
    python benchmarks/cross_market.py --dataset movielens-markets --models Local FeCoSR
    python benchmarks/cross_market.py --dataset xmrec --summarise-only

Protocol: per market, RecBole leave-one-out by time (``LS: valid_and_test``, order ``TO``). Every
model is selected by full-ranking valid NDCG@10 (macro over markets where markets share a model),
and its test split is evaluated twice: full ranking (items foreign to the market masked) and uni99
(99 negatives from the market's own catalogue).

Resumable: every (model, dataset, seed) run writes ``results/<dataset>/<model>-seed<S>.json`` as
soon as it ends and is skipped when that file exists with the current settings (a file whose
settings changed is run again and left out of the summaries), after its per-user sidecar
``<model>-seed<S>.per_user.npz`` (``per_user.py``: each test user's values per market, stage and
protocol, for paired comparisons; records without one stay valid). ``summarise`` rebuilds
``results/<dataset>.json`` (full ranking), ``results/<dataset>-uni99.json``, ``results/<dataset>.md``
and ``results/<dataset>-gain.png`` from those files; the markdown and json also check FeCoSR
against the benchmark targets (README, Results) on the seeds each pair of models has run.
"""

import argparse
import contextlib
import fcntl
import json
import subprocess
import sys
from pathlib import Path

import paired
from per_user import lacks_per_user, write_record
from resumable import resumable

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
DATA = HERE / "data"
RESULTS = HERE / "results"
METRICS = ["hit@10", "ndcg@10", "mrr@10"]
PROTOCOLS = ["full", "uni99"]
SELECTED_BY = "valid ndcg@10 (full ranking)"

# Backbone and training settings shared by every model (SASRec as in RecBole, hidden 64, len 20).
SETTINGS = {
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "MAX_ITEM_LIST_LENGTH": 20,
    "hidden_size": 64,
    "inner_size": 256,
    "n_layers": 2,
    "n_heads": 2,
    "loss_type": "CE",
    "epochs": 200,
    # Round budget of every federated model (early stopping usually ends sooner); it bounds a
    # movielens-markets run to about 2 h on 2 CPU cores.
    "fed_rounds": 80,
    "stopping_step": 10,
    # 512 sequences per batch: on ml100k (Local, seed 2020) it reached valid NDCG@10 0.047 at
    # epoch 8, where 2048 needed 16 epochs for 0.046, at slightly lower CPU cost per epoch; and at
    # 2048, FedAvg with one local epoch per round crawled on XMRec (valid 0.145 at round 57
    # against Local's 0.179): its small markets made one or two steps per round.
    "train_batch_size": 512,
    "eval_batch_size": 4096,
    "learning_rate": 0.001,
    "metrics": ["Hit", "NDCG", "MRR"],
    "topk": [10],
    "valid_metric": "NDCG@10",
    "show_progress": False,
}
# "+MS" (see MODELS): per-market softmax with per-item averaging.
MS = {"market_softmax": True, "fed_strategy": "fedavg_rows"}
MODELS = {
    "Local": {"model": "SASRec", "train_mode": "local"},
    "Pooled": {"model": "SASRec", "train_mode": "pooled"},
    "FedAvg-SASRec": {"model": "FedAvgSASRec"},
    "PretrainFinetune": {"model": "PretrainFinetune"},
    "FeCoSR": {"model": "FeCoSR"},
    "FeCoSR-noS2CE": {"model": "FeCoSR", "s2ce": False},
    # A fine-tuning ablation: it takes FeCoSR's federated stage (same seed, ``fed_pretrained``)
    # when that run's round checkpoint is in saved/, so only the fine-tuning differs.
    "FeCoSR-noAdapt": {"model": "FeCoSR", "adaptation": False, "federated_stage_of": "FeCoSR"},
    # "+MS": each market trains its softmax over its own items (market_softmax) and item rows are
    # averaged over the markets that have the item (fedavg_rows); plain FedAvg dilutes a market's
    # own items by its share of all interactions (XMRec: most items are sold in one or two markets).
    "FeCoSR+MS": {"model": "FeCoSR", **MS},
    "FedAvg-SASRec+MS": {"model": "FedAvgSASRec", **MS},
    # XMRec's federated setting, chosen by validation (tune_federated.py, seed 2020): +MS at client
    # learning rate 0.001 validated 0.1991 against 0.1939 at the yaml's 0.003 and plain FedAvg's 0.1835.
    "FedAvg-SASRec+MS-lr0.001": {"model": "FedAvgSASRec", **MS, "eta_l": 0.001},
    # "+keep": a market keeps its federated model unless fine-tuning validates higher
    # (finetune_keep_pretrained); fine-tuning only, on the federated stage of the run named.
    "FeCoSR+keep": {"model": "FeCoSR", "finetune_keep_pretrained": True,
                    "federated_stage_of": "FeCoSR"},
    "FeCoSR-noS2CE+keep": {"model": "FeCoSR", "s2ce": False, "finetune_keep_pretrained": True,
                           "federated_stage_of": "FeCoSR-noS2CE"},
}
DATASETS = {
    # XMRec has no item text: S2CE is off there, so FeCoSR is its own no-S2CE ablation.
    "xmrec": {"convert": ["xmrec", str(SHARED / "xmrec")], "settings": {},
              "model_settings": {"FeCoSR": {"s2ce": False}},
              "skip": ["FeCoSR-noS2CE", "FeCoSR-noS2CE+keep"]},
    "movielens-markets": {"convert": ["movielens", str(SHARED / "movielens_titles")],
                          "settings": {"item_text_fields": ["title"]},
                          "skip": []},
    # Each market sells its own catalogue, overlapping like XMRec's; item text (issue 39).
    "movielens-catalogues": {"convert": ["movielens-catalogues", str(SHARED / "movielens_titles"),
                                         "--xmrec", str(SHARED / "xmrec")],
                             "settings": {"item_text_fields": ["title"]},
                             "skip": []},
}


@contextlib.contextmanager
def exclusive(lock_file):
    """Hold an exclusive lock on ``lock_file`` (created if missing): parallel benchmark workers
    that need the same shared artefact wait for one of them to build it instead of racing."""
    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def convert_once(convert_args, name):
    """Run ``python -m recbole_cmr.data.convert <convert_args>`` into ``DATA/name`` unless done."""
    with exclusive(DATA / ".convert.lock"):
        if not (DATA / name).is_dir():
            cmd = [sys.executable, "-m", "recbole_cmr.data.convert", *convert_args,
                   "--out", str(DATA), "--name", name]
            subprocess.run(cmd, check=True)


def ensure_dataset(name):
    """Convert the source files with recbole_cmr's converter unless already done."""
    convert_once(DATASETS[name]["convert"], name)


def eval_args(test_mode):
    return {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
            "mode": {"valid": "full", "test": test_mode}}


def evaluate_protocol(checkpoints, test_mode):
    """``({market: test result}, {market: per-user values})`` of each saved model under another
    evaluation protocol (per-user values: the trainer's ``last_per_user``, each test user's token
    and metric values)."""
    from recbole.utils import init_seed

    from recbole_cmr import get_trainer, load_data_and_model

    out, per_user = {}, {}
    for checkpoint in sorted(set(checkpoints)):
        config, model, _, _, _, test = load_data_and_model(
            checkpoint, config_dict={"eval_args": eval_args(test_mode)}
        )
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        init_seed(config["seed"], config["reproducibility"])
        out.update(trainer.evaluate(test, load_best_model=False))
        per_user.update(trainer.last_per_user)
    return out, per_user


def _floats(result):
    return {k: float(v) for k, v in result.items()} if result else None


def run_settings(dataset, name, seed):
    """``(RecBole model, config_dict)`` of one benchmark run."""
    spec = dict(MODELS[name])
    model = spec.pop("model")
    spec.pop("federated_stage_of", None)
    own = DATASETS[dataset].get("model_settings", {}).get(model, {})  # settings only it reads
    settings = {**SETTINGS, **DATASETS[dataset]["settings"], **own, **spec, "data_path": str(DATA),
                "seed": seed, "eval_args": eval_args("full"),
                "checkpoint_dir": str(HERE / "saved"), "text_cache_dir": str(HERE / "saved")}
    from recbole_cmr.config import mode_settings

    return model, mode_settings(model, dataset, settings)  # e.g. no round budget for Local


# The round budget and the resume file do not change the rounds a federated run has run so far.
NOT_ROUNDS = ("fed_rounds", "fed_resume", "resume_dir")
# Settings that do not make a finished run stale: where files live, and NOT_ROUNDS.
NOT_PROTOCOL = ("data_path", "checkpoint_dir", "text_cache_dir", *NOT_ROUNDS)


# Code changes that change a model's numbers at unchanged settings; a run file recorded under an
# older revision is stale (rerun, left out of summaries). Absent = 1.
# Local 2: train_mode local is plain RecBole (each market its own item ids; before, every market
# trained its softmax over the shared item table).
# FedAvg-SASRec / FeCoSR* 2: federated rounds at client learning rate 0.003 (eta_l, the tuned
# yaml default; before: 0.001). 3: each market seeds its own rounds and fine-tuning
# (Client.seed_for), so a market's numbers do not depend on the markets trained before it.
FEDERATED = ["FedAvg-SASRec", "FeCoSR", "FeCoSR-noS2CE", "FeCoSR-noAdapt", "FeCoSR+MS",
             "FedAvg-SASRec+MS", "FedAvg-SASRec+MS-lr0.001", "FeCoSR+keep", "FeCoSR-noS2CE+keep"]
# PretrainFinetune 2: each target's copy is seeded from its own seed (modes.market_model), so a
# target's numbers do not depend on the targets fine-tuned before it (the federated models'
# fine-tuning was seeded so already: their numbers are unchanged, checked bit for bit).
# † ablations (federated_stage_of) 4: a reused stage restores its training loader's shuffling
# state, so the ablation's fine-tuning draws what the ablated run's drew (before, the loader's
# stream started afresh: the same fine-tuning gave other numbers).
REVISIONS = {"Local": 2, **dict.fromkeys(FEDERATED, 3), "PretrainFinetune": 2,
             **{name: 4 for name, spec in MODELS.items() if "federated_stage_of" in spec}}


def stale_keys(record):
    """Settings recorded in a run file that differ from what the harness would run now
    (``revision`` when the model's code changed since)."""
    _, current = run_settings(record["dataset"], record["name"], record["seed"])
    current = json.loads(json.dumps(current))
    changed = sorted(k for k, v in record["settings"].items()
                     if k not in NOT_PROTOCOL and k in current and current[k] != v)
    if record.get("revision", 1) != REVISIONS.get(record["name"], 1):
        changed.append("revision")
    return changed


def round_checkpoint(model, dataset, settings):
    """``(path, state)`` of the newest round checkpoint of a federated run with these settings
    whose rounds have ended; ``(None, None)`` if none.

    Round checkpoints stay in ``saved/`` (not committed), so an ablation finds the federated
    stage it shares (``federated_stage_of``) when the same machine reruns. (A run cut off part-way
    continues through its ``resume_dir``: :mod:`resumable`.)
    """
    from recbole_cmr.compat import checkpoint_safe, load_checkpoint

    def same_run(cfg):
        return {k: v for k, v in (cfg or {}).items() if k not in NOT_ROUNDS}

    wanted = same_run(checkpoint_safe(settings))
    files = sorted((HERE / "saved").glob(f"{model}-{dataset}-federated-*.pth"),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        try:
            state = load_checkpoint(str(path))
        except Exception as err:  # a write cut short by an older, non-atomic save
            print(f"skipping unreadable round checkpoint {path.name}: {err}", flush=True)
            continue
        if state.get("kind") != "federated" or same_run(state.get("config")) != wanted:
            continue
        if state["stopped"] or state["round"] + 1 >= state["config"]["fed_rounds"]:
            return str(path), state
    return None, None


def rounds_wall_s(state):
    """Seconds the rounds of a round checkpoint took (0 without one)."""
    return sum(r["round_time"] for r in state["history"]) if state else 0.0


def _both_protocols(results):
    """``({market: {"valid", "test": {protocol: result}}}, {market: {protocol: per-user values}})``
    from ``{market: {valid, test, per_user, checkpoint}}``."""
    per_market = {m: {"valid": _floats(r["valid"]), "test": {"full": _floats(r["test"])}}
                  for m, r in results.items()}
    per_user = {m: {"full": r.get("per_user", {})} for m, r in results.items()}
    checkpoints = [r["checkpoint"] for r in results.values()]
    for protocol in PROTOCOLS[1:]:
        tests, values = evaluate_protocol(checkpoints, protocol)
        for market, res in tests.items():
            per_market[market]["test"][protocol] = _floats(res)
            per_user[market][protocol] = values.get(market, {})
    return per_market, per_user


def with_stage_runs(runs):
    """Add a ``<name> w/o fine-tuning`` run for each run that kept its federated-stage results."""
    derived = []
    for run in runs:
        if "federated_stage" in run:  # the same numbers as the run it shares the stage with
            continue
        if all("federated" in r for r in run["per_market"].values()):
            derived.append({**run, "name": f"{run['name']} w/o fine-tuning",
                            "per_market": {m: r["federated"] for m, r in run["per_market"].items()}})
    return runs + derived


def machine():
    """What trained the run: ``{"device": the GPU's name or "cpu", "threads": torch threads}``
    (RecBole uses the GPU when it sees one)."""
    import torch

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads()}


def run_one(dataset, name, seed, out_file):
    """Train one model on every market, evaluate both protocols, write ``out_file``."""
    from recbole_cmr import run_recbole_cmr

    model, settings = run_settings(dataset, name, seed)
    extra, record_extra = {}, {}
    source = MODELS[name].get("federated_stage_of")
    if source:
        source_model, source_settings = run_settings(dataset, source, seed)
        stage, state = round_checkpoint(source_model, dataset, source_settings)
        if stage:
            print(f"{name} takes the federated stage of {source}: {stage}", flush=True)
            extra["fed_pretrained"] = stage
            record_extra["federated_stage"] = {"of": source, "checkpoint": Path(stage).name,
                                               "rounds_wall_s": round(rounds_wall_s(state), 1)}
        else:
            print(f"no finished {source} round checkpoint in saved/: {name} trains its own "
                  "federated stage", flush=True)
    with resumable(out_file, {**settings, **extra}) as run:  # a run cut off continues where it was (rounds, fine-tuning)
        result = run_recbole_cmr(model=model, dataset=dataset,
                                 config_dict={**settings, **extra, **run.settings})
        per_market, per_user = run_results(result)
        if result.get("federated_rounds"):  # best round, rounds' wall time, valid per round
            record_extra["federated_rounds"] = result["federated_rounds"]
        record = {"name": name, "model": model, "train_mode": result["train_mode"], "dataset": dataset,
                  "seed": seed, "revision": REVISIONS.get(name, 1), "selected_by": SELECTED_BY,
                  "settings": settings, **machine(), **run.record, **record_extra,
                  "per_market": per_market}
        write_record(record, out_file, per_user)  # the per-user sidecar first, then the record


def run_results(result):
    """``(per_market, per_user)`` of a record from ``run_recbole_cmr``'s ``result``: each market's
    valid and test results under both protocols (and its federated stage's, fine-tuning kept or
    not, a source's results after each transfer) and their per-user values."""
    per_market, final = _both_protocols(result["per_market"])
    per_user = {m: {"final": values} for m, values in final.items()}
    stage = {m: r["federated"] for m, r in result["per_market"].items() if "federated" in r}
    stage_results, stage_values = _both_protocols(stage)
    for market, res in stage_results.items():
        per_market[market]["federated"] = res
        per_user[market]["federated"] = stage_values[market]
    for market, r in result["per_market"].items():
        if "kept_pretrained" in r:
            per_market[market]["kept_pretrained"] = r["kept_pretrained"]
        if "after_transfer" in r:
            per_market[market]["after_transfer_full"] = {t: _floats(v) for t, v in r["after_transfer"].items()}
            for target, values in r.get("after_transfer_per_user", {}).items():
                per_user[market][f"{AFTER}{target}"] = {"full": values}
    return per_market, per_user


def _mean_std(values):
    """Mean and sample standard deviation (ddof 1; None for a single seed, where it is undefined)."""
    import numpy as np

    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def budget_ended(record):
    """True when the round budget ``fed_rounds``, not early stopping, ended the record's federated
    rounds (so more rounds might have helped): ``federated_rounds.budget_ended`` where the server
    wrote it, else (older records) all ``fed_rounds`` ran and the best round is within the
    patience (``stopping_step`` validations) of the last, i.e. early stopping never fired."""
    rounds, settings = record["federated_rounds"], record.get("settings", {})
    if "budget_ended" in rounds:
        return bool(rounds["budget_ended"])
    budget, patience = settings.get("fed_rounds"), settings.get("stopping_step")
    if budget is None or patience is None or rounds.get("best_round") is None:
        return False
    return (rounds["rounds"] >= budget
            and rounds["rounds"] - 1 - rounds["best_round"] <= patience * (settings.get("eval_step") or 1))


def rounds_entry(records):
    """``{"rounds_to_best", "ended_by_budget"}`` of federated records: the mean of best round + 1,
    and how many of them the round budget ended (:func:`budget_ended`)."""
    return {"rounds_to_best": _mean_std([r["federated_rounds"]["best_round"] + 1 for r in records])[0],
            "ended_by_budget": sum(budget_ended(r) for r in records)}


def rounds_cell(entry, digits):
    """The "rounds to best" cell: ``"42"``, ``"42 (2 of 3 at budget)"``, or "–" without rounds."""
    if entry.get("rounds_to_best") is None:
        return "–"
    ended = entry.get("ended_by_budget", 0)
    return f"{entry['rounds_to_best']:.{digits}f}" + (f" ({ended} of {entry['runs']} at budget)"
                                                       if ended else "")


AT_BUDGET = ("at budget: the round budget `fed_rounds`, not early stopping, ended that many runs' "
             "rounds (their best round within the patience of the last), so more rounds might "
             "have helped them.")


def _cell(value, std):
    """``"0.0788 ± 0.0011"``, or the mean alone when there is no std (one seed)."""
    return f"{value:.4f}" if std is None else f"{value:.4f} ± {std:.4f}"


def seed_table(runs, result_of, metrics):
    """``{"per_market", "macro", "runs", "wall_s"}`` of one model's ``runs`` (one per seed): per
    market and metric the mean and sample std (``<metric>_std``) over seeds of
    ``result_of(run["per_market"][market])``; ``macro`` is per seed the mean over markets."""
    import numpy as np

    markets = list(runs[0]["per_market"])
    per_run = [{m: result_of(r["per_market"][m]) for m in markets} for r in runs]
    for res in per_run:
        res["macro"] = {k: float(np.mean([res[m][k] for m in markets])) for k in metrics}
    table = {}
    for m in markets + ["macro"]:
        table[m] = {}
        for k in metrics:
            table[m][k], table[m][f"{k}_std"] = _mean_std([res[m][k] for res in per_run])
    wall_s, by_device = wall_by_device(runs, lambda r: r["wall_s"])
    return {"per_market": {m: table[m] for m in markets}, "macro": table["macro"],
            "runs": len(runs), "wall_s": wall_s, "wall_s_by_device": by_device}


def wall_by_device(runs, wall_of):
    """``(wall, {device: mean wall_of(run)})``: wall times are comparable on one kind of machine
    only, so ``wall`` is the CPU machine's mean (all runs' where none ran there). A record without
    ``device`` ran on this project's CPU machine, as every run did before GPUs."""
    by = {}
    for run in runs:
        by.setdefault(short_device(run.get("device", "cpu")), []).append(wall_of(run))
    by_device = {device: _mean_std(values)[0] for device, values in sorted(by.items())}
    return by_device.get("cpu", _mean_std([wall_of(r) for r in runs])[0]), by_device


def short_device(name):
    """``"NVIDIA H200"`` -> ``"H200"``; ``"cpu"`` stays."""
    return name.removeprefix("NVIDIA ").strip()


def _wall_cell(by_device):
    """Minutes per device: ``"42.6"`` for CPU runs alone, ``"78.9 (cpu) / 8.0 (H200)"`` else."""
    if list(by_device) == ["cpu"]:
        return f"{by_device['cpu'] / 60:.1f}"
    return " / ".join(f"{wall / 60:.1f} ({device})" for device, wall in by_device.items())


def summarise_protocol(runs, protocol, folder):
    """``{"protocol", "seeds", "selected_by", "models": {name: {per_market, macro, wall_s}},
    "targets": target_checks(...)}`` (``folder``: the records and their per-user sidecars)."""
    summary = {"protocol": protocol, "selected_by": SELECTED_BY, "seeds": [], "models": {}}
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        summary["seeds"] = sorted(set(summary["seeds"]) | {r["seed"] for r in mine})
        summary["models"][name] = seed_table(mine, lambda res: res["test"][protocol], METRICS)
        fed = [r for r in mine if r.get("federated_rounds", {}).get("rounds")]
        if fed and not any("federated_stage" in r for r in mine):
            entry = summary["models"][name]
            entry.update(rounds_entry(fed))
            entry["rounds_wall_s"], entry["rounds_wall_s_by_device"] = wall_by_device(
                fed, lambda r: r["federated_rounds"]["rounds_wall_s"])
        shared = {r["federated_stage"]["of"] for r in mine if "federated_stage" in r}
        if shared:
            summary["models"][name]["federated_stage_of"] = sorted(shared)
    summary["targets"] = target_checks(runs, protocol, folder)
    if protocol == "full":
        summary["source_degradation"] = source_degradation(runs, folder)
    return summary


AFTER = "after_transfer_"  # the sidecar stage of a source's test under a target's model


def source_degradation(runs, folder):
    """The source market's test NDCG@10 (full ranking) under each target's fine-tuned model
    against its own model's, for the transfer runs (PretrainFinetune), on the seeds that ran:
    ``{"model", "source", "seeds", "own", "targets": {target: {"after", "change_pct", ...paired
    fields of "after - own"}}}``, or None without such runs (the paper's CH1: one-to-one transfer
    forgets the source)."""
    import numpy as np

    mine = [r for r in runs if r["name"] == "PretrainFinetune"
            and any("after_transfer_full" in res for res in r["per_market"].values())]
    if not mine:
        return None
    source = next(m for m, res in mine[0]["per_market"].items() if "after_transfer_full" in res)
    seeds = sorted(r["seed"] for r in mine)
    own = float(np.mean([r["per_market"][source]["test"]["full"]["ndcg@10"] for r in mine]))
    out = {"model": "PretrainFinetune", "source": source, "seeds": seeds, "own": own, "targets": {}}
    for target in mine[0]["per_market"][source]["after_transfer_full"]:
        after = float(np.mean([r["per_market"][source]["after_transfer_full"][target]["ndcg@10"]
                               for r in mine]))
        compared = paired.compare(folder, ("PretrainFinetune", f"{AFTER}{target}"),
                                  "PretrainFinetune", seeds, protocol="full", markets=[source])
        out["targets"][target] = {"after": after, "change_pct": 100 * (after / own - 1),
                                  **compared, "paired": paired.interval_text(compared)}
    return out


def _degradation_markdown(degradation):
    """The source-degradation table (:func:`source_degradation`)."""
    lines = [f"### Source degradation (CH1): market {degradation['source']} under each target's "
             f"fine-tuned {degradation['model']} (seeds {degradation['seeds']})", "",
             f"The source's own model: test NDCG@10 {degradation['own']:.4f}. Paired difference "
             "(target's model - source's own model) over the source's test users.", "",
             "| target's model | source NDCG@10 | change | paired difference [95 % CI] |",
             "|---|---|---|---|"]
    for target, row in degradation["targets"].items():
        lines.append(f"| {target} | {row['after']:.4f} | {row['change_pct']:+.1f} % | "
                     f"{row['paired']} |")
    return lines + [""]


# The benchmark targets for FeCoSR: (side A, side B, how A is compared with B (options of
# paired.compare, or PER_MARKET), wording, listed as "not run yet" before B has runs (False where a
# dataset may skip it)). A side is a model name (its reported, fine-tuned models) or ``(name,
# "federated")``: its federated stage before fine-tuning (the "w/o fine-tuning" rows). Verdicts
# read paired 95 % intervals (paired.py).
PER_MARKET = "per_market"
STAGE = "federated"
TARGETS = [("FeCoSR", "Local", {"contrast": "ratio", "threshold": 1.10}, "FeCoSR ≥ 1.10 × Local", True),
           ("FeCoSR", "FedAvg-SASRec", {}, "FeCoSR above FedAvg-SASRec", True),
           ("FeCoSR", "PretrainFinetune", {}, "FeCoSR above PretrainFinetune", True),
           ("FeCoSR", "Pooled", {"relation": "at_least"}, "FeCoSR at least level with Pooled (goal)",
            True),
           ("FeCoSR", "Local", PER_MARKET, "no market where FeCoSR is significantly below Local", True),
           ("FeCoSR", "FeCoSR-noS2CE", {}, "FeCoSR (S²CE) above FeCoSR-noS2CE (plain CE)", False),
           # the paper's central claim is about federated training itself: S²CE against plain CE
           # in the federated stage, before either is fine-tuned
           (("FeCoSR", STAGE), ("FeCoSR-noS2CE", STAGE), {},
            "federated stage: S²CE above plain CE (FeCoSR vs FeCoSR-noS2CE, w/o fine-tuning)", False)]


def _row_name(side):
    """The summary row of a target's side: ``name``, or ``name w/o fine-tuning`` for its stage."""
    return side if isinstance(side, str) else f"{side[0]} w/o fine-tuning"


def _ndcg_by_seed(runs, name, protocol):
    """``{seed: {market: test NDCG@10}}`` of the runs named ``name``."""
    return {r["seed"]: {m: res["test"][protocol]["ndcg@10"] for m, res in r["per_market"].items()}
            for r in runs if r["name"] == name}


def _means(mine, other, how, seeds):
    """The two sides' macro test NDCG@10 means on ``seeds`` as text (the worst market's for a
    per-market target)."""
    import numpy as np

    seeds = [s for s in seeds if s in mine and s in other]  # a record may lack the stage
    if not seeds:
        return "–"
    markets = list(mine[seeds[0]])
    ours = np.array([[mine[s][m] for m in markets] for s in seeds])  # (seeds, markets)
    theirs = np.array([[other[s][m] for m in markets] for s in seeds])
    a, b = float(ours.mean()), float(theirs.mean())
    if how == PER_MARKET:
        gap = ours.mean(axis=0) - theirs.mean(axis=0)
        worst = int(np.argmin(gap))
        return f"lowest market {markets[worst]}: {gap[worst]:+.4f}"
    if how.get("contrast") == "ratio":
        return f"{a / b:.2f} × ({a:.4f} / {b:.4f})"
    return f"{a:.4f} vs {b:.4f}"


def target_checks(runs, protocol, folder):
    """``[{"target", "seeds", "measured", "verdict", "paired", ...}]``: FeCoSR against each model
    (and its federated stage against plain CE's) on the seeds both ran (``paired.target_row``):
    ``measured`` compares the means, ``verdict`` (met / level / missed, None without per-user
    values) reads the paired 95 % interval over the runs' per-user sidecars in ``folder``. [] without
    FeCoSR runs; a target a dataset may skip is left out until its model ran. ``runs`` includes
    the "w/o fine-tuning" rows (:func:`with_stage_runs`) for the stage targets' means."""
    rows = []
    for a, b, how, target, always in TARGETS if _ndcg_by_seed(runs, "FeCoSR", protocol) else []:
        mine, other = (_ndcg_by_seed(runs, _row_name(side), protocol) for side in (a, b))
        if not other and not always:
            continue
        options = {"per_market": True} if how == PER_MARKET else how
        rows.append(paired.target_row(
            folder, target, runs, a, b, protocol=protocol, **options,
            measured=lambda seeds: _means(mine, other, how, seeds)))
    return rows


def _targets_markdown(rows):
    return ["### Targets (FeCoSR against each model on the seeds both ran)", "",
            *paired.targets_table(rows)]


def markdown(dataset, summaries):
    lines = [f"# Cross-market benchmark on {dataset}", "",
             f"Leave-one-out by time per market; every model selected by {SELECTED_BY}; "
             "NDCG@10 per market, mean ± sample std over seeds (the mean alone for one seed).", ""]
    for summary in summaries:
        models = summary["models"]
        if not models:
            continue
        markets = list(next(iter(models.values()))["per_market"])
        lines += [f"## Test protocol: {summary['protocol']} (seeds {summary['seeds']})", "",
                  "| model | " + " | ".join(markets) + " | macro NDCG@10 | macro Hit@10 | macro MRR@10 "
                  "| wall (min) | rounds to best | rounds (min) |",
                  "|---" * (len(markets) + 7) + "|"]
        for name, entry in models.items():
            cells = [_cell(entry["per_market"][m]["ndcg@10"], entry["per_market"][m]["ndcg@10_std"])
                     for m in markets]
            macro = entry["macro"]
            cells += [_cell(macro["ndcg@10"], macro["ndcg@10_std"]),
                      f"{macro['hit@10']:.4f}", f"{macro['mrr@10']:.4f}", _wall_cell(entry["wall_s_by_device"]),
                      rounds_cell(entry, 0),
                      _wall_cell(entry["rounds_wall_s_by_device"]) if "rounds_wall_s" in entry else "–"]
            mark = " †" if "federated_stage_of" in entry else ""
            lines.append(f"| {name}{mark} (n={entry['runs']}) | " + " | ".join(cells) + " |")
        if any(set(entry["wall_s_by_device"]) - {"cpu"} for entry in models.values()):
            lines += ["", "Wall time per machine, never averaged across machines: cpu = the 2-core CPU "
                      "machine, one torch thread per run, two runs at a time; H200 = one NVIDIA H200 "
                      "beside 16 CPU cores, up to 14 runs at a time, one CPU thread each. Metrics do not "
                      "depend on the machine beyond floating-point noise."]
        if any("federated_stage_of" in entry for entry in models.values()):
            lines += ["", "† fine-tunes the federated stage of the run it ablates (same seed); its "
                      "wall time counts the fine-tuning only."]
        if any(entry.get("ended_by_budget") for entry in models.values()):
            lines += ["", AT_BUDGET]
        lines.append("")
        if summary.get("targets"):
            lines += _targets_markdown(summary["targets"])
        if summary.get("source_degradation"):
            lines += _degradation_markdown(summary["source_degradation"])
    return "\n".join(lines) + "\n"


def gain_chart(dataset, summary, path):
    """Bar chart of each model's per-market NDCG@10 gain over Local (relative, %)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no chart written")
        return
    models = summary["models"]
    if "Local" not in models or len(models) < 2:
        return
    markets = list(models["Local"]["per_market"]) + ["macro"]
    others = [n for n in models if n != "Local"]
    fig, ax = plt.subplots(figsize=(1.2 * len(markets) + 3, 4))
    width = 0.8 / len(others)
    for i, name in enumerate(others):
        gains = []
        for m in markets:
            base = (models["Local"]["macro"] if m == "macro" else models["Local"]["per_market"][m])["ndcg@10"]
            val = (models[name]["macro"] if m == "macro" else models[name]["per_market"][m])["ndcg@10"]
            gains.append(100 * (val / base - 1) if base else 0.0)
        ax.bar([j + i * width for j in range(len(markets))], gains, width, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(markets))], markets)
    ax.set_ylabel("NDCG@10 gain over Local (%)")
    ax.set_title(f"{dataset}: {summary['protocol']} ranking, seeds {summary['seeds']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def rounds_chart(dataset, runs, path):
    """Macro valid NDCG@10 per round of every federated run that recorded its rounds (first seed
    of each), with Pooled's best macro valid NDCG@10 as a horizontal line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no chart written")
        return
    curves = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        history = (run.get("federated_rounds") or {}).get("history")
        if history and run["name"] not in curves and "federated_stage" not in run:
            device = short_device(run.get("device", "cpu"))
            label = f"{run['name']} (seed {run['seed']}{'' if device == 'cpu' else ', ' + device})"
            curves[run["name"]] = (label, [(h["round"] + 1, h["valid_score"]) for h in history
                                           if h["valid_score"] is not None])
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.values():
        ax.plot(*zip(*points), label=label)
    pooled = [r for r in runs if r["name"] == "Pooled"]
    if pooled:
        import numpy as np

        best = np.mean([np.mean([m["valid"]["ndcg@10"] for m in r["per_market"].values()])
                        for r in pooled])
        ax.axhline(best, color="grey", linestyle="--", label=f"Pooled best valid ({len(pooled)} seeds)")
    ax.set_xlabel("round")
    ax.set_ylabel("macro valid NDCG@10 (full ranking)")
    ax.set_title(f"{dataset}: federated stage per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(dataset):
    runs = []
    for path in sorted((RESULTS / dataset).glob("*-seed*.json")):
        run = json.loads(path.read_text())
        changed = stale_keys(run)
        if changed:
            print(f"left out of the summary, settings changed since it ran: {path.name} "
                  f"({', '.join(changed)})")
        else:
            runs.append(run)
    order = {name: i for i, name in enumerate(MODELS)}
    trained = sorted(runs, key=lambda r: (order.get(r["name"], len(order)), r["seed"]))
    runs = with_stage_runs(trained)  # + "w/o fine-tuning" runs, whose rounds are their run's
    summaries = [summarise_protocol(runs, p, RESULTS / dataset) for p in PROTOCOLS]
    for summary in summaries:
        suffix = "" if summary["protocol"] == "full" else f"-{summary['protocol']}"
        (RESULTS / f"{dataset}{suffix}.json").write_text(json.dumps(summary, indent=2))
    text = markdown(dataset, summaries)
    (RESULTS / f"{dataset}.md").write_text(text)
    gain_chart(dataset, summaries[0], RESULTS / f"{dataset}-gain.png")
    rounds_chart(dataset, trained, RESULTS / f"{dataset}-rounds.png")
    print(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="xmrec", choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022])
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--with-per-user", action="store_true",
                        help="also rerun current runs whose records have no per-user sidecar")
    args = parser.parse_args()
    if not args.summarise_only:
        ensure_dataset(args.dataset)
        for seed in args.seeds:
            for name in args.models:
                out_file = RESULTS / args.dataset / f"{name}-seed{seed}.json"
                if name in DATASETS[args.dataset]["skip"]:
                    continue
                if out_file.exists():
                    changed = stale_keys(json.loads(out_file.read_text()))
                    if not changed and args.with_per_user and lacks_per_user(out_file):
                        changed = ["no per-user sidecar"]
                    if not changed:
                        continue
                    print(f"{out_file.name} is out of date ({', '.join(changed)}): "
                          "running it again", flush=True)
                print(f"== {name} on {args.dataset}, seed {seed}", flush=True)
                run_one(args.dataset, name, seed, out_file)
    summarise(args.dataset)


if __name__ == "__main__":
    main()
