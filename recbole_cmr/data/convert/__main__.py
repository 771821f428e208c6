"""Command line: ``python -m recbole_cmr.data.convert <format> ...`` (one subcommand per format).

Errors in the input (missing file, bad header, unknown market, existing output, ...) are
reported on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from .aliccp import convert_aliccp
from .amazon18 import convert_amazon18
from .aliexpress import convert_aliexpress
from .ml100k_entities import convert_ml100k_entities
from .merge import convert_merge
from .ml100k_scenarios import SPLITS, convert_ml100k_scenarios
from .movielens import convert_movielens
from .movielens_catalogues import (
    LAST_K, MIN_RATINGS, USERS, convert_movielens_catalogues, parse_users,
)
from .unisrec import convert_unisrec
from .xmrec import convert_xmrec

PROG = "python -m recbole_cmr.data.convert"
EXAMPLES = f"""examples:
  {PROG} xmrec /work/shared/data/xmrec --out dataset --markets ca de in --name xmrec-small \\
      --max-users-per-market 200 --seed 2026
  {PROG} unisrec /work/shared/data/amazon_scientific/full --out dataset
  {PROG} movielens /work/shared/data/movielens_titles --out dataset
  {PROG} movielens-catalogues /work/shared/data/movielens_titles --xmrec /work/shared/data/xmrec \\
      --out dataset
  {PROG} aliexpress --market nl=train_nl.csv --test-market nl=test_nl.csv --out dataset
  {PROG} ml100k-scenarios --out dataset
  {PROG} ml100k-entities --out dataset
  {PROG} amazon18 /work/shared/data/amazon18_text --category Office_Products --out dataset
  {PROG} merge dataset/office-products dataset/scientific --out dataset --name scientific-transfer
  {PROG} ali-ccp --train train.csv --valid val.csv --test test.csv --out dataset
"""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def market_path(text: str) -> tuple[str, str]:
    """argparse type: ``NAME=path``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=path.csv, got {text!r}")
    return name, path


