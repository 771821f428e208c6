"""Bad input: a clear error naming the problem, and nothing written."""

import shutil

import pytest

from recbole_cmr import run_recbole_cmr
from conftest import files_under


def _run(settings, dataset="xm2", model="SASRec"):
    return run_recbole_cmr(model=model, dataset=dataset, config_dict=settings)


def _assert_nothing_saved(settings):
    assert files_under(settings["checkpoint_dir"]) == []
    assert not [f for f in files_under("log") if f.endswith((".json", ".csv"))]


def test_missing_dataset_folder(two_markets):
    with pytest.raises(FileNotFoundError, match=r"Dataset folder \[.*nowhere\] does not exist"):
        _run(two_markets, dataset="nowhere")
    _assert_nothing_saved(two_markets)


def test_folder_without_market_files(two_markets, tmp_path):
    (tmp_path / "data" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no <market>\.inter file"):
        _run(two_markets, dataset="empty")


def test_market_named_in_config_but_absent(two_markets):
    with pytest.raises(ValueError, match=r"markets \['xx'\] named in the config have no file") as err:
        _run({**two_markets, "markets": ["in", "xx"]})
    assert "xx.inter" in str(err.value) and "['in', 'jp']" in str(err.value)
    _assert_nothing_saved(two_markets)


def test_market_empty_after_filtering(two_markets):
    with pytest.raises(ValueError, match=r"Market \[in\] .*in\.inter\) is empty after filtering"):
        _run({**two_markets, "user_inter_num_interval": "[1000,inf)"})
    _assert_nothing_saved(two_markets)


def test_malformed_inter_header(two_markets, tmp_path):
    path = tmp_path / "data" / "xm2" / "jp.inter"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["userId\titemId\trate\tdate"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"jp\.inter: malformed header column \[userId\]"):
        _run(two_markets)
    _assert_nothing_saved(two_markets)


def test_header_without_the_user_field(two_markets, tmp_path):
    path = tmp_path / "data" / "xm2" / "jp.inter"
    text = path.read_text().replace("user_id:token", "customer:token", 1)
    path.write_text(text)
    with pytest.raises(ValueError, match=r"jp\.inter: fields \['user_id'\] are missing"):
        _run(two_markets)


def test_time_field_not_loaded(two_markets):
    with pytest.raises(ValueError, match=r"order TO needs the time field"):
        _run({**two_markets, "load_col": {"inter": ["user_id", "item_id"]}})


def test_unknown_model_name(two_markets):
    with pytest.raises(ValueError, match=r"Unknown model \[SASrec\].*Did you mean \[SASRec\]"):
        _run(two_markets, model="SASrec")


def test_unknown_train_mode(two_markets):
    with pytest.raises(ValueError, match=r"train_mode \[joint\] must be one of"):
        _run({**two_markets, "train_mode": "joint"})


def test_a_setting_only_other_plugin_models_read_is_an_error(two_markets):
    with pytest.raises(ValueError, match=r"market_softmax is a setting of ANT, FeCoSR, FedAvgSASRec, "
                                         r"PretrainFinetune; model SASRec does not read it"):
        _run({**two_markets, "market_softmax": True})
    with pytest.raises(ValueError, match=r"s2ce is a setting of FeCoSR; model FedAvgSASRec"):
        _run({**two_markets, "s2ce": False}, model="FedAvgSASRec")
    _assert_nothing_saved(two_markets)


def test_a_finetune_pattern_that_matches_nothing_is_an_error(two_markets):
    """Checked when the first model is built, before any training or file."""
    with pytest.raises(ValueError, match=r'finetune_params: pattern "\*Item_Embedding\*" .* '
                                         r'did you mean "\*item_embedding\*"'):
        _run({**two_markets, "finetune_params": ["*Item_Embedding*"]}, model="PretrainFinetune")
    _assert_nothing_saved(two_markets)


@pytest.mark.parametrize("content", [b"epochs: 3\n", b"", "truncated"])
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(two_markets, tmp_path, content):
    """A text file, an empty file and a truncated checkpoint: one ValueError naming the file,
    from ``load_data_and_model`` and from a federated resume alike."""
    import torch

    from recbole_cmr import load_data_and_model
    from recbole_cmr.compat import load_checkpoint

    path = tmp_path / "model.pth"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    message = rf"\[{path}\] is not a recbole_cmr checkpoint or is damaged"
    with pytest.raises(ValueError, match=message) as raised:
        load_checkpoint(path)
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=message):
        load_data_and_model(str(path))
    with pytest.raises(ValueError, match=message):
        run_recbole_cmr(model="SASRec", dataset="xm2", saved=False, config_dict={
            **two_markets, "train_mode": "federated", "fed_rounds": 1, "fed_resume": str(path)})


