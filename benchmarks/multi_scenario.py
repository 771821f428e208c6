"""Multi-scenario multi-task CTR benchmark: PF-MSMTrec against Local, Pooled, FedAvg and FedBN
MMoE, PF-MSMTrec's ablations and its template's other reading (``PF-MSMTrec-shareScenario``:
scenario-specific experts aggregated by the personalized expert rule), on the shipped
ml100k-scenarios (4 age-band scenarios, tasks click and CTCVR).

    python benchmarks/multi_scenario.py --seeds 2020 2021 2022
    python benchmarks/multi_scenario.py --models PF-MSMTrec Local-MMoE --seeds 2020
    python benchmarks/multi_scenario.py --summarise-only
    python benchmarks/multi_scenario.py --split occupation   # scenarios by occupation group

Protocol: RecBole's labeled evaluation per scenario, split per user by time (80/10/10); every
model is selected by the valid AUC (mean over the two tasks; macro over scenarios where they share
one model) and reports test AUC and LogLoss per scenario and task.

``--split gender|occupation`` runs the same grid on scenarios by gender or occupation group
(converted into ``benchmarks/data``; results in ``results/pfmsmtrec-ml100k-<split>``, early
stopping after 10 validations without gain).

Resumable: every (model, seed) run writes ``results/pfmsmtrec-ml100k/<model>-seed<S>.json`` as
soon as it ends and is skipped when that file exists with the current settings. ``summarise``
rebuilds ``results/pfmsmtrec-ml100k.json`` (``models -> per_market -> metric``: scenarios as
markets, ``auc_click``, ``auc_ctcvr``, ``logloss_click``, ``logloss_ctcvr`` and the means ``auc``,
``logloss``; ``macro`` over scenarios), ``results/pfmsmtrec-ml100k.md`` and
``results/pfmsmtrec-ml100k.png`` from those files, with the benchmark targets checked.

Sizing (the grid has to fit in about 3 hours on 2 CPU cores): embeddings of 16, experts [64, 32],
towers [16] (MMoE.yaml); batches of 2048; at most 30 epochs (50 rounds) with early stopping after 3
validations without gain. One epoch over all four scenarios (~400k training rows) takes about
20-30 s on one core.
"""

import argparse
import json

import numpy as np

from cross_market import AT_BUDGET, RESULTS, _cell, rounds_cell, rounds_entry, seed_table
import paired
from per_user import lacks_per_user, write_record
from resumable import resumable

DATASET = "ml100k-scenarios"
NAME = "pfmsmtrec-ml100k"
SELECTED_BY = "valid auc (mean over tasks; macro over scenarios for shared models)"
METRICS = ["auc", "auc_click", "auc_ctcvr", "logloss", "logloss_click", "logloss_ctcvr"]
TASKS = ["click", "ctcvr"]
SETTINGS = {
    "epochs": 30,
    # Federated models train one local epoch per round; at 30 rounds FedAvg-MMoE (seed 2020) was
    # still improving at round 29, where Local and Pooled stopped at epochs 12-19 of 30.
    "fed_rounds": 50,
    "learning_rate": 0.001,
    "train_batch_size": 2048,
    "eval_batch_size": 8192,
    "show_progress": False,
}
# Every federated model averages embedding rows over the scenarios that changed them
# (fed_rowwise): user rows belong to one scenario, and plain FedAvg would shrink each scenario's
# user updates by its share of the data.
FEDERATED = {"train_mode": "federated", "fed_rowwise": True}
MODELS = {
    "Local-MMoE": {"model": "MMoE", "train_mode": "local"},
    "Pooled-MMoE": {"model": "MMoE", "train_mode": "pooled"},
    "FedAvg-MMoE": {"model": "MMoE", **FEDERATED},
    "FedBN-MMoE": {"model": "MMoE", **FEDERATED, "fed_local_params": ["*.bn_*"]},
    "PF-MSMTrec": {"model": "PFMSMTrec"},
    "PF-MSMTrec-noTemplate": {"model": "PFMSMTrec", "parameter_template": False},
    "PF-MSMTrec-noFedBN": {"model": "PFMSMTrec", "fed_bn": False},
    "PF-MSMTrec-noCA": {"model": "PFMSMTrec", "conflict_averse": False},
    "PF-MSMTrec-noPersonal": {"model": "PFMSMTrec", "personalized_experts": False,
                              "personalized_towers": False},
    # the template's other reading (issue 40): scenario-specific experts aggregated by the
    # personalized expert rule instead of never leaving the client
    "PF-MSMTrec-shareScenario": {"model": "PFMSMTrec", "scenario_experts": "personalized"},
}
BASELINES = ["Pooled-MMoE", "FedAvg-MMoE", "FedBN-MMoE"]
READINGS = ["PF-MSMTrec-shareScenario"]
ABLATIONS = [n for n in MODELS if n.startswith("PF-MSMTrec-") and n not in READINGS]


