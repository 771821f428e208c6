"""Negative-transfer benchmark: ANT (re-learning) against SASRec trained from scratch on the
target, UniSRec-style text fine-tuning and ANT with fine-tuning, plus ANT's ablations, on Amazon
Scientific (targets ``scientific-mm``: text + image features; ``scientific-full``: text only) with
the auxiliary domains Office Products and MovieLens-100K.

    python benchmarks/transfer_ant.py --seeds 2020 2021 2022
    python benchmarks/transfer_ant.py --models ANT-relearn@scientific-mm --seeds 2020
    python benchmarks/transfer_ant.py --summarise-only

Protocol (METHODS.md §2): leave-one-out per user, every prefix a training example, full ranking
over the target's items with the history masked (``mask_history_items``: each row's input
sequence, as ANT's code masks it; the target item itself stays ranked), Recall@10/50 and
NDCG@10/50; every model is selected by the target's valid NDCG@10 (pretraining: by the macro valid
NDCG@10 of the two auxiliary domains, under the same masking).

Pretraining runs once per seed (``pretrain/seed<S>.json``; its checkpoint is copied to
``saved/ant-pretrain-seed<S>.pth`` and rebuilt when missing), on Office Products + MovieLens-100K
in mixed batches; every pretrained variant of that seed loads it (``pretrained``), so the variants
differ only in their adaptation. Both targets share it: the auxiliary data are the same, and a
modality the checkpoint lacks (images: the auxiliary domains have none) starts untrained.

Resumable: every (model@target, seed) run writes ``results/ant-scientific/<model>@<target>-
seed<S>.json`` as soon as it ends and is skipped when that file exists with the current settings.
``summarise`` rebuilds ``results/ant-scientific.json`` (``models -> per_market -> metric``, the
targets as markets), ``.md`` and ``.png``, flagging negative transfer (a pretrained variant below
SASRec-scratch on NDCG@10 or Recall@10 of a target).

``--sizes paper`` runs with the paper's sizes (hidden 256, FFN 256, sequences of 50) everywhere,
pretraining included (``saved/ant-pretrain-paper-seed<S>.pth``), into ``results/ant-scientific-
paper``: meant for a GPU machine, e.g. for the headline rows (``--models SASRec-scratch@scientific-mm
UniSRec-FT@scientific-mm ANT-finetune@scientific-mm ANT-relearn@scientific-mm``).

``--pretraining ml100k`` pretrains on MovieLens-100K alone (a domain unrelated to Scientific: the
setting where fine-tuning should transfer negatively, the paper's premise) and ``--pretraining
converged`` pretrains until early stopping (at most 300 epochs) instead of the 30-epoch cap; each
into ``results/ant-scientific-<pretraining>`` with its own pretrained checkpoints.

Sizing: hidden 64 and FFN 128 (paper: 256 / 256), sequences of at most 20 items (paper: 50),
at most 30 pretraining epochs (its validation was still rising slowly there) and 150 adaptation
epochs with early stopping after 5 validations without gain (paper: up to 300 epochs), batches of
1024. One thread per run; a seed's grid takes several CPU-hours (the full target's epochs are
three times the multi-modal one's).
"""

import json
import shutil

from cross_market import (DATA, HERE, RESULTS, SHARED, _cell, _floats, convert_once, exclusive,
                          seed_table)
from multi_scenario import current_runs, harness_main, paired_bars, ran_with, write_summary
import paired
from per_user import write_record
from resumable import resumable