def _common() -> argparse.ArgumentParser:
    """Options shared by every subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", required=True, type=Path, help="folder that receives <out>/<name>/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <out>/<name>/")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subcommand per format."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert public data sets to multi-market RecBole atomic datasets: "
        "<out>/<name>/<market>.inter (+ optional <name>.item, README.md), written atomically.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    common = [_common()]
    _add_xmrec(sub, common)
    _add_unisrec(sub, common)
    _add_movielens(sub, common)
    _add_movielens_catalogues(sub, common)
    _add_aliexpress(sub, common)
    _add_ml100k_scenarios(sub, common)
    _add_ml100k_entities(sub, common)
    _add_aliccp(sub, common)
    _add_amazon18(sub, common)
    _add_merge(sub, common)
    return parser


def _add_xmrec(sub, parents) -> None:
    p = sub.add_parser("xmrec", parents=parents, help="XMarket <market>_5core.txt files",
                       description="XMRec <market>_5core.txt (userId itemId rate date) -> one "
                       "<market>.inter per market; user tokens are <market>_<userId>.")
    p.add_argument("src", type=Path, help="folder with <market>_5core.txt files")
    p.add_argument("--name", default="xmrec", help="dataset name (default: xmrec)")
    p.add_argument("--markets", nargs="+", metavar="M",
                   help="markets to convert (default: all found)")
    p.add_argument("--max-users-per-market", type=positive_int, metavar="N",
                   help="keep a seeded random sample of at most N users per market")
    p.add_argument("--seed", type=int, default=2026,
                   help="seed of the user sample (default: 2026)")
    p.add_argument("--min-item-inter", type=positive_int, metavar="N",
                   help="drop items with fewer than N interactions over all written markets "
                   "(one pass, after the user sample)")
    p.set_defaults(run=lambda a, cmd: convert_xmrec(
        a.src, a.out, overwrite=a.overwrite, name=a.name, markets=a.markets,
        max_users_per_market=a.max_users_per_market, seed=a.seed,
        min_item_inter=a.min_item_inter, command=cmd))


def _add_unisrec(sub, parents) -> None:
    p = sub.add_parser("unisrec", parents=parents, help="UniSRec-format Amazon data (one market)",
                       description="UniSRec <Name>.{train,valid,test}.inter + .text + .item2index "
                       "+ .user2index -> one market with full ordered sequences (synthetic "
                       "timestamps = positions) and <name>.item with text.")
    p.add_argument("src", type=Path, help="folder with the UniSRec files")
    p.add_argument("--dataset", help="<Name> of the files (default: the only one found)")
    p.add_argument("--name", help="dataset name (default: <Name> lower-cased)")
    p.add_argument("--market", help="market name (default: <Name> lower-cased)")
    p.set_defaults(run=lambda a, cmd: convert_unisrec(
        a.src, a.out, overwrite=a.overwrite, dataset=a.dataset, name=a.name,
        market=a.market, command=cmd))


def _movielens_args(p, name, seed_help) -> None:
    """The arguments both MovieLens converters have: src, --name, --seed."""
    p.add_argument("src", type=Path, help="folder with ml-100k.* and ml-1m.* files")
    p.add_argument("--name", default=name, help=f"dataset name (default: {name})")
    p.add_argument("--seed", type=int, default=2026, help=f"{seed_help} (default: 2026)")


def _add_movielens(sub, parents) -> None:
    p = sub.add_parser("movielens", parents=parents,
                       help="MovieLens-100K/1M by title -> 5 markets",
                       description="movielens_titles (ml-100k/ml-1m keyed by title) -> markets "
                       "ml100k and, by the first zip-code digit of ML-1M users, east 0-2, south 3 "
                       "and 7, central 4-6, west 8-9; seeded user samples, item text.")
    _movielens_args(p, "movielens-markets", "seed of the user samples")
    p.add_argument("--max-users", type=positive_int, default=600, metavar="N",
                   help="users sampled per market (default: 600)")
    p.add_argument("--last-k", type=positive_int, default=30, metavar="K",
                   help="ratings kept per user, the last by time (default: 30)")
    p.set_defaults(run=lambda a, cmd: convert_movielens(
        a.src, a.out, overwrite=a.overwrite, name=a.name, seed=a.seed,
        max_users=a.max_users, last_k=a.last_k, command=cmd))


def _add_movielens_catalogues(sub, parents) -> None:
    p = sub.add_parser("movielens-catalogues", parents=parents,
                       help="MovieLens markets, each selling its own catalogue (XMRec-like)",
                       description="movielens_titles -> the movielens markets, unequal in size, "
                       "each selling a catalogue shaped like XMRec's; real ratings and text.")
    _movielens_args(p, "movielens-catalogues", "seed of the user samples and the catalogues")
    p.add_argument("--users", nargs="+", default=[], metavar="MARKET=N",
                   help="users sampled in a market (default: "
                   + " ".join(f"{m}={n}" for m, n in USERS.items()) + ")")
    p.add_argument("--last-k", type=positive_int, default=LAST_K, metavar="K",
                   help=f"candidate ratings per user, the last by time (default: {LAST_K})")
    p.add_argument("--min-ratings", type=positive_int, default=MIN_RATINGS, metavar="N",
                   help=f"drop users left with fewer ratings (default: {MIN_RATINGS})")
    p.add_argument("--xmrec", type=Path, metavar="DIR",
                   help="XMRec <market>_5core.txt folder, measured for the README's comparison")
    p.set_defaults(run=lambda a, cmd: convert_movielens_catalogues(
        a.src, a.out, overwrite=a.overwrite, name=a.name, seed=a.seed,
        users=parse_users(a.users), last_k=a.last_k, min_ratings=a.min_ratings,
        xmrec=a.xmrec, command=cmd))


def _add_aliexpress(sub, parents) -> None:
    p = sub.add_parser("aliexpress", parents=parents, help="AliExpress per-country CTR/CVR CSVs",
                       description="AliExpress CSVs (search_id, categorical_1..16, "
                       "numerical_1..63, click, conversion) -> <market>.inter per train CSV and "
                       "<market>.test.inter per test CSV.")
    p.add_argument("--market", type=market_path, action="append", required=True,
                   metavar="NAME=CSV", dest="markets", help="a market's train CSV (repeatable)")
    p.add_argument("--test-market", type=market_path, action="append", default=[],
                   metavar="NAME=CSV", dest="test_markets",
                   help="a market's test CSV, written as <market>.test.inter")
    p.add_argument("--name", default="aliexpress", help="dataset name (default: aliexpress)")
    p.set_defaults(run=lambda a, cmd: convert_aliexpress(
        _unique(a.markets, "--market"), a.out, overwrite=a.overwrite,
        test_markets=_unique(a.test_markets, "--test-market"), name=a.name, command=cmd))


def _ml100k_args(p, name, seed_help, negatives, negatives_help) -> None:
    """The arguments every ml-100k converter has: src, --name, --seed, --negatives."""
    p.add_argument("src", type=Path, nargs="?",
                   help="folder with ml-100k.inter, ml-100k.user, ml-100k.item (default: the "
                   "copy in the recbole package, recbole/dataset_example/ml-100k)")
    p.add_argument("--name", default=name, help=f"dataset name (default: {name})")
    p.add_argument("--seed", type=int, default=2026, help=f"{seed_help} (default: 2026)")
    p.add_argument("--negatives", type=positive_int, default=negatives, metavar="N",
                   help=f"{negatives_help} (default: {negatives})")


def _add_ml100k_scenarios(sub, parents) -> None:
    p = sub.add_parser("ml100k-scenarios", parents=parents,
                       help="MovieLens-100K ratings -> 4 age-band CTR scenarios",
                       description="RecBole's atomic ml-100k files -> scenarios under25, 25to34, "
                       "35to44, 45plus by user age; each rating a click (conversion: rating >= "
                       "4) followed by sampled unrated movies as non-clicks; per-scenario .user "
                       "and a shared .item (release year, genre).")
    _ml100k_args(p, "ml100k-scenarios", "seed of the negative sampling", 4,
                 "sampled non-clicked movies per rating")
    p.add_argument("--split", choices=SPLITS, default="age",
                   help="what the scenarios are: age bands (default), gender, or occupation "
                   "groups (name the dataset with --name)")
    p.set_defaults(run=lambda a, cmd: convert_ml100k_scenarios(
        a.src, a.out, overwrite=a.overwrite, name=a.name, seed=a.seed, negatives=a.negatives,
        split=a.split, command=cmd))


def _add_ml100k_entities(sub, parents) -> None:
    p = sub.add_parser("ml100k-entities", parents=parents,
                       help="MovieLens-100K ratings -> two CTR entities sharing users",
                       description="RecBole's atomic ml-100k files -> entities source and target "
                       "(movies with a Documentary, Film-Noir, Horror, Western, Musical or Mystery "
                       "genre); label = rating >= 4, plus sampled unrated movies of the entity as "
                       "negatives; source.item (release year, genre), target.item (title-text "
                       "k-means cluster).")
    _ml100k_args(p, "ml100k-entities", "seed of the negative sampling and of k-means", 2,
                 "sampled unrated movies per positive")
    p.add_argument("--clusters", type=positive_int, default=32, metavar="K",
                   help="k-means clusters of the target titles (default: 32)")
    p.add_argument("--encoder", default=None,
                   help="sentence-transformers model name or path for the titles (default: "
                   "all-MiniLM-L6-v2, shipped offline)")
    p.add_argument("--unrelated-source", action="store_true",
                   help="give each user another user's source ratings (a seeded permutation): "
                   "a source entity unrelated to the target's users")
    p.set_defaults(run=lambda a, cmd: convert_ml100k_entities(
        a.src, a.out, overwrite=a.overwrite, name=a.name, seed=a.seed, negatives=a.negatives,
        unrelated_source=a.unrelated_source,
        clusters=a.clusters, encoder=a.encoder, command=cmd))


def _add_aliccp(sub, parents) -> None:
    p = sub.add_parser("ali-ccp", parents=parents,
                       help="Ali-CCP train/valid/test CSVs -> one market per scenario",
                       description="Ali-CCP CSVs (click, purchase, feature columns, D* dense "
                       "columns; column 301 = scenario) -> scenario<v>.{train,valid,test}.inter "
                       "per scenario value v (RecBole benchmark_filename: [train, valid, test]).")
    p.add_argument("--train", type=Path, required=True, metavar="CSV", help="train CSV")
    p.add_argument("--valid", type=Path, required=True, metavar="CSV", help="validation CSV")
    p.add_argument("--test", type=Path, required=True, metavar="CSV", help="test CSV")
    p.add_argument("--name", default="ali-ccp", help="dataset name (default: ali-ccp)")
    p.set_defaults(run=lambda a, cmd: convert_aliccp(
        a.train, a.valid, a.test, a.out, overwrite=a.overwrite, name=a.name, command=cmd))


def _unique(pairs: list[tuple[str, str]], option: str) -> dict[str, str]:
    """``NAME=path`` pairs as a dict; ValueError on a repeated NAME."""
    result: dict[str, str] = {}
    for name, path in pairs:
        if name in result:
            raise ValueError(f"{option}: market {name!r} given twice")
        result[name] = path
    return result


def _add_amazon18(sub, parents) -> None:
    p = sub.add_parser("amazon18", parents=parents, help="Amazon 2018 sliding-window rows (one market)",
                       description="amazon18_text index__<Category>.item.json + valid__/test__"
                       "<Category>_*.csv rows -> one market of rebuilt item sequences (timestamps "
                       "= positions) and <name>.item with title + categories + brand.")
    p.add_argument("src", type=Path, help="the amazon18_text folder")
    p.add_argument("--category", default="Office_Products",
                   help="category of the files (default: Office_Products)")
    p.add_argument("--name", help="dataset name (default: the category, e.g. office-products)")
    p.add_argument("--market", help="market name (default: the category's first word, e.g. office)")
    p.set_defaults(run=lambda a, cmd: convert_amazon18(
        a.src, a.out, overwrite=a.overwrite, category=a.category, name=a.name, market=a.market,
        command=cmd))


def _add_merge(sub, parents) -> None:
    p = sub.add_parser("merge", parents=parents, help="several converted datasets -> one",
                       description="Converted dataset folders -> one multi-market dataset: markets "
                       "kept by name, item tables joined, <folder>.<suffix> files (e.g. image "
                       "features) copied as <name>.<suffix>.")
    p.add_argument("inputs", nargs="+", metavar="FOLDER[:M1,M2]",
                   help="a dataset folder, optionally with the markets to take")
    p.add_argument("--name", required=True, help="name of the merged dataset")
    p.set_defaults(run=lambda a, cmd: convert_merge(a.inputs, a.out, name=a.name,
                                                    overwrite=a.overwrite, command=cmd))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    command = f"{PROG} {shlex.join(argv)}"
    try:
        path = args.run(args, command)
    except (ValueError, OSError) as exc:
        message = " ".join(str(exc).split())
        parser.exit(2, f"{PROG} {args.format}: error: {message}\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
