"""Benchmark runs that outlive the process: each run keeps its state in
``saved/resume/<record path>/`` (recbole_cmr's ``resume_dir``) until its record is written, so a
run killed with the session continues next time at the epoch (or federated round) it reached,
with the numbers an uninterrupted run gives.

The folder also holds ``attempts.json``: the seconds earlier attempts spent up to their last
saved state (a killed attempt's unsaved partial epoch is trained again, and counted, by the next),
so a record's ``wall_s`` is the run's training time over all its attempts; ``attempts`` says how
many there were.
"""

import contextlib
import json
import shutil
import time
from pathlib import Path

from recbole_cmr.resume import FEDERATED_POINTER

HERE = Path(__file__).resolve().parent
RESUME = HERE / "saved" / "resume"
RESULTS = HERE / "results"
ATTEMPTS = "attempts.json"


@contextlib.contextmanager
def resumable(out_file, settings):
    """Run the body (the run and the writing of its record) with ``resume_dir`` for the run whose
    record is ``out_file`` and whose settings are ``settings``. State an earlier attempt kept
    under other settings (the harness changed since) is stale: it is removed, and the run starts
    afresh.

    Yields:
        Run: ``run.settings`` (``{"resume_dir": folder}``, for ``run_recbole_cmr``, not for the
        record: where state is kept is no setting of the run) and ``run.record`` (``wall_s``,
        and ``attempts`` when there were several, for the record). The folder is removed once
        the body returns; a body that raises (or a killed process) leaves it for the next attempt.
    """
    run = Run(state_folder(out_file), settings)
    yield run
    shutil.rmtree(run.folder, ignore_errors=True)


def state_folder(out_file):
    """``saved/resume/<record path under results/, without .json>``: one folder per record, also
    for records of the same name in two harnesses' folders (e.g. each ``--split``). A record
    outside results/ (a test's) keeps its state beside it, in ``.resume/<record name>``."""
    out_file = Path(out_file).resolve()
    try:
        kept = out_file.relative_to(RESULTS.resolve())
    except ValueError:
        return out_file.parent / ".resume" / out_file.stem
    return RESUME / kept.with_suffix("")


class Run:
    """One attempt at a run (see :func:`resumable`)."""

    def __init__(self, folder, settings):
        self.folder = Path(folder)
        self.settings = {"resume_dir": str(self.folder)}
        self.run_settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.prior_s, self.attempts = self._earlier()
        self.started = time.time()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()
        if self.attempts > 1:
            print(f"resuming from {self.folder} (attempt {self.attempts}, "
                  f"{self.prior_s / 60:.1f} min kept)", flush=True)

    def _earlier(self):
        """``(seconds, attempt number)``: what the attempts before this one kept."""
        path = self.folder / ATTEMPTS
        if not path.exists():
            return 0.0, 1
        kept = json.loads(path.read_text())
        if kept.get("settings", self.run_settings) != self.run_settings:
            print(f"removing {self.folder}: an earlier attempt's state under other settings",
                  flush=True)
            shutil.rmtree(self.folder, ignore_errors=True)
            return 0.0, 1
        states = [p.stat().st_mtime for p in self._states()]
        last = max(states, default=kept["started"])
        return kept["prior_s"] + max(0.0, last - kept["started"]), kept["attempts"] + 1

    def _states(self):
        """The files the run saved its state to: those in the folder, and the federated round
        checkpoint its ``federated.json`` names (kept with the other checkpoints)."""
        files = [p for p in self.folder.rglob("*") if p.name != ATTEMPTS]
        pointer = self.folder / FEDERATED_POINTER
        if pointer.exists():
            files.append(Path(json.loads(pointer.read_text())["checkpoint"]))
        return [p for p in files if p.exists()]

    def _write(self):
        path = self.folder / ATTEMPTS
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"prior_s": self.prior_s, "started": self.started,
                                   "attempts": self.attempts, "settings": self.run_settings}))
        tmp.replace(path)

    @property
    def record(self):
        """``{"wall_s"[, "attempts"]}``: the run's seconds so far, over all its attempts."""
        wall = {"wall_s": round(self.prior_s + time.time() - self.started, 1)}
        return wall if self.attempts == 1 else {**wall, "attempts": self.attempts}