NAME = "ant-scientific"
FOLDER = RESULTS / NAME
SAVED = HERE / "saved"
MARKET = "scientific"  # the target's market name inside both merged datasets
SOURCES = ["office", "ml100k"]
TARGETS = {"scientific-mm": "scientific-mm-transfer", "scientific-full": "scientific-full-transfer"}
SELECTED_BY = "valid ndcg@10 of the target"
# Where files live: not part of a run's settings (the pretrained checkpoint is made by the
# pretraining settings and the seed).
WHERE = ("data_path", "text_cache_dir", "pretrained")
METRICS = ["recall@10", "recall@50", "ndcg@10", "ndcg@50"]
# Changes of the code or the protocol that change a model's numbers; a record (a variant or a
# pretraining) of an older revision is stale. Absent = 1.
# ANT 2: per-epoch learning-rate decay (0.995 pretraining, 0.99 target), adaptors initialised
# N(0, 0.02) like the other layers, and re-learning restarts positions at N(0, 0.02) (was
# N(0, 1)) and experts Xavier-normal (the authors' code).
# ANT 3, SASRec 2: full ranking masks each row's input sequence (mask_history_items), the protocol
# stated above; before, RecBole's sequential full ranking masked no history.
REVISIONS = {"ANT": 3, "SASRec": 2}
SETTINGS = {
    # The protocol's history masking (RecBole's sequential full ranking masks nothing).
    "mask_history_items": True,
    # Adaptation: early stopping decides (re-learning from re-initialised adaptors was still
    # gaining at epoch 50 in a first try).
    "epochs": 150,
    "stopping_step": 5,
    "learning_rate": 0.001,
    "eval_batch_size": 4096,
    "show_progress": False,
}
# Pretraining is capped at 30 epochs (about 23 minutes on one thread); its macro valid NDCG@10 on
# the auxiliary domains was still rising slowly there.
PRETRAIN = {"epochs": 30, "markets": SOURCES}
# SASRec gets ANT's encoder sizes (ANT.yaml): the comparison is about the item representation
# and the transfer, not the width.
ENCODER = {"hidden_size": 64, "inner_size": 128, "n_layers": 2, "n_heads": 2}
CLIP_TEXT = {"target_text_feature_file": "scientific-mm-transfer.feat1CLS",
             "target_text_feature_index": "scientific-mm-transfer.item2index"}
VARIANTS = {
    "SASRec-scratch": {"model": "SASRec", "train_mode": "local", "markets": [MARKET], **ENCODER},
    # UniSRec's inductive fine-tuning: text only, pretrained MoE adaptor kept and trained, encoder frozen.
    "UniSRec-FT": {"model": "ANT", "image_modality": False, "adaptation": "finetune"},
    # Fine-tuning as the contrast to re-learning: every pretrained parameter kept and trained.
    "ANT-finetune": {"model": "ANT", "adaptation": "finetune", "freeze_encoder": False},
    "ANT-relearn": {"model": "ANT"},
    "ANT-relearn-noText": {"model": "ANT", "text_modality": False},
    "ANT-relearn-noImage": {"model": "ANT", "image_modality": False},
    "ANT-relearn-noFusion": {"model": "ANT", "fusion": False},
    # Re-learning re-initialises the adaptors, so the pretrained encoder serves a linear adaptor too.
    "ANT-relearn-noMoE": {"model": "ANT", "moe": False},
    # Controls (issue 40): freeze_encoder swapped, so re-learning and fine-tuning are compared at
    # the same trainable parts (ANT-relearn vs ANT-finetune-frozen: adaptors trained, encoder
    # frozen; ANT-relearn-trainEncoder vs ANT-finetune: everything trained).
    "ANT-finetune-frozen": {"model": "ANT", "adaptation": "finetune", "freeze_encoder": True},
    "ANT-relearn-trainEncoder": {"model": "ANT", "freeze_encoder": False},
    # The target's text from the CLIP-sized vectors that come with the image vectors (issue 40;
    # mm_subset's feat1CLS) instead of MiniLM: pretraining keeps MiniLM text (the auxiliary
    # domains have no CLIP text), so under fine-tuning the CLIP text adaptor starts untrained.
    "ANT-relearn-clipText": {"model": "ANT", **CLIP_TEXT},
    "ANT-finetune-clipText": {"model": "ANT", "adaptation": "finetune", "freeze_encoder": False,
                              **CLIP_TEXT},
}
# Each adaptation at the point tune_ant.py chose for it by validation (seed 2020, scientific-mm,
# results/ant-tuning/<variant>@scientific-mm-seed2020/*.best.json; the grid is learning rate
# {0.001, 0.003} x encoder dropout {0.5, 0.2}), so re-learning and fine-tuning are also compared
# each at its own tuned settings, on every seed.
TUNED = {"ANT-relearn-tuned": ("ANT-relearn", {"learning_rate": 0.001, "hidden_dropout_prob": 0.2}),
         "ANT-finetune-tuned": ("ANT-finetune", {"learning_rate": 0.003, "hidden_dropout_prob": 0.2})}
