"""The command lines as a user meets them: one line per user error, results on stdout, no files
left by a failed run, no temporary folders left by the Flower launcher."""

import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from recbole_cmr import run_recbole_cmr
from conftest import files_under

RUN_FOLDERS = ("log", "saved", "log_tensorboard")


def _settings_file(settings, folder):
    """``settings`` (the ``two_markets`` fixture) as a yaml file for ``--config_files``, one epoch."""
    import yaml

    path = Path(folder) / "settings.yaml"
    path.write_text(yaml.safe_dump({**settings, "epochs": 1}))
    return path


def _written(folder):
    return [f for name in RUN_FOLDERS for f in files_under(Path(folder) / name)]


def test_a_bad_dataset_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    """``python -m recbole_cmr --dataset=nosuch``: exit 2, one line on stderr naming the folder
    (no config dump, no traceback), nothing on stdout, no log file; the traceback with --debug."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RECBOLE_CMR_DEBUG")}
    done = subprocess.run([sys.executable, "-m", "recbole_cmr", "--dataset=nosuch"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("recbole_cmr: error: "), done.stderr[-3000:]
    assert "nosuch" in lines[0] and done.stdout == ""
    assert _written(tmp_path) == [] and not list(tmp_path.iterdir())


def test_debug_shows_the_traceback_and_python_callers_get_the_exception(two_markets, capsys, monkeypatch):
    from recbole_cmr.__main__ import main

    argv = ["--dataset=nosuch", f"--data_path={two_markets['data_path']}"]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("recbole_cmr: error: ") and err.count("\n") == 1 and "nosuch" in err
    with pytest.raises(FileNotFoundError, match="nosuch"):
        main([*argv, "--debug"])
    monkeypatch.setenv("RECBOLE_CMR_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nosuch"):
        main(argv)
    with pytest.raises(FileNotFoundError, match="nosuch"):
        run_recbole_cmr(model="SASRec", dataset="nosuch", config_dict=two_markets)
    assert _written(".") == []


def test_a_key_error_is_its_message_without_quotes(capsys):
    from recbole_cmr.__main__ import run_command

    def bad_field(argv):
        raise KeyError("field [rating] is not in the data: drop it from load_col.")

    with pytest.raises(SystemExit):
        run_command("recbole_cmr", bad_field, [])
    assert capsys.readouterr().err == "recbole_cmr: error: field [rating] is not in the data: drop it from load_col.\n"


def test_hyper_tuning_reports_a_bad_setting_in_one_line(two_markets, tmp_path, capsys):
    from recbole_cmr.hyper_tuning import main

    params = tmp_path / "hyper.test"
    params.write_text("learning_rate choice [0.01]\n")
    with pytest.raises(SystemExit) as stopped:
        main(["--dataset=nosuch", f"--params_file={params}", f"--data_path={two_markets['data_path']}",
              "--output_dir=hyper"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("recbole_cmr.hyper_tuning: error: ") and err.count("\n") == 1 and "nosuch" in err


def test_the_results_table_is_on_stdout_even_with_warnings_only(two_markets, tmp_path, capsys):
    """``--state=WARNING --show_progress=False``: the table still comes, on stdout, without colour
    codes; the results files are written."""
    from recbole_cmr.__main__ import main

    settings = _settings_file(two_markets, tmp_path)
    result = main(["--model=SASRec", "--dataset=xm2", f"--config_files={settings}", "--state=WARNING",
                   "--show_progress=False"])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == ["market", "in", "jp", "macro"], out
    assert "\x1b[" not in out
    assert all(Path(path).is_file() for path in result["results_files"])


def test_relay_strips_colour_codes_when_not_a_terminal():
    from recbole_cmr.flower import relay

    stream = io.StringIO()
    relay(io.BytesIO(b"\x1b[92mINFO \x1b[0m: round 1\n\x1b[1;33mdone\x1b[0m\n"), stream)
    assert stream.getvalue() == "INFO : round 1\ndone\n"


@pytest.mark.parametrize("keep", [False, True])
def test_the_flower_launcher_leaves_no_temporary_folder_unless_asked(two_markets, tmp_path, monkeypatch,
                                                                      capsys, keep):
    """A run that stops after the vocabulary was written (here: a busy port) removes its folder;
    with --keep_work it keeps it and says where."""
    pytest.importorskip("flwr")
    from recbole_cmr import flower as launcher

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setattr(launcher, "free_port", lambda: busy.getsockname()[1])
        argv = ["--model=FedAvgSASRec", "--dataset=xm2", f"--config_files={_settings_file(two_markets, tmp_path)}",
                "--markets", "in", "jp", *(["--keep_work"] if keep else [])]
        with pytest.raises(OSError, match="is in use"):
            launcher.deploy(argv)
    left = list(temp.iterdir())
    if not keep:
        assert left == []
        return
    assert len(left) == 1 and left[0].name.startswith("recbole_cmr_flower_")
    assert (left[0] / "xm2.vocab").is_file()
    assert f"kept (--keep_work): {left[0]}" in capsys.readouterr().out
