"""``resume_dir``: a run killed part-way continues where it stopped when started again.

Every training stage of a run (a market's fit, the pooled or source stage, each market's
fine-tuning, the federated rounds) keeps its state in ``resume_dir`` as it goes:

* a fit (:class:`~recbole_cmr.trainer.MultiMarketTrainerMixin`) writes ``<resume_dir>/<tag>.pth``
  at the start of every epoch after its first (weights, optimizer, early-stopping state, the
  python / numpy / torch / CUDA RNG states and the training loader's shuffling generator: all
  the run's state at the end of the epoch before) and, when it ends, the same state marked done
  with what ``fit`` returned;
* the federated rounds write ``<resume_dir>/federated.json``, naming their round checkpoint (which
  already holds each round's whole state, as ``fed_resume`` reads it).

Started again with the same settings and folder, a run takes each finished stage as it was (not
trained again), continues the interrupted one from its last epoch or round, and gives the numbers
an uninterrupted run gives. A file written under other settings is an error (the fingerprint:
model, dataset, and every setting the user gave except ``resume_dir``).
"""

import json
import os
import random
from logging import getLogger

import numpy as np
import torch

from recbole_cmr import __version__
from recbole_cmr.compat import checkpoint_safe, load_checkpoint
from recbole_cmr.data.vocabulary import read_vocabulary, vocabulary_digest, vocabulary_path

FEDERATED_POINTER = "federated.json"


def rng_states():
    """The python, numpy, torch and CUDA RNG states, as plain data (``weights_only`` loads)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states):
    """Restore :func:`rng_states` output (tensors may come back on any device)."""
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def fingerprint(config):
    """What must match for a resume file to continue this run: ``{setting: value}`` (plain data).

    ``item_vocabulary`` counts by the ids it fixes (its digest), not by where the file lies:
    Flower's launcher writes it into a new work folder each time."""
    given = {k: v for k, v in config.external_config_dict.items() if k != "resume_dir"}
    if given.get("item_vocabulary") and os.path.isfile(vocabulary_path(config)):
        given["item_vocabulary"] = "sha256 " + vocabulary_digest(*read_vocabulary(vocabulary_path(config)))
    return checkpoint_safe({"recbole_cmr": __version__, "model": config["model"],
                            "dataset": config["dataset"], "settings": given})


def check_fingerprint(stored, config, path):
    """Raise ValueError naming the settings in which ``stored`` (a file's fingerprint at ``path``)
    differs from this run's."""
    now = fingerprint(config)
    if _canonical(stored) == _canonical(now):
        return
    old, new = stored.get("settings", {}), now["settings"]
    keys = [k for k in ("recbole_cmr", "model", "dataset") if stored.get(k) != now[k]]
    keys += sorted(k for k in set(old) | set(new) if _canonical(old.get(k)) != _canonical(new.get(k)))
    shown = ", ".join(f"{k}: {_get(stored, old, k)!r} there, {_get(now, new, k)!r} now" for k in keys[:4])
    raise ValueError(f"resume_dir [{os.path.dirname(path)}] holds [{os.path.basename(path)}] of a run "
                     f"with other settings ({shown}): give this run another resume_dir, or delete "
                     "that folder to start afresh.")


def _get(top, settings, key):
    return top[key] if key in ("recbole_cmr", "model", "dataset") else settings.get(key)


def _canonical(value):
    return json.dumps(value, sort_keys=True, default=str)


def stage_file(config, tag):
    """``<resume_dir>/<tag>.pth`` where this run keeps stage ``tag``'s state, or None (no
    ``resume_dir``)."""
    folder = config["resume_dir"]
    if not folder:
        return None
    if not isinstance(folder, str):
        raise ValueError(f"resume_dir must be a folder path, not {folder!r}.")
    return os.path.join(folder, f"{tag}.pth")


def loader_generators(loader):
    """The ``torch.Generator`` objects that shuffle ``loader`` (RecBole's loaders have one; a
    knowledge-aware model's loader two, one per inner loader)."""
    if isinstance(getattr(loader, "generator", None), torch.Generator):
        return [loader.generator]
    inner = [getattr(loader, name, None) for name in ("general_dataloader", "kg_dataloader")]
    found = [g for d in inner for g in loader_generators(d)] if all(inner) else []
    if not found:
        raise ValueError(f"resume_dir: the training loader {type(loader).__name__} has no shuffling "
                         "generator to keep, so an interrupted fit could not continue exactly; "
                         "unset resume_dir for this model.")
    return found


def read_stage(config, path):
    """The stage state kept at ``path`` (checked against this run's settings), or None."""
    if not path or not os.path.exists(path):
        return None
    state = load_checkpoint(path)
    check_fingerprint(state.get("fingerprint", {}), config, path)
    return state


def federated_resume(config, checkpoint_file, requested=None):
    """The round checkpoint to resume the federated rounds from: ``requested`` (``fed_resume``)
    when given, else the one this run's ``resume_dir`` names (if it was written). Points
    ``resume_dir`` at ``checkpoint_file`` (the rounds' new checkpoint) when there is none to resume.

    Args:
        config (Config): the run's settings.
        checkpoint_file (str or None): where the server will write its round checkpoint.
        requested (str, optional): a round checkpoint named by the user.
    """
    pointer = os.path.join(config["resume_dir"], FEDERATED_POINTER) if config["resume_dir"] else None
    if requested or not pointer:
        return requested
    if not checkpoint_file:
        raise ValueError("resume_dir needs the federated round checkpoint, which a run with "
                         "saved=False does not write: run with saved=True or unset resume_dir.")
    if os.path.exists(pointer):
        with open(pointer) as f:
            kept = json.load(f)
        check_fingerprint(kept["fingerprint"], config, pointer)
        if os.path.exists(kept["checkpoint"]):
            getLogger().info(f"resume_dir: federated rounds continue from [{kept['checkpoint']}]")
            return kept["checkpoint"]
    os.makedirs(config["resume_dir"], exist_ok=True)
    tmp = pointer + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint_file),
                   "fingerprint": fingerprint(config)}, f, default=str)
    os.replace(tmp, pointer)
    return None