def _xmrec_mini_with(tmp_path, market, row, value):
    """A copy of the shipped xmrec-mini whose ``<market>.inter`` holds ``value`` as the timestamp
    of its ``row``-th data row. Returns the settings and ``(path, line)`` of the bad value."""
    from conftest import FAST, SHIPPED

    root = tmp_path / "data"
    shutil.copytree(SHIPPED, root / "xmrec-mini")
    path = root / "xmrec-mini" / f"{market}.inter"
    lines = path.read_text().splitlines()
    fields = lines[row].split("\t")
    lines[row] = "\t".join([*fields[:-1], value])
    path.write_text("\n".join(lines) + "\n")
    settings = {**FAST, "data_path": str(root), "checkpoint_dir": str(tmp_path / "saved")}
    return settings, (path, row + 1)


def test_a_non_number_in_a_float_column_names_file_field_line_and_value(tmp_path):
    settings, (path, line) = _xmrec_mini_with(tmp_path, "jp", 7, "abc")
    with pytest.raises(ValueError) as raised:
        _run(settings, dataset="xmrec-mini")
    message = str(raised.value)
    assert f"{path}, line {line}, field [timestamp:float]: 'abc' is not a number" in message
    assert "fix or remove the row" in message and "\n" not in message
    _assert_nothing_saved(settings)


def test_a_non_number_on_the_command_line_is_one_line_with_exit_status_2(tmp_path, capsys):
    from recbole_cmr.__main__ import main

    settings, (path, line) = _xmrec_mini_with(tmp_path, "de", 12, "1e5x")
    with pytest.raises(SystemExit) as stopped:
        main(["--dataset=xmrec-mini", f"--data_path={settings['data_path']}", "--state=WARNING",
              f"--checkpoint_dir={settings['checkpoint_dir']}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("recbole_cmr: error: ")
    assert f"{path}, line {line}, field [timestamp:float]: '1e5x' is not a number" in err
    _assert_nothing_saved(settings)
    assert files_under("log") == []


@pytest.mark.parametrize("columns, separator", [
    ({"load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "vec"]}}, " "),
    ({"load_col": None, "unload_col": {"item": ["price"]}, "seq_separator": ","}, ","),
])
def test_a_non_number_in_a_float_seq_of_the_item_file_is_found_in_the_loaded_columns(
        two_markets, tmp_path, columns, separator):
    """The bad ``price`` (not loaded) is not the error; the bad ``vec`` further down is, split by
    ``seq_separator`` as RecBole splits it."""
    path = tmp_path / "data" / "xm2" / "xm2.item"
    items = sorted({line.split("\t")[1] for line in
                    (tmp_path / "data" / "xm2" / "in.inter").read_text().splitlines()[1:6]})
    rows = [[item, "1.5", separator.join(["0.1", "2"])] for item in items]
    rows[0][1] = "cheap"
    rows[2][2] = separator.join(["0.3", "x7", "1"])
    path.write_text("\n".join(["item_id:token\tprice:float\tvec:float_seq"]
                              + ["\t".join(row) for row in rows]) + "\n")
    with pytest.raises(ValueError) as raised:
        _run({**two_markets, **columns})
    message = str(raised.value)
    assert f"{path}, line 4, field [vec:float_seq]: 'x7' in " in message
    assert "cheap" not in message and "fix or remove the row" in message