# The scenario splits this harness runs (``--split``): the shipped age bands, and splits whose
# scenarios may conflict more (issue 40), converted into benchmarks/data on first use. Every split
# runs with early-stopping patience 10 over the dataset yaml's 3, which ended federated runs at
# 24-41 of the 50 rounds (issue 40).
PATIENCE = {"stopping_step": 10}
SPLITS = {
    "age": {"dataset": DATASET, "name": NAME, "settings": PATIENCE},
    **{split: {"dataset": f"{DATASET}-{split}", "name": f"{NAME}-{split}",
               "convert": ["ml100k-scenarios", "--split", split], "settings": PATIENCE}
       for split in ("gender", "occupation")},
}
DATA_SETTINGS = dict(PATIENCE)  # the chosen split's data settings (use_split; age until then)


def run_settings(name, seed):
    """``(RecBole model, config_dict)`` of one run."""
    return spec_settings(MODELS, {**SETTINGS, **DATA_SETTINGS}, name, seed)


def data_variant(spec, base_dataset):
    """``(dataset, result folder name, data settings)`` of one data variant of a harness: the
    shipped dataset as it is, or a converted one (``spec["convert"]``, into benchmarks/data
    once) read with ``base_dataset``'s properties yaml, plus ``spec["settings"]``."""
    from cross_market import DATA, convert_once

    settings = dict(spec.get("settings", {}))
    if "convert" in spec:
        import yaml

        convert_once(spec["convert"], spec["dataset"])
        properties = RESULTS.parents[1] / "properties" / "dataset" / f"{base_dataset}.yaml"
        settings = {**yaml.safe_load(properties.read_text()), "data_path": str(DATA), **settings}
    return spec["dataset"], spec["name"], settings


def use_split(split):
    """Run and summarise the ``split`` variant (:data:`SPLITS`); returns its results folder."""
    global DATASET, NAME, DATA_SETTINGS
    DATASET, NAME, DATA_SETTINGS = data_variant(SPLITS[split], "ml100k-scenarios")
    return RESULTS / NAME


def spec_settings(models, settings, name, seed):
    """``(RecBole model, config_dict)``: a harness's ``settings`` with model ``name``'s spec
    from ``models`` (``{"model": ..., key: value}``), the seed and the checkpoint folder."""
    spec = dict(models[name])
    return spec.pop("model"), {**settings, **spec, "seed": seed,
                               "checkpoint_dir": str(RESULTS.parent / "saved")}


def ran_with(record, settings, ignored=()):
    """True when the run ``record`` used ``settings`` (but ``checkpoint_dir`` and ``ignored``)."""
    keep = {k: v for k, v in json.loads(json.dumps(settings)).items()
            if k not in {"checkpoint_dir", *ignored}}
    return {k: record["settings"].get(k) for k in keep} == keep


def run_one(name, seed, out_file):
    """Train and test one model on every scenario; write ``out_file``."""
    model, settings = run_settings(name, seed)
    write_run(model, DATASET, settings, name, seed, SELECTED_BY, out_file)


