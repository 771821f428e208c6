"""The per-market results table: printed, and saved as JSON and CSV beside the log file."""

import json
import logging
import os

import pandas as pd
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


def log_file_path():
    """Path of the log file RecBole's ``init_logger`` opened, or None."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def save_results(result, frame, base_path):
    """Write ``<base>.results.json`` (the whole result dict) and ``<base>.results.csv`` (table)."""
    stem = os.path.splitext(base_path)[0]
    json_path, csv_path = stem + ".results.json", stem + ".results.csv"
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=float)
    frame.to_csv(csv_path)
    return json_path, csv_path
