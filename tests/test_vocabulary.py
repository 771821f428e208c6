"""The shared item vocabulary file: a node that loads only its own market gets the item ids all
markets agree on (what a federated node on its own machine needs), checked by digest."""

import numpy as np
import pytest
import yaml

from recbole_cmr import Config, create_dataset
from recbole_cmr.data.vocabulary import (
    main,
    read_item_vocabulary,
    read_vocabulary,
    vocabulary_digest,
    write_item_vocabulary,
)


def _dataset(settings, **extra):
    config = Config(model="SASRec", dataset="xm2",
                    config_dict={**settings, "train_mode": "federated", **extra})
    return create_dataset(config)


def _ids(market_dataset):
    """``{item token: internal id}`` of the items in a market's interactions."""
    tokens = market_dataset.field2id_token[market_dataset.iid_field]
    return {tokens[i]: int(i) for i in np.unique(market_dataset.inter_feat[market_dataset.iid_field])}


def test_a_market_alone_gets_the_ids_of_all_markets(two_markets, tmp_path, capsys):
    together = _dataset(two_markets)
    settings = tmp_path / "xm2.yaml"
    settings.write_text(yaml.safe_dump({k: two_markets[k] for k in ("load_col", "eval_args")}))
    main(["--dataset", "xm2", "--data_path", two_markets["data_path"], "--config_files", str(settings)])
    path, digest = capsys.readouterr().out.split("\n")[:2]
    assert path.endswith("xm2/xm2.vocab") and read_item_vocabulary(path) == list(together.item_tokens[1:])
    assert digest == f"sha256 {vocabulary_digest(together.item_tokens)}"
    with_file = _dataset(two_markets, item_vocabulary="xm2.vocab")  # all markets: the same ids
    assert list(with_file.item_tokens) == list(together.item_tokens)
    for market in ("in", "jp"):
        alone = _dataset(two_markets, markets=[market], item_vocabulary="xm2.vocab")
        assert alone.item_num == together.item_num
        assert _ids(alone.market_datasets[market]) == _ids(together.market_datasets[market])
        assert vocabulary_digest(alone.item_tokens) == vocabulary_digest(together.item_tokens)
    plain = _dataset(two_markets, markets=["jp"])  # without the file: its own, different ids
    assert _ids(plain.market_datasets["jp"]) != _ids(together.market_datasets["jp"])


def test_a_vocabulary_without_a_markets_item_is_an_error_naming_it(two_markets, tmp_path):
    together = _dataset(two_markets)
    jp_only = sorted(set(_ids(together.market_datasets["jp"])) - set(_ids(together.market_datasets["in"])))
    short = tmp_path / "short.vocab"
    short.write_text("".join(f"{t}\n" for t in together.item_tokens[1:] if t != jp_only[0]))
    with pytest.raises(ValueError, match=rf"short\.vocab lacks 1 item\(s\) of market \[jp\] .*jp\.inter.*{jp_only[0]}"):
        _dataset(two_markets, item_vocabulary=str(short))
    _dataset(two_markets, markets=["in"], item_vocabulary=str(short))  # in has all its items
    repeated = tmp_path / "repeated.vocab"
    repeated.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="repeated.vocab: 1 repeated token"):
        read_item_vocabulary(str(repeated))
    with pytest.raises(FileNotFoundError, match="item_vocabulary: no file .*missing.vocab"):
        _dataset(two_markets, item_vocabulary="missing.vocab")


def test_every_shared_token_field_gets_the_federations_ids(scenarios, tmp_path):
    """Scenarios of one platform share users, items and categorical features: a scenario loaded
    alone with the file gets the ids of every shared field that all scenarios loaded together have."""
    def ctr(**extra):
        return create_dataset(Config(model="MMoE", dataset="mlsc",
                                     config_dict={**scenarios, "train_mode": "federated", **extra}))

    together = ctr()
    assert {"user_id", "gender", "occupation", "genre"} <= set(together.shared_fields)
    path, digest = write_item_vocabulary(together.config, str(tmp_path / "mlsc.vocab"))
    items, fields = read_vocabulary(path)
    assert items == list(together.item_tokens[1:])
    assert fields["user_id"] == list(together.shared_field_tokens("user_id")[1:])
    for market in together.markets:
        alone = ctr(markets=[market], item_vocabulary=path)
        assert alone.vocabulary_digest() == digest
        ds, all_ds = alone.market_datasets[market], together.market_datasets[market]
        for field in ("user_id", "item_id", "gender", "occupation", "genre"):
            assert ds.num(field) == all_ds.num(field), field
            assert list(ds.field2id_token[field]) == list(all_ds.field2id_token[field]), field
        assert np.array_equal(np.asarray(ds.inter_feat["user_id"]), np.asarray(all_ds.inter_feat["user_id"]))
    plain = ctr(markets=[together.markets[0]])  # without the file: its own, smaller user space
    assert plain.market_datasets[together.markets[0]].num("user_id") < \
        together.market_datasets[together.markets[0]].num("user_id")
    short = tmp_path / "short.vocab"
    short.write_text("".join(line for line in open(path) if not line.startswith("occupation\t")) +
                     "".join(f"occupation\t{t}\n" for t in fields["occupation"][1:]))
    with pytest.raises(ValueError, match=r"short\.vocab lacks 1 token\(s\) of field \[occupation\] of market"):
        ctr(item_vocabulary=str(short))
