"""What a sampled evaluation (uni99) costs against full ranking of the same test set (issue 39's
line: at most 1.5 x), for the sequential models the benchmarks run.

    python benchmarks/sampled_eval_cost.py --dataset xmrec-mini --market ca --repeats 15

For each model: one training epoch on ``--market`` of ``--dataset`` (seed 2020, one torch
thread), then ``trainer.evaluate(test)`` under full ranking and under uni99 in turn,
``--repeats`` times each, alternating; the median time of each, their ratio, and the uni99
metrics of the plugin's path (one sequence encoding per user) against RecBole's own
``predict`` path (timed ``--recbole-repeats`` times; the metrics must be equal). Writes
``results/sampled_eval_cost-<dataset>.json``.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["SASRec", "GRU4Rec", "FeCoSR"]


def trainer_and_tests(model, dataset, market):
    """A ``model`` trainer after one epoch on ``market`` and its ``{mode: test loader}``."""
    from recbole.utils import init_seed

    from recbole_cmr import Config, create_dataset, data_preparation
    from recbole_cmr.utils import get_model, get_trainer

    tests, trainer = {}, None
    for mode in ("full", "uni99"):
        settings = {"markets": [market], "epochs": 1, "show_progress": False, "state": "WARNING",
                    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                                  "mode": mode}}
        config = Config(model=model, dataset=dataset, config_dict=settings, argv=[])
        train, _, test = data_preparation(config, create_dataset(config))
        tests[mode] = test[market]
        if trainer is None:
            init_seed(2020, True)
            net = get_model(model)(config, train[market]._dataset).to(config["device"])
            trainer = get_trainer(config["MODEL_TYPE"], model)(config, net)
            trainer._train_epoch(train[market], 0)
    return trainer, tests


def timed(trainer, loader, seed=2020):
    """``(seconds, result)`` of one ``trainer.evaluate(loader)``, negatives drawn from ``seed``."""
    from recbole.utils import init_seed

    init_seed(seed, True)
    start = time.perf_counter()
    result = trainer.evaluate(loader, load_best_model=False)
    return time.perf_counter() - start, dict(result)


def measure(model, dataset, market, repeats, recbole_repeats):
    """One model's entry: median seconds per mode, the ratio, and RecBole's path for reference."""
    from recbole.trainer import Trainer

    trainer, tests = trainer_and_tests(model, dataset, market)
    times = {"full": [], "uni99": []}
    results = {}
    for _ in range(repeats):
        for mode in times:
            seconds, results[mode] = timed(trainer, tests[mode])
            times[mode].append(seconds)
    own = type(trainer)._neg_sample_batch_eval
    type(trainer)._neg_sample_batch_eval = Trainer._neg_sample_batch_eval
    try:
        recbole = [timed(trainer, tests["uni99"]) for _ in range(recbole_repeats)]
    finally:
        type(trainer)._neg_sample_batch_eval = own
    entry = {mode: statistics.median(values) for mode, values in times.items()}
    entry.update(
        uni99_over_full=entry["uni99"] / entry["full"],
        recbole_uni99=statistics.median(seconds for seconds, _ in recbole),
        test_users=tests["full"].sample_size,
        uni99_result=results["uni99"],
        same_metrics_as_recbole=all(result == results["uni99"] for _, result in recbole))
    entry["recbole_uni99_over_full"] = entry["recbole_uni99"] / entry["full"]
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="xmrec-mini")
    parser.add_argument("--market", default="ca")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--recbole-repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    out = {"dataset": args.dataset, "market": args.market, "repeats": args.repeats,
           "torch_threads": 1, "models": {}}
    for model in args.models:
        out["models"][model] = measure(model, args.dataset, args.market, args.repeats,
                                       args.recbole_repeats)
        print(model, json.dumps(out["models"][model]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sampled_eval_cost-{args.dataset}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