def write_run(model, dataset, settings, name, seed, selected_by, out_file):
    """Run ``model`` on ``dataset`` with ``settings`` and write its record (settings, wall time,
    valid and test results per market, the federated rounds) to ``out_file`` atomically, after
    its per-user sidecar (each market's test rows: user, label and score per task)."""
    from recbole_cmr import run_recbole_cmr
    from recbole_cmr.config import mode_settings

    with resumable(out_file, settings) as run:  # the harness's settings serve every train mode: each run gets what it reads
        result = run_recbole_cmr(model=model, dataset=dataset,
                                 config_dict={**mode_settings(model, dataset, settings), **run.settings})
        record = {"name": name, "model": model, "dataset": dataset, "seed": seed,
                  "selected_by": selected_by, "settings": settings, **run.record,
                  "per_market": {m: {"valid": {k: float(v) for k, v in r["valid"].items()},
                                     "test": {k: float(v) for k, v in r["test"].items()}}
                                 for m, r in result["per_market"].items()}}
        if result.get("federated_rounds"):
            record["federated_rounds"] = result["federated_rounds"]
        write_record(record, out_file, {m: {"final": {"labeled": r.get("per_user", {})}}
                                        for m, r in result["per_market"].items()})


def run_grid(models, seeds, folder, is_current, run_one, with_per_user=False):
    """Run every (model, seed) whose result file in ``folder`` is missing or stale (and, with
    ``with_per_user``, one whose record has no per-user sidecar)."""
    for seed in seeds:
        for name in models:
            out_file = folder / f"{name}-seed{seed}.json"
            if out_file.exists() and is_current(json.loads(out_file.read_text())) and not (
                    with_per_user and lacks_per_user(out_file)):
                continue
            print(f"== {name}, seed {seed}", flush=True)
            run_one(name, seed, out_file)


def current_runs(folder, is_current, order):
    """The run records in ``folder`` made with the current settings, in ``order`` (model names)
    then seed order; stale ones are named and left out."""
    runs = []
    for path in sorted(folder.glob("*-seed*.json")):
        run = json.loads(path.read_text())
        if is_current(run):
            runs.append(run)
        else:
            print(f"left out of the summary, settings changed since it ran: {path.name}")
    rank = {name: i for i, name in enumerate(order)}
    return sorted(runs, key=lambda r: (rank.get(r["name"], len(rank)), r["seed"]))


def is_current(record):
    """True when ``record`` ran with the settings the harness would use now (``fed_rounds`` only
    counts for federated models)."""
    _, settings = run_settings(record["name"], record["seed"])
    local = settings.get("train_mode") in ("local", "pooled")
    return ran_with(record, settings, ["fed_rounds"] if local else [])


def summarise_runs(runs, folder=None):
    """``{"dataset", "selected_by", "seeds", "models": {name: {per_market, macro, runs, wall_s}},
    "targets"}``: means and sample std over seeds; ``macro`` is per seed the mean over
    scenarios. ``folder``: the records, whose per-user sidecars the targets read (default: the
    harness's)."""
    summary = {"dataset": DATASET, "selected_by": SELECTED_BY, "seeds": [], "models": {}}
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        summary["seeds"] = sorted(set(summary["seeds"]) | {r["seed"] for r in mine})
        entry = seed_table(mine, lambda res: res["test"], METRICS)
        federated = [r for r in mine if r.get("federated_rounds")]
        if federated:
            entry.update(rounds_entry(federated))
        summary["models"][name] = entry
    summary["targets"] = target_checks(runs, folder)
    summary["conflict"] = conflict_summary(runs)
    return summary


def conflict_summary(runs, name="PF-MSMTrec"):
    """Per seed of ``name``, the conflict its strategy measured each round (issue 40):
    ``{seed: {"clients", "cosine": [mean pairwise cosine of the clients' expert updates per
    round], "pairs": {"c1/c2": mean over rounds}, "a": {client: [per round]}, "b": ...}}``;
    ``{}`` for records written before the rounds kept these reports."""
    out = {}
    for run in runs:
        reports = [r["strategy"] for r in (run.get("federated_rounds") or {}).get("history", [])
                   if r.get("strategy", {}).get("expert_cosine")]
        if run["name"] != name or not reports:
            continue
        clients = reports[0]["clients"]
        same = [r for r in reports if r["clients"] == clients]  # every client trained
        cosines = np.array([r["expert_cosine"] for r in same])  # [rounds, N, N]
        upper = np.triu_indices(len(clients), k=1)
        out[run["seed"]] = {
            "clients": clients,
            "cosine": [float(c[upper].mean()) for c in cosines],
            "pairs": {f"{clients[i]}/{clients[j]}": float(cosines[:, i, j].mean())
                      for i, j in zip(*upper)},
            **{key: {c: [r[key][c] for r in same] for c in clients} for key in ("a", "b")
               if key in same[0]}}
    return out


