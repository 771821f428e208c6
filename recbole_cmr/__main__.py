"""Command line: ``python -m recbole_cmr --model=SASRec --dataset=xmrec-mini [--key=value ...]``."""

import argparse

DEFAULT_MODEL = "SASRec"
DEFAULT_DATASET = "xmrec-mini"
DEFAULT_CTR_DATASET = "ml100k-scenarios"  # context-aware (CTR) models: MMoE, PF-MSMTrec, DeepFM
DEFAULT_ENTITY_DATASET = "ml100k-entities"  # multi-entity CTR models: MKT, EntityDNN, SharedBottom, PLE


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
    args, _ = parser.parse_known_args(argv)  # the rest is read by RecBole's Config
    return args


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``): every ``--key=value`` in it is a
    setting, and with ``argv`` given ``sys.argv`` is not read."""
    from recbole_cmr.quick_start import run_recbole_cmr

    args = parse_args(argv)
    files = args.config_files.strip().split(" ") if args.config_files else None
    dataset = args.dataset or default_dataset(args.model)
    return run_recbole_cmr(model=args.model, dataset=dataset, config_file_list=files, argv=argv)


if __name__ == "__main__":
    main()
