"""README shows what the commands print."""

import json
from pathlib import Path

from recbole_cmr.results import results_text

REPO = Path(__file__).resolve().parents[1]


def _block_after(text, marker):
    """The first fenced block after ``marker`` in ``text``, without its fences."""
    start = text.index("```\n", text.index(marker)) + 4
    return text[start:text.index("```", start)].rstrip("\n")


def test_readme_default_run_table_is_the_recorded_run():
    """README's table for ``python run_recbole_cmr.py`` is, line for line, what that command
    printed in its recorded run (``benchmarks/default_run.py`` rewrites the record)."""
    record = json.loads((REPO / "benchmarks" / "results" / "default-run.json").read_text())
    assert record["command"] == "python run_recbole_cmr.py"
    assert record["model"] == "SASRec" and record["dataset"] == "xmrec-mini"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = _block_after(readme, "`python run_recbole_cmr.py` trains RecBole's SASRec")
    assert shown == results_text(record, record["valid_metric"])[1]