VARIANTS.update({name: {**VARIANTS[base], **point} for name, (base, point) in TUNED.items()})
BASELINES = ["SASRec-scratch", "UniSRec-FT", "ANT-finetune", "ANT-relearn"]
CONTROLS = ["ANT-finetune-frozen", "ANT-relearn-trainEncoder"]
TEXTS = ["ANT-relearn-clipText", "ANT-finetune-clipText"]
ABLATIONS = [v for v in VARIANTS if v.startswith("ANT-relearn-")
             and v not in CONTROLS + TEXTS + list(TUNED)]
# The ablations, controls and CLIP text need the multi-modal target: they run on it only.
MODELS = {f"{v}@{t}": (v, t) for t in TARGETS for v in VARIANTS
          if t == "scientific-mm" or v in BASELINES}
CONVERT = {
    "scientific-mm": ["unisrec", str(SHARED / "amazon_scientific" / "mm_subset")],
    "scientific-full": ["unisrec", str(SHARED / "amazon_scientific" / "full")],
    "office-products": ["amazon18", str(SHARED / "amazon18_text"), "--category", "Office_Products"],
    "movielens-markets": ["movielens", str(SHARED / "movielens_titles")],
}


def ensure_datasets():
    """Convert and merge the target and auxiliary data with recbole_cmr's converters (once)."""
    for name, args in CONVERT.items():
        convert_once(args, name)
    for target, merged in TARGETS.items():
        sources = [str(DATA / "office-products"), str(DATA / "movielens-markets") + ":ml100k"]
        convert_once(["merge", *sources, str(DATA / target)], merged)


# Model sizes (``--sizes``): the CPU-scaled default, or the paper's (hidden 256, FFN 256,
# sequences of 50) for every model and the pretraining, results apart (issue 40; meant for a GPU).
SIZES = {"scaled": {}, "paper": {"hidden_size": 256, "inner_size": 256, "MAX_ITEM_LIST_LENGTH": 50}}
# Pretraining (``--pretraining``): on both auxiliary domains with the 30-epoch cap (default); on
# MovieLens-100K alone, a domain unrelated to Scientific, where fine-tuning may transfer
# negatively (issue 40); or to convergence (early stopping within 300 epochs).
PRETRAININGS = {"office+ml100k": {}, "ml100k": {"markets": ["ml100k"], "source_market": ["ml100k"]},
                "converged": {"epochs": 300}}
CHOSEN = {"sizes": "scaled", "pretraining": "office+ml100k"}  # the variant (use_sizes, ...)
SIZE_SETTINGS, SIZE_SUFFIX = {}, ""


def use_sizes(sizes):
    """Run and summarise with model ``sizes`` (:data:`SIZES`); returns the results folder."""
    return _use(sizes=sizes)


def use_pretraining(pretraining):
    """Run and summarise with the ``pretraining`` (:data:`PRETRAININGS`); returns the folder."""
    return _use(pretraining=pretraining)


def _use(**chosen):
    """Make the variant ``chosen`` (with the other choice kept) the harness's: its settings,
    its results folder ``ant-scientific[-<sizes>][-<pretraining>]`` and pretrained files."""
    global NAME, FOLDER, SIZE_SETTINGS, SIZE_SUFFIX
    CHOSEN.update(chosen)
    sizes, pretraining = CHOSEN["sizes"], CHOSEN["pretraining"]
    SIZE_SUFFIX = "".join(f"-{value}" for value, default in ((sizes, "scaled"),
                                                             (pretraining, "office+ml100k"))
                          if value != default)
    NAME, SIZE_SETTINGS = f"ant-scientific{SIZE_SUFFIX}", dict(SIZES[sizes])
    FOLDER = RESULTS / NAME
    return FOLDER


def common(seed):
    return {**SETTINGS, "seed": seed, "data_path": str(DATA), "checkpoint_dir": str(SAVED),
            "text_cache_dir": str(SAVED)}


def pretrain_settings(seed):
    return {**common(seed), **PRETRAIN, **PRETRAININGS[CHOSEN["pretraining"]], **SIZE_SETTINGS}


def pretrained_file(seed):
    return SAVED / f"ant-pretrain{SIZE_SUFFIX}-seed{seed}.pth"


