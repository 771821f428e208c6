"""Validation-only search of ANT's adaptation stage on ``scientific-mm``: the same grid for
re-learning and fine-tuning, through ``recbole_cmr.hyper_tuning`` (RecBole's HyperTuning), from
the benchmark's pretraining of the seed.

    python benchmarks/tune_ant.py --seed 2020

Asks whether re-learning's shortfall against fine-tuning in ``transfer_ant.py`` is a matter of
the adaptation settings (the benchmark uses ANT.yaml's for both). Each variant writes
``results/ant-tuning/<variant>@scientific-mm-seed<S>/`` (``*.best.json``: the trial with the
best valid NDCG@10 of the target, with its test metrics; ``*.trials.csv``: every trial;
``run.json``: the model's revision and the settings around the grid, the benchmark's protocol
included) and is skipped when that folder has its ``best.json`` and a ``run.json`` that is current
(``transfer_ant.current_ant``: a tuning under an older protocol is redone). Test metrics are read
only after selection. A search cut off (the session ended) continues next time: every trial keeps
its state in ``saved/resume/ant-tuning/<variant>@scientific-mm-seed<S>/<trial>/`` until the
variant's folder is written, so finished trials are not trained again.
"""

import argparse
import json
import shutil

import transfer_ant as ant
from cross_market import RESULTS
from resumable import resumable

GRID = {"learning_rate": [0.001, 0.003], "hidden_dropout_prob": [0.5, 0.2]}
VARIANTS = ["ANT-relearn", "ANT-finetune"]
FOLDER = RESULTS / "ant-tuning"


def params_text(grid):
    """RecBole's hyper-parameter file format: ``name choice [v1,v2]`` per line."""
    return "".join(f"{k} choice [{','.join(map(str, v))}]\n" for k, v in grid.items())


def run_record(variant, seed):
    """What ``run.json`` holds for ``variant``'s tuning: model, revision and settings."""
    model, _, settings = ant.run_settings(f"{variant}@scientific-mm", seed)
    return {"model": model, "revision": ant.REVISIONS[model],
            "settings": json.loads(json.dumps(settings))}


def is_done(out, variant, seed):
    """True when ``out`` holds a finished tuning made under the current protocol and settings."""
    stamp = out / "run.json"
    if not list(out.glob("*.best.json")) or not stamp.exists():
        return False
    current = run_record(variant, seed)
    return ant.current_ant(json.loads(stamp.read_text()), current["settings"])


def tune(variant, seed):
    """Run the grid for ``variant`` on scientific-mm; returns its output folder."""
    from recbole_cmr.hyper_tuning import run_hyper

    out = FOLDER / f"{variant}@scientific-mm-seed{seed}"
    if is_done(out, variant, seed):
        print(f"== {out.name}: done, skipped", flush=True)
        return out
    model, dataset, settings = ant.run_settings(f"{variant}@scientific-mm", seed)
    ant.ensure_pretrained(seed)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "grid.hyper").write_text(params_text(GRID))
    (partial / "run.json").write_text(json.dumps(run_record(variant, seed), indent=2))
    print(f"== tuning {variant}@scientific-mm, seed {seed}: {GRID}", flush=True)
    with resumable(out, settings) as run:  # each trial cut off continues where it was
        run_hyper(model, dataset, str(partial / "grid.hyper"), algo="exhaustive",
                  config_dict={**settings, **run.settings}, output_dir=str(partial))
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)  # nothing half-written under the final name
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    args = parser.parse_args(argv)
    ant.ensure_datasets()
    for variant in args.variants:
        tune(variant, args.seed)


if __name__ == "__main__":
    main()
