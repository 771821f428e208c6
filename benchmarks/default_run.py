"""README's default run, recorded: ``python run_recbole_cmr.py`` (SASRec per market on the shipped
xmrec-mini, every setting at its default) as a user runs it, and its printed table.

    python benchmarks/default_run.py

writes ``benchmarks/results/default-run.json`` (the run's results JSON plus the selecting metric,
the wall time and the machine) and prints the block README shows; ``tests/test_readme.py``
checks that README's block is this record's table, so README shows what the command prints.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECORD = HERE / "results" / "default-run.json"


def main():
    with tempfile.TemporaryDirectory() as work:  # the run's log/, saved/ go there
        start = time.time()
        subprocess.run([sys.executable, str(REPO / "run_recbole_cmr.py")], cwd=work, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.time() - start
        [results] = Path(work, "log", "SASRec").glob("*.results.json")
        record = json.loads(results.read_text())
    record.update(valid_metric="ndcg@10", command="python run_recbole_cmr.py",
                  wall_s=round(wall, 1), machine=f"{platform.machine()}, {os.cpu_count()} cores")
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    from recbole_cmr.results import results_text

    print(results_text(record, record["valid_metric"])[1])


if __name__ == "__main__":
    main()
