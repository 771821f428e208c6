"""Hyper-parameter search with RecBole's ``HyperTuning`` and the plugin's objective function.

    python -m recbole_cmr.hyper_tuning --model=SASRec --dataset=xmrec-mini \\
        --params_file=hyper.test --algo=bayes --max_evals=20 --output_dir=hyper

``params_file`` uses RecBole's format, one parameter per line: ``learning_rate loguniform -8,0``,
``hidden_size choice [32,64]``. Writes ``<output_dir>/<model>-<dataset>.best.json`` (best
parameters and their results) and ``<model>-<dataset>.trials.csv`` (one row per trial).
With ``--resume_dir=<folder>`` every trial keeps its state in ``<folder>/<trial name>``: a search
cut off and started again retrains no finished trial and continues the one it was in.
"""

import argparse
import hashlib
import json
import os
import re
from functools import partial

import pandas as pd
from recbole.trainer import HyperTuning

from recbole_cmr.quick_start import objective_function


def _objective(base_config, argv, config_dict, config_file_list):
    """HyperTuning's call ``f(params, files)`` with the fixed model/dataset settings and the
    command line ``argv`` (``--key=value`` strings) added. With ``resume_dir`` each trial keeps
    its state in its own subfolder (:func:`trial_name`), so a search started again after it was
    cut off retrains no finished trial and continues the one it was in."""
    return objective_function({**base_config, **config_dict}, config_file_list, argv=argv,
                              trial=trial_name(config_dict))


def trial_name(params):
    """A folder name for the trial with searched values ``params`` (``{name: value}``): the
    values readable, e.g. ``learning_rate=0.001_hidden_size=64``, and a digest of all of them, so
    no two trials share a name (values that differ only in characters a folder name cannot
    hold, or names cut to length)."""
    text = "_".join(f"{k}={v}" for k, v in sorted(params.items()))
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._=-]+', '-', text)[:80]}-{digest}"


def trials_frame(hp):
    """One row per trial: its parameters, valid score, and macro valid/test metrics."""
    rows = []
    for params, result in hp.params2result.items():
        row = {"params": params, "best_valid_score": result["best_valid_score"]}
        row.update({f"valid {k}": v for k, v in (result["best_valid_result"] or {}).items()})
        row.update({f"test {k}": v for k, v in result["test_result"].items()})
        rows.append(row)
    return pd.DataFrame(rows)


def run_hyper(model, dataset, params_file, algo="exhaustive", max_evals=100, early_stop=10,
              config_file_list=None, config_dict=None, output_dir="hyper", argv=()):
    """Run the search; return ``(best_params, best_result, paths written)``.

    ``argv``: further settings as ``--key=value`` strings (the command line's), fixed for every
    trial; the process's own ``sys.argv`` is never read."""
    base = {"model": model, "dataset": dataset, **(config_dict or {})}
    hp = HyperTuning(
        partial(_objective, base, list(argv)), params_file=params_file, algo=algo, max_evals=max_evals,
        early_stop=early_stop, fixed_config_file_list=config_file_list,
    )
    searched = sorted(set(hp.space) & {a.split("=", 1)[0].lstrip("-") for a in argv})
    if searched:
        raise ValueError(f"{', '.join(searched)} is searched ({params_file}) and also set on the "
                         "command line, which would fix it in every trial: drop one of them.")
    hp.run()
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, f"{model}-{dataset}")
    best_result = hp.params2result[hp.params2str(hp.best_params)]
    with open(stem + ".best.json", "w", encoding="utf-8") as f:
        summary = {k: best_result[k] for k in ("best_valid_score", "best_valid_result", "test_result")}
        json.dump({"best_params": hp.best_params, **summary}, f, indent=2, default=float)
    trials_frame(hp).to_csv(stem + ".trials.csv", index=False)
    hp.export_result(output_file=stem + ".trials.txt")
    return hp.best_params, best_result, [stem + ".best.json", stem + ".trials.csv"]


def main(argv=None):
    """The command line (``argv``: its arguments, default ``sys.argv[1:]``); any ``--key=value``
    that is not one of the search's options is a setting of every trial. A user error exits with
    one line, its traceback only with ``--debug`` (``recbole_cmr.__main__.run_command``)."""
    from recbole_cmr.__main__ import run_command

    run_command("recbole_cmr.hyper_tuning", _search, argv)


def _search(argv):
    from recbole_cmr.__main__ import DEBUG_ENV, DEBUG_FLAG

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", "-m", default="SASRec")
    parser.add_argument("--dataset", "-d", default="xmrec-mini")
    parser.add_argument("--params_file", required=True, help="RecBole hyper-parameter file")
    parser.add_argument("--algo", default="exhaustive", choices=["exhaustive", "random", "bayes"])
    parser.add_argument("--max_evals", type=int, default=100, help="trials (random/bayes)")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after N trials without gain")
    parser.add_argument("--config_files", default=None, help="fixed yaml files, space separated")
    parser.add_argument("--output_dir", default="hyper")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of a bad-input error (also: {DEBUG_ENV}=1)")
    args, settings = parser.parse_known_args(argv)  # settings: --key=value for every trial
    files = args.config_files.split() if args.config_files else None
    best, result, paths = run_hyper(
        args.model, args.dataset, args.params_file, args.algo, args.max_evals, args.early_stop,
        files, output_dir=args.output_dir, argv=settings,
    )
    print("best params:", best)
    print("best valid score:", result["best_valid_score"], "test (macro):", dict(result["test_result"]))
    print("written:", ", ".join(paths))


if __name__ == "__main__":
    main()