def run_settings(name, seed):
    """``(RecBole model, dataset, config_dict)`` of one run (``name``: ``<variant>@<target>``)."""
    variant, target = MODELS[name]
    spec = dict(VARIANTS[variant])
    model = spec.pop("model")
    settings = {**common(seed), **spec, **SIZE_SETTINGS}
    if model == "ANT":
        settings["pretrained"] = str(pretrained_file(seed))
    return model, TARGETS[target], settings


def _run(model, dataset, settings, run):
    """``run_recbole_cmr`` with ``settings`` and the :func:`resumable` attempt ``run``'s
    ``resume_dir``."""
    from recbole_cmr import run_recbole_cmr

    return run_recbole_cmr(model=model, dataset=dataset, config_dict={**settings, **run.settings})


def ensure_pretrained(seed):
    """Pretrain on the auxiliary domains for ``seed`` unless its record is current and its
    checkpoint is in ``saved/``; returns the checkpoint path."""
    with exclusive(SAVED / f".pretrain-seed{seed}.lock"):  # parallel workers pretrain once
        return _pretrain_unless_current(seed)


def _pretrain_unless_current(seed):
    out_file = FOLDER / "pretrain" / f"seed{seed}.json"
    settings = pretrain_settings(seed)
    if (pretrained_file(seed).exists() and out_file.exists()
            and current_ant(json.loads(out_file.read_text()), settings)):
        return pretrained_file(seed)
    print(f"== pretraining on {settings['markets']}, seed {seed}", flush=True)
    with resumable(out_file, settings) as run:
        result = _run("ANT", TARGETS["scientific-mm"], settings, run)
        shutil.copyfile(result["per_market"][settings["markets"][0]]["checkpoint"], pretrained_file(seed))
        write_record({"name": "pretrain", "model": "ANT", "revision": REVISIONS["ANT"], "seed": seed,
                      "settings": settings, **run.record,
                      "selected_by": "macro valid ndcg@10 of the auxiliary domains",
                      "per_market": {m: {"valid": _floats(r["valid"]), "test": _floats(r["test"])}
                                     for m, r in result["per_market"].items()}},
                     out_file, _per_user(result))
    return pretrained_file(seed)


def run_one(name, seed, out_file):
    """Adapt (or, SASRec, train) on the target of ``name``; write ``out_file``."""
    model, dataset, settings = run_settings(name, seed)
    if "pretrained" in settings:
        ensure_pretrained(seed)
    with resumable(out_file, settings) as run:
        result = _run(model, dataset, settings, run)
        target = result["per_market"][MARKET]
        write_record({"name": name, "variant": MODELS[name][0], "target": MODELS[name][1],
                      "model": model, "revision": REVISIONS[model], "dataset": dataset, "seed": seed,
                      "selected_by": SELECTED_BY, "settings": settings, **run.record,
                      "per_market": {MARKET: {"valid": _floats(target["valid"]),
                                              "test": _floats(target["test"])}}},
                     out_file, _per_user(result, [MARKET]))


def _per_user(result, markets=None):
    """The per-user sidecar's values of ``result``'s ``markets`` (all by default): each test
    user's token and metric values, full ranking (the protocol above)."""
    return {m: {"final": {"full": r.get("per_user", {})}} for m, r in result["per_market"].items()
            if markets is None or m in markets}


def is_current(record):
    """True when ``record`` ran with the settings the harness would use now."""
    if record["name"] not in MODELS:
        return False
    return current_ant(record, run_settings(record["name"], record["seed"])[2])


def current_ant(record, settings):
    """True when ``record`` ran with ``settings`` under its model's current ``REVISIONS``."""
    if record.get("revision", 1) != REVISIONS[record["model"]]:
        return False
    return ran_with(record, settings, WHERE)