def conflict_chart(conflict, path):
    """Per round: the mean pairwise cosine of the clients' expert updates (every seed), and each
    client's mean ``a_i`` (experts) and ``b_i`` (towers) on the first seed; saved to ``path``
    (nothing without matplotlib, ``pip install '.[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no conflict chart written")
        return

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for seed, entry in conflict.items():
        left.plot(range(1, len(entry["cosine"]) + 1), entry["cosine"], label=f"seed {seed}")
    left.axhline(0, color="grey", lw=0.5)
    left.set(xlabel="round", ylabel="mean pairwise cosine", title="expert updates of the clients")
    left.legend(fontsize=8)
    seed, entry = next(iter(conflict.items()))
    for key, style in (("a", "-"), ("b", "--")):
        for client, values in entry.get(key, {}).items():
            right.plot(range(1, len(values) + 1), values, style, label=f"{key} {client}")
    right.set(xlabel="round", ylabel="weight (clamped to [0, 1])",
              title=f"a_i (experts, -) and b_i (towers, --), seed {seed}")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def target_checks(runs, folder=None):
    """``[{"target", "seeds", "measured", "verdict", "paired", ...}]`` (``paired.target_row``):
    PF-MSMTrec's macro AUC (mean over scenarios of the mean over tasks; rows resampled within
    each scenario, once for both tasks) at least level with every federated baseline and Pooled;
    in no scenario significantly below Local-MMoE on either task; the full model above every
    ablation. ``folder``: the records (default: the harness's)."""
    folder = RESULTS / NAME if folder is None else folder
    full = "PF-MSMTrec"

    def macro(key):
        return lambda r: float(np.mean([res["test"][key] for res in r["per_market"].values()]))

    rows = [paired.target_row(folder, f"PF-MSMTrec macro AUC at least level with {other}", runs,
                              full, other, protocol="labeled", kind="auc", tasks=TASKS,
                              relation="at_least", measured=paired.means_of(runs, full, other, macro("auc")))
            for other in BASELINES]
    for task in TASKS:
        rows.append(paired.target_row(
            folder, f"no scenario where PF-MSMTrec is significantly below Local-MMoE (auc_{task})",
            runs, full, "Local-MMoE", protocol="labeled", kind="auc", tasks=[task],
            per_market=True, measured=paired.means_of(runs, full, "Local-MMoE", macro(f"auc_{task}"))))
    rows += [paired.target_row(folder, f"PF-MSMTrec above its ablation {ablation} (macro AUC)", runs, full,
                               ablation, protocol="labeled", kind="auc", tasks=TASKS,
                               measured=paired.means_of(runs, full, ablation, macro("auc")))
             for ablation in ABLATIONS]
    rows += [paired.target_row(folder, f"{reading} (the template's other reading) above {full} "
                                       "(macro AUC; no target: which reading is better)", runs,
                               reading, full, protocol="labeled", kind="auc", tasks=TASKS,
                               measured=paired.means_of(runs, reading, full, macro("auc")))
             for reading in READINGS]
    return rows


def markdown(summary):
    """The summary as markdown: macro table, per-scenario AUC table, targets."""
    models = summary["models"]
    lines = [f"# PF-MSMTrec on {DATASET}", "",
             f"Seeds {summary['seeds']}; model selected by {summary['selected_by']}; test "
             "metrics, mean ± sample std over seeds; macro = mean over the scenarios.", "",
             "| model | runs | " + " | ".join(METRICS) + " | rounds to best | wall (min) |",
             "|---" * (len(METRICS) + 4) + "|"]
    for name, m in models.items():
        cells = [_cell(m["macro"][k], m["macro"][f"{k}_std"]) for k in METRICS]
        lines.append(f"| {name} | {m['runs']} | " + " | ".join(cells)
                     + f" | {rounds_cell(m, 1)} | {m['wall_s'] / 60:.1f} |")
    if any(m.get("ended_by_budget") for m in models.values()):
        lines += ["", AT_BUDGET]
    markets = list(next(iter(models.values()))["per_market"]) if models else []
    for task in TASKS:
        lines += ["", f"Test AUC ({task}) per scenario:", "",
                  "| model | " + " | ".join(markets) + " |", "|---" * (len(markets) + 1) + "|"]
        for name, m in models.items():
            lines.append(f"| {name} | " + " | ".join(
                _cell(m["per_market"][s][f"auc_{task}"], m["per_market"][s][f"auc_{task}_std"])
                for s in markets) + " |")
    if summary.get("conflict"):
        lines += ["", "Conflict measured by PF-MSMTrec's server (mean pairwise cosine of the "
                  f"clients' expert updates, round 1 → last; [chart]({NAME}-conflict.png)): "
                  + "; ".join(f"seed {seed}: {c['cosine'][0]:+.3f} → {c['cosine'][-1]:+.3f}, "
                              f"most opposed pair {min(c['pairs'], key=c['pairs'].get)} "
                              f"{min(c['pairs'].values()):+.3f}"
                              for seed, c in summary["conflict"].items())]
    lines += ["", "Targets (PF-MSMTrec against each model):", "",
              *paired.targets_table(summary["targets"])]
    return "\n".join(lines) + "\n"


def chart(summary, path):
    """Bar chart of the macro test AUC per model (error bars: std over seeds)."""
    models = summary["models"]
    bars = {f"AUC {task}": [(m["macro"][f"auc_{task}"], m["macro"][f"auc_{task}_std"])
                            for m in models.values()] for task in TASKS}
    paired_bars(list(models), bars, "macro test AUC", f"{DATASET}: seeds {summary['seeds']}",
                path, margin=0.05)


def paired_bars(names, bars, ylabel, title, path, margin):
    """Two bars per model (``bars``: ``{label: [(value, std or None) per name]}``) with std error
    bars, the y axis starting ``margin`` below the lowest bar; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 4))
    for offset, (label, values) in zip((-0.2, 0.2), bars.items()):
        ax.bar([i + offset for i in range(len(names))], [v for v, _ in values], width=0.4,
               yerr=[sd or 0 for _, sd in values], label=label, capsize=3)
    low = min(v for values in bars.values() for v, _ in values)
    ax.set_ylim(max(0.0, low - margin), None)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise():
    summary = write_summary(NAME, current_runs(RESULTS / NAME, is_current, MODELS), summarise_runs,
                            markdown, chart)
    if summary and summary["conflict"]:
        conflict_chart(summary["conflict"], RESULTS / f"{NAME}-conflict.png")
    return summary


def write_summary(name, runs, summarise_runs, markdown, chart):
    """``results/<name>.{json,md,png}`` from ``runs`` (the summary, or None without runs)."""
    if not runs:
        print("no run files yet")
        return None
    summary = summarise_runs(runs)
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=2))
    text = markdown(summary)
    (RESULTS / f"{name}.md").write_text(text)
    chart(summary, RESULTS / f"{name}.png")
    print(text)
    return summary


def main():
    harness_main(__doc__, MODELS, RESULTS / NAME, is_current, run_one, summarise,
                 choose=("--split", SPLITS, "age", use_split))


def harness_main(doc, models, folder, is_current, run_one, summarise, choose=None):
    """The command line of a resumable harness: ``--models``, ``--seeds``, ``--summarise-only``;
    ``choose``: ``(flag, choices, default, use)``, or a list of them, options choosing a variant
    of the benchmark (``use(value)`` makes it the harness's and returns its results folder)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(models), choices=list(models))
    parser.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022])
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--with-per-user", action="store_true",
                        help="also rerun current runs whose records have no per-user sidecar")
    options = [choose] if isinstance(choose, tuple) else list(choose or [])
    for flag, choices, default, _ in options:
        parser.add_argument(flag, choices=list(choices), default=default,
                            help=f"benchmark variant (default: {default})")
    args = parser.parse_args()
    for flag, _, _, use in options:
        folder = use(getattr(args, flag.lstrip("-").replace("-", "_")))
    if not args.summarise_only:
        run_grid(args.models, args.seeds, folder, is_current, run_one, args.with_per_user)
    summarise()


if __name__ == "__main__":
    main()
