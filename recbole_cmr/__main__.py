"""Command line: ``python -m recbole_cmr --model=SASRec --dataset=xmrec-mini [--key=value ...]``.

A user error ends the command with one line on stderr, ``recbole_cmr: error: <message>``, and
exit status 2; ``--debug`` (or the environment variable ``RECBOLE_CMR_DEBUG=1``) shows the
traceback instead. The rule: the plugin reports bad settings, files and checkpoints as
``ValueError``, ``KeyError`` or ``FileNotFoundError`` with a message saying what to fix
(``recbole_cmr.quick_start.USER_ERRORS``); any other exception is a bug and keeps its traceback.
Called from Python, ``run_recbole_cmr`` raises as usual.
"""

import argparse
import os
import sys

DEFAULT_MODEL = "SASRec"
DEFAULT_DATASET = "xmrec-mini"
DEFAULT_CTR_DATASET = "ml100k-scenarios"  # context-aware (CTR) models: MMoE, PF-MSMTrec, DeepFM
DEFAULT_ENTITY_DATASET = "ml100k-entities"  # multi-entity CTR models: MKT, EntityDNN, SharedBottom, PLE
DEBUG_FLAG, DEBUG_ENV = "--debug", "RECBOLE_CMR_DEBUG"


def error_line(error):
    """The message of ``error`` on one line (a ``KeyError``'s without the quotes ``str`` adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def run_command(prog, command, argv=None):
    """Run ``command(argv)`` as the command line ``prog``: a user error (``USER_ERRORS``) becomes
    ``<prog>: error: <message>`` on stderr and exit status 2, unless ``--debug`` is in ``argv``
    (it is removed) or ``RECBOLE_CMR_DEBUG`` is set (not ``0``): then it is raised.

    Args:
        prog (str): the name the error line starts with.
        command (callable): takes the argument list, returns what the command returns.
        argv (list, optional): the arguments (default ``sys.argv[1:]``).
    """
    from recbole_cmr.quick_start import USER_ERRORS

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    try:
        return command([a for a in argv if a != DEBUG_FLAG])
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {error_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def default_dataset(model):
    """The shipped dataset a model runs on without ``--dataset``: ``ml100k-entities`` for the
    multi-entity models (MKT and its baselines), ``ml100k-scenarios`` for other context-aware
    (CTR) models, else ``xmrec-mini``."""
    from recbole.utils import ModelType

    from recbole_cmr.utils import get_model

    try:
        model_class = get_model(model)
    except ValueError:  # an unknown model: the run reports it
        return DEFAULT_DATASET
    if getattr(model_class, "multi_entity", False):
        return DEFAULT_ENTITY_DATASET
    return DEFAULT_CTR_DATASET if model_class.type == ModelType.CONTEXT else DEFAULT_DATASET


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train and evaluate a recbole_cmr or RecBole model on every market of a "
        "dataset. Any RecBole/recbole_cmr setting can be given as --key=value.",
    )
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL, help="model name (default SASRec)")
    parser.add_argument("--dataset", "-d", default=None,
                        help="dataset folder name (default: the shipped xmrec-mini; "
                        "ml100k-scenarios for CTR models such as PF-MSMTrec)")
    parser.add_argument("--config_files", default=None, help="yaml files, space separated")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of a bad-input error (also: {DEBUG_ENV}=1)")
    args, _ = parser.parse_known_args(argv)  # the rest is read by RecBole's Config
    return args


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``): every ``--key=value`` in it is a
    setting, and with ``argv`` given ``sys.argv`` is not read. A user error exits with one line
    (``run_command``)."""
    return run_command("recbole_cmr", _run_settings, argv)


def _run_settings(argv):
    from recbole_cmr.quick_start import run_recbole_cmr

    args = parse_args(argv)
    files = args.config_files.strip().split(" ") if args.config_files else None
    dataset = args.dataset or default_dataset(args.model)
    return run_recbole_cmr(model=args.model, dataset=dataset, config_file_list=files, argv=argv)


if __name__ == "__main__":
    main()