def summarise_runs(runs, folder=None):
    """``{"selected_by", "seeds", "models": {variant: {per_market: {target: metrics}, runs, wall_s}},
    "negative_transfer", "targets", "pretraining"}``: means and sample std over seeds.
    ``folder``: the records, whose per-user sidecars the targets read (default: the harness's)."""
    summary = {"dataset": "amazon-scientific", "selected_by": SELECTED_BY, "seeds": [],
               "models": {}}
    for variant in VARIANTS:
        for target in TARGETS:
            mine = [r for r in runs if r["name"] == f"{variant}@{target}"]
            if not mine:
                continue
            summary["seeds"] = sorted(set(summary["seeds"]) | {r["seed"] for r in mine})
            table = seed_table(mine, lambda res: res["test"], METRICS)
            entry = summary["models"].setdefault(variant, {"per_market": {}, "runs": {}, "wall_s": {}})
            entry["per_market"][target] = table["per_market"][MARKET]
            entry["runs"][target], entry["wall_s"][target] = table["runs"], table["wall_s"]
    summary["negative_transfer"] = negative_transfer(summary)
    summary["targets"] = target_checks(runs, folder)
    summary["pretraining"] = pretraining_summary()
    return summary


def negative_transfer(summary):
    """``[{"model", "target", "metrics"}]``: pretrained variants below SASRec-scratch on
    NDCG@10 or Recall@10 of a target (``metrics``: those it is below on)."""
    models = summary["models"]
    scratch = models.get("SASRec-scratch", {}).get("per_market", {})
    flagged = []
    for name, entry in models.items():
        for target, res in entry["per_market"].items():
            if name == "SASRec-scratch" or target not in scratch:
                continue
            below = [k for k in ("ndcg@10", "recall@10") if res[k] < scratch[target][k]]
            if below:
                flagged.append({"model": name, "target": target, "metrics": below})
    return flagged


def target_checks(runs, folder=None):
    """``[{"target", "seeds", "measured", "verdict", "paired", ...}]`` (``paired.target_row``):
    on each target the premise (SASRec-scratch above UniSRec-FT and ANT-finetune: negative
    transfer of fine-tuning), ANT-relearn at least level with SASRec-scratch (NDCG@10 and Recall@10) and
    above ANT-finetune and UniSRec-FT (NDCG@10); on scientific-mm, re-learning above fine-tuning
    at the same trainable parts (the controls), with CLIP-sized text, and each at its tuned
    settings (:data:`TUNED`); verdicts read paired intervals over the test
    users of the runs' per-user sidecars in ``folder`` (default: the harness's)."""
    folder = FOLDER if folder is None else folder
    rows = []
    for target in TARGETS:
        # The paper's premise first: fine-tuning a pretrained model falls below training from
        # scratch (negative transfer); "met" = significantly below.
        for tuned in ("UniSRec-FT", "ANT-finetune"):
            rows.append(_row(folder, runs, f"premise: SASRec-scratch above {tuned} on {target} "
                                           "(negative transfer; ndcg@10)",
                             f"SASRec-scratch@{target}", f"{tuned}@{target}", "ndcg@10", "above"))
        mine = f"ANT-relearn@{target}"
        for other, keys, relation in (("SASRec-scratch", ("ndcg@10", "recall@10"), "at_least"),
                                      ("ANT-finetune", ("ndcg@10",), "above"),
                                      ("UniSRec-FT", ("ndcg@10",), "above")):
            theirs = f"{other}@{target}"
            wording = "at least level with" if relation == "at_least" else "above"
            for key in keys:
                rows.append(_row(folder, runs, f"ANT-relearn {wording} {other} on {target} ({key})",
                                 mine, theirs, key, relation))
    # The controls: re-learning against fine-tuning at the same trainable parts.
    for mine, theirs, parts in (("ANT-relearn", "ANT-finetune-frozen", "encoder frozen"),
                                ("ANT-relearn-trainEncoder", "ANT-finetune", "encoder trained")):
        target = "scientific-mm"
        rows.append(_row(folder, runs, f"{mine} above {theirs} on {target} ({parts}; ndcg@10)",
                         f"{mine}@{target}", f"{theirs}@{target}", "ndcg@10", "above"))
    # CLIP text on the target: re-learning against fine-tuning, and against MiniLM text; and the
    # two adaptations each at its tuned settings.
    for mine, theirs in (("ANT-relearn-clipText", "ANT-finetune-clipText"),
                         ("ANT-relearn-clipText", "ANT-relearn"),
                         ("ANT-relearn-tuned", "ANT-finetune-tuned")):
        target = "scientific-mm"
        rows.append(_row(folder, runs, f"{mine} above {theirs} on {target} (ndcg@10)",
                         f"{mine}@{target}", f"{theirs}@{target}", "ndcg@10", "above"))
    return rows


