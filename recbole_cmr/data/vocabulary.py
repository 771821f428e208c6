"""The shared vocabulary of a federation: the one thing its markets must agree on.

In-process, the markets' shared ids are the union of their tokens in first-seen order (markets in
config order), for items and for every other shared token field (users under
``shared_user_ids``, categorical features). A federated node loads only its own market, so it
cannot build that union: the dataset ships it as a file (``item_vocabulary``), written once over
all markets::

    python -m recbole_cmr.data.vocabulary --dataset=xmrec-mini [--data_path=dataset] [--config_files=...]

Format: one token per line; a plain line is an item (line ``i`` of them is item id ``i + 1``), a
line ``<field>\t<token>`` a token of another shared field (its ``i``-th such line is id ``i + 1``).
A dataset whose only shared token field is the item has the plain item list.

Loading all markets with the file gives the same ids as without it; a node loading one market with
the file gets those same ids. ``vocabulary_digest`` names a vocabulary in one string, so nodes can
check at start-up that they agree.
"""

import argparse
import hashlib
import os
from logging import getLogger

PAD = "[PAD]"


def vocabulary_path(config, name=None):
    """The ``item_vocabulary`` file: absolute, or relative to the dataset folder."""
    name = name or config["item_vocabulary"] or f"{config['dataset']}.vocab"
    return name if os.path.isabs(name) else os.path.join(config["data_path"], name)


def read_vocabulary(path):
    """``(item tokens, {field: tokens})`` of a vocabulary file, each in id order (id 1 first);
    errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"item_vocabulary: no file {path} (write it with "
                                "python -m recbole_cmr.data.vocabulary).")
    items, fields = [], {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if "\t" in line:
                field, token = line.split("\t", 1)
                fields.setdefault(field, []).append(token)
            elif line:
                items.append(line)
    for name, tokens in (("item", items), *fields.items()):
        repeated = len(tokens) - len(set(tokens))
        if repeated or PAD in tokens:
            raise ValueError(f"item_vocabulary {path}: {repeated} repeated token(s) or a {PAD} line "
                             f"in field [{name}]; each token must be listed once.")
    return items, fields


def read_item_vocabulary(path):
    """The item tokens of a vocabulary file, in id order (id 1 first); errors name the file."""
    return read_vocabulary(path)[0]


def vocabulary_digest(item_tokens, fields=None):
    """SHA-256 (hex) of the item tokens in id order (padding excluded) and of the other shared
    fields' tokens ``{field: tokens}``: equal digests, same ids."""
    lines = [t for t in item_tokens if t != PAD]
    for field in sorted(fields or {}):
        lines += [f"{field}\t{t}" for t in fields[field] if t != PAD]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def write_item_vocabulary(config, path=None):
    """Load every market of ``config['dataset']`` with shared ids and write its vocabulary (items
    and every other shared token field; atomically). Returns ``(path, digest)``."""
    from recbole_cmr.data.dataset import MultiMarketDataset

    dataset = MultiMarketDataset(config, shared_ids=True)
    path = path or vocabulary_path(config, f"{config['dataset']}.vocab")
    tokens = [str(t) for t in dataset.item_tokens[1:]]
    fields = {f: [str(t) for t in dataset.shared_field_tokens(f)[1:]] for f in dataset.shared_fields}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(f"{t}\n" for t in tokens))
        for field, values in fields.items():
            f.write("".join(f"{field}\t{t}\n" for t in values))
    os.replace(tmp, path)
    digest = vocabulary_digest(tokens, fields)
    extra = f" and {', '.join(f'{len(v)} {k}' for k, v in fields.items())}" if fields else ""
    getLogger().info(f"vocabulary of {len(tokens)} items{extra} written to {path} (sha256 {digest})")
    return path, digest


def main(argv=None):
    from recbole_cmr.config import Config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data_path", default=None, help="folder holding <dataset>/ (default: RecBole's)")
    parser.add_argument("--config_files", nargs="*", default=None)
    parser.add_argument("--out", default=None, help="file to write (default: <dataset folder>/<dataset>.vocab)")
    args = parser.parse_args(argv)
    settings = {"train_mode": "pooled", "item_vocabulary": None}
    if args.data_path:
        settings["data_path"] = args.data_path
    config = Config(model="SASRec", dataset=args.dataset, config_file_list=args.config_files,
                    config_dict=settings, argv=[])  # the command line is this tool's (--out)
    path, digest = write_item_vocabulary(config, args.out)
    print(f"{path}\nsha256 {digest}")


if __name__ == "__main__":
    main()
