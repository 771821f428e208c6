"""The per-market results table: printed, and saved as JSON and CSV beside the log file."""

import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
from recbole.utils import init_logger
from tabulate import tabulate


def results_frame(per_market, macro, valid_metric):
    """One row per market plus ``macro``: the selecting valid metric, then every test metric."""
    rows = {}
    for market, result in {**per_market, "macro": macro}.items():
        row = {f"valid {valid_metric}": (result["valid"] or {}).get(valid_metric)}
        row.update(result["test"])
        rows[market] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "market"
    return frame


def format_table(frame, decimals=4):
    """The results frame as a plain-text table."""
    return tabulate(frame, headers="keys", tablefmt="github", floatfmt=f".{decimals}f")


def results_text(result, valid_metric, decimals=4):
    """``(frame, text)``: a run's results frame and the title line plus table printed for it.

    Args:
        result (dict): what ``run_recbole_cmr`` returns (``model``, ``train_mode``, ``dataset``,
            ``per_market``, ``best_valid_result``, ``test_result``), or its saved JSON.
        valid_metric (str): the selecting metric, lower case (``ndcg@10``).
    """
    macro = {"valid": result["best_valid_result"], "test": result["test_result"]}
    frame = results_frame(result["per_market"], macro, valid_metric)
    title = (f"{result['model']} ({result['train_mode']}) on {result['dataset']}: test results "
             f"per market, model selected by valid {valid_metric}")
    return frame, f"{title}\n{format_table(frame, decimals)}"


RUN_HANDLER = "_recbole_cmr_run"  # marks the log handlers a run installed
FILE_ONLY = "recbole_cmr_file_only"  # a log record with this attribute true skips the run's console
TENSORBOARD_ROOT = "log_tensorboard"  # RecBole's get_tensorboard: <root>/<log file stem>


def _not_file_only(record):
    return not getattr(record, FILE_ONLY, False)


def init_run_logger(config):
    """RecBole's ``init_logger``, with a log file of this run's own.

    RecBole configures the root logger once per process (``logging.basicConfig``), so a second
    run (hyper-tuning, a notebook) would keep logging to the first run's file. Here the handlers
    a previous run installed are closed, RecBole names and opens this run's file
    (``log/<model>/<model>-<dataset>-<time>-<hash>.log``), and handlers the process had already
    (a notebook's or pytest's) are kept; RecBole's console handler is added only when there are
    none.

    Returns:
        str: path of this run's log file.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, RUN_HANDLER, False)]:
        root.removeHandler(handler)
        handler.close()
    foreign = list(root.handlers)
    for handler in foreign:
        root.removeHandler(handler)
    try:
        init_logger(config)
    finally:
        added = list(root.handlers)
        for handler in added:
            root.removeHandler(handler)
        for handler in foreign:
            root.addHandler(handler)
    for handler in added:
        if foreign and not isinstance(handler, logging.FileHandler):
            handler.close()  # the process already prints its logs
            continue
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(_not_file_only)  # e.g. the results table, printed on stdout instead
        setattr(handler, RUN_HANDLER, True)
        root.addHandler(handler)
    return next(h.baseFilename for h in added if isinstance(h, logging.FileHandler))


def discard_run_files(log_path):
    """Remove what a run that failed on bad input wrote: its log file, its TensorBoard folder
    (``log_tensorboard/<log file stem>``), and the folders left empty by that (``log/<model>``,
    ``log``, ``log_tensorboard``). The run's log handlers are closed first."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, RUN_HANDLER, False)]:
        root.removeHandler(handler)
        handler.close()
    stem = os.path.splitext(os.path.basename(log_path))[0]
    board = os.path.join(TENSORBOARD_ROOT, stem)
    for path in (log_path, board):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
    for folder in (os.path.dirname(log_path), os.path.dirname(os.path.dirname(log_path)), TENSORBOARD_ROOT):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


PER_USER = "per_user"  # a market's per-user test values: one line each in the results JSON
AFTER_TRANSFER_PER_USER = "after_transfer_per_user"  # a source's, per target: one line each


def _compact(values):
    """A per-user entry (``[n_rows]`` lists) as one line of JSON, its float32 values in their
    shortest form."""
    def short(v):
        return [float(str(np.float32(x))) for x in v] if v and isinstance(v[0], float) else v

    return json.dumps({k: short(v) for k, v in values.items()})


def results_json(result):
    """``result`` as indented JSON, each ``per_user`` entry on one line (readable, compact)."""
    lines = []

    def mark(values):  # a placeholder string, replaced by the entry's line below
        lines.append(_compact(values))
        return f"<{PER_USER} {len(lines) - 1}>"

    def hide(value, key=None):
        if isinstance(value, dict):
            if key == PER_USER and value:
                return mark(value)
            # the children of after_transfer_per_user are per_user entries, one per target
            return {k: hide(v, PER_USER if key == AFTER_TRANSFER_PER_USER else k)
                    for k, v in value.items()}
        return [hide(v) for v in value] if isinstance(value, (list, tuple)) else value

    text = json.dumps(hide(result), indent=2, default=float)
    for i, line in enumerate(lines):
        text = text.replace(json.dumps(f"<{PER_USER} {i}>"), line, 1)
    return text


def save_results(result, frame, log_path):
    """Write ``<log>.results.json`` (the whole result dict; :func:`results_json`) and
    ``<log>.results.csv`` (table) beside the run's log file; a run that would overwrite another's
    files gets ``-2``, ``-3``, ...

    Returns:
        tuple: ``(json_path, csv_path)``.
    """
    stem = base = os.path.splitext(log_path)[0]
    n = 1
    while os.path.exists(stem + ".results.json"):
        n += 1
        stem = f"{base}-{n}"
    json_path, csv_path = stem + ".results.json", stem + ".results.csv"
    with open(json_path, "w", encoding="utf-8") as f:
        f.write(results_json(result))
    frame.to_csv(csv_path)
    return json_path, csv_path