def _row(folder, runs, wording, mine, theirs, key, relation):
    """One target row of the test ``key`` of run names ``mine`` against ``theirs``."""
    return paired.target_row(folder, wording, runs, mine, theirs, protocol="full", field=key,
                             relation=relation, measured=paired.means_of(
                                 runs, mine, theirs, lambda r: r["per_market"][MARKET]["test"][key]))


def pretraining_summary():
    """Per seed: the pretraining run's wall time and macro valid/test NDCG@10 on the auxiliary
    domains (the records ``pretrain/seed<S>.json``)."""
    out = {}
    for path in sorted((FOLDER / "pretrain").glob("seed*.json")):
        record = json.loads(path.read_text())
        if not current_ant(record, pretrain_settings(record["seed"])):
            continue
        out[record["seed"]] = {"wall_s": record["wall_s"], **{
            f"{split}_ndcg@10": sum(r[split]["ndcg@10"] for r in record["per_market"].values())
            / len(record["per_market"]) for split in ("valid", "test")}}
    return out


def markdown(summary):
    """The summary as markdown: one table per target, negative transfer, targets."""
    models = summary["models"]
    lines = ["# ANT on Amazon Scientific (negative transfer)", "",
             f"Seeds {summary['seeds']}; model selected by {summary['selected_by']}; test metrics, "
             "full ranking over the target's items, mean ± sample std over seeds. Pretrained "
             f"variants load one pretraining per seed on {pretrain_settings(0)['markets']} "
             f"(mixed batches; pretraining: {CHOSEN['pretraining']}, sizes: {CHOSEN['sizes']}).", ""]
    for target in TARGETS:
        if not any(target in m["per_market"] for m in models.values()):
            lines += [f"Target `{target}`: no runs yet.", ""]
            continue
        lines += [f"Target `{target}`:", "",
                  "| model | runs | " + " | ".join(METRICS) + " | wall (min) |",
                  "|---" * (len(METRICS) + 3) + "|"]
        for name, m in models.items():
            res = m["per_market"].get(target)
            if res is None:
                continue
            flag = " ⚠" if any(f["model"] == name and f["target"] == target
                               for f in summary["negative_transfer"]) else ""
            lines.append(f"| {name}{flag} | {m['runs'][target]} | "
                         + " | ".join(_cell(res[k], res[f"{k}_std"]) for k in METRICS)
                         + f" | {m['wall_s'][target] / 60:.1f} |")
        lines.append("")
    lines += ["⚠ negative transfer: below SASRec-scratch on NDCG@10 or Recall@10 of that target.", ""]
    if summary["pretraining"]:
        lines += ["Pretraining (per seed; macro NDCG@10 over the auxiliary domains): " + "; ".join(
            f"{seed}: valid {p['valid_ndcg@10']:.4f}, test {p['test_ndcg@10']:.4f}, "
            f"{p['wall_s'] / 60:.1f} min" for seed, p in summary["pretraining"].items()), ""]
    lines += ["Targets:", "", *paired.targets_table(summary["targets"])]
    return "\n".join(lines) + "\n"


def chart(summary, path):
    """Bars of test NDCG@10 per model on each target (error bars: std over seeds)."""
    names = [n for n, m in summary["models"].items() if len(m["per_market"]) == len(TARGETS)]
    names += [n for n in summary["models"] if n not in names]
    missing = (0.0, None)  # the ablations run on scientific-mm only
    bars = {f"NDCG@10 {t}": [(summary["models"][n]["per_market"][t]["ndcg@10"],
                              summary["models"][n]["per_market"][t]["ndcg@10_std"])
                             if t in summary["models"][n]["per_market"] else missing for n in names]
            for t in TARGETS}
    paired_bars(names, bars, "test NDCG@10", f"Amazon Scientific: seeds {summary['seeds']}",
                path, margin=0.01)


def summarise():
    return write_summary(NAME, current_runs(FOLDER, is_current, MODELS), summarise_runs,
                         markdown, chart)


def main():
    ensure_datasets()
    harness_main(__doc__, MODELS, FOLDER, is_current, run_one, summarise,
                 choose=[("--sizes", SIZES, "scaled", use_sizes),
                         ("--pretraining", PRETRAININGS, "office+ml100k", use_pretraining)])


if __name__ == "__main__":
    main()
