"""Federation on Flower's deployment runtime (flwr 1.41, the ``flower`` extra): a local SuperLink
and one SuperNode per market give exactly the in-process numbers; nothing is left running."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import flwr  # noqa: F401  (CI installs ".[test,flower]": its absence must fail, not skip)
from recbole_cmr import run_recbole_cmr
from recbole_cmr import flower as launcher
from recbole_cmr.federated import flower

SMALL = ["--s2ce=False", "--adapter_rank=4", "--epochs=2", "--hidden_size=32", "--inner_size=64", "--n_layers=1", "--MAX_ITEM_LIST_LENGTH=10",
         "--train_batch_size=512", "--state=INFO", "--show_progress=False"]


def _settings(argv):
    """``{key: value}`` of ``--key=value`` strings (values as Python literals, as RecBole reads them)."""
    import ast

    out = {}
    for arg in argv:
        key, value = arg[2:].split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _command_lines():
    """Every running process's command line."""
    return [_cmdline(pid).replace(b"\0", b" ").decode() for pid in filter(str.isdigit, os.listdir("/proc"))]


def _running(pid):
    """Whether process ``pid`` runs (exists and is not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid):
    """Process ``pid``'s command line (``b""`` once it has ended: a forked ClientApp can end
    between listing and reading)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _round_checkpoint(folder):
    [path] = Path(folder).glob("FeCoSR-xmrec-mini-federated-*.pth")
    return torch.load(path, weights_only=True)


def _assert_same_results(remote, local, key):
    """Flower's ``remote`` run result equals the in-process ``local`` one: every market's valid and
    test metrics, and the per-round ``key`` of the federated history."""
    assert set(remote["per_market"]) == set(local["per_market"])
    for market, result in local["per_market"].items():
        for phase in ("valid", "test"):
            assert remote["per_market"][market][phase] == {k: float(v) for k, v in result[phase].items()}
    assert [r[key] for r in remote["federated_rounds"]["history"]] == \
        [r[key] for r in local["federated_rounds"]["history"]]


def test_the_serverapp_has_no_data_to_read():
    """Every Flower run in these tests runs its ServerApp with a data path that does not exist."""
    import json

    run_config = {"settings": json.dumps({"model": "FedAvgSASRec", "dataset": "xmrec-mini",
                                          "markets": ["de", "fr"], "config_dict": {"data_path": "dataset"},
                                          "run": "x"})}
    config, markets = flower.server_config(run_config)
    assert markets == ["de", "fr"] and not os.path.exists(config["data_path"])


def test_plain_data_crosses_the_wire_unchanged():
    update = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    control = {"w": torch.zeros(3, 2)}
    reply = (update, 17, {"loss": 1.5})
    back = flower.decode(flower.encode(reply))
    assert isinstance(back, tuple) and back[1:] == (17, {"loss": 1.5})
    assert all(torch.equal(back[0][k], v) for k, v in update.items())
    assert flower.decode(flower.encode(None)) is None
    assert flower.decode(flower.encode({})) == {}
    calls = {"calls": [("keep_local", (["w"],)), ("fit", (update, 0, {"mu": 0.1}, control))]}
    back = flower.decode(flower.encode(calls))  # tensors at any depth, tuples stay tuples
    assert [m for m, _ in back["calls"]] == ["keep_local", "fit"] and back["calls"][0] == ("keep_local", (["w"],))
    args = back["calls"][1][1]
    assert isinstance(args, tuple) and args[1:3] == (0, {"mu": 0.1}) and torch.equal(args[3]["w"], control["w"])
    assert all(torch.equal(args[0][k], v) for k, v in update.items())


def test_a_node_of_an_unknown_market_and_a_busy_port_are_clear_errors(tmp_path):
    import json

    run_config = {"settings": json.dumps({"model": "FedAvgSASRec", "dataset": "xmrec-mini",
                                          "markets": ["de", "fr"], "config_dict": {}, "run": "x"})}
    with pytest.raises(ValueError, match=r"serves market \[uk\], which is not one of the run's markets"):
        flower.node_client(run_config, {"market": "uk", "data-path": str(tmp_path)})
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=rf"port {port} on 127.0.0.1 is in use"):
            launcher.check_port(port)


def test_nodes_with_different_vocabularies_are_refused(monkeypatch):
    class Grid:
        def get_node_ids(self):
            return [1, 2]

    replies = {1: {"market": "de", "vocabulary": "aaa"}, 2: {"market": "fr", "vocabulary": "bbb"}}
    monkeypatch.setattr(flower, "describe_nodes", lambda grid, nodes, timeout: replies)
    with pytest.raises(ValueError, match=r"item vocabularies differ .*'de': 'aaa'"):
        flower.wait_for_nodes(Grid(), ["de", "fr"], timeout=5)
    replies[2] = {"market": "de", "vocabulary": "aaa"}
    with pytest.raises(ValueError, match=r"serve markets \['de', 'de'\]; this run expects one node for each"):
        flower.wait_for_nodes(Grid(), ["de", "fr"], timeout=5)


class FakeGrid:
    """A SuperLink stand-in: nodes answer ``(market, method, args)``; ``lost`` nodes get the
    SuperLink's NODE_UNAVAILABLE error; ``arrive`` nodes connect once a market was lost."""

    def __init__(self, markets, lost=(), arrive=None):
        self.markets, self.lost, self.arrive = dict(markets), set(lost), dict(arrive or {})
        self.sent, self.outbox = [], []

    def get_node_ids(self):
        return list(self.markets)

    def push_messages(self, messages):
        from flwr.app import Error, Message

        ids = []
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            node = message.metadata.dst_node_id
            [(method, _)] = flower.decode(message.content)["calls"]
            self.sent.append((self.markets[node], method))
            if node in self.lost:
                reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=message)
                self.markets.update(self.arrive)  # the restarted node registers
            elif method == "describe":
                reply = Message(flower.encode([{"market": self.markets[node], "vocabulary": "v"}]),
                                reply_to=message)
            else:
                reply = Message(flower.encode([[self.markets[node], node]]), reply_to=message)
            self.outbox.append(reply)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        out, self.outbox = [r for r in self.outbox if r.metadata.reply_to_message_id in ids], []
        return out


@pytest.fixture
def task_identity(monkeypatch):
    """The ServerApp process's identity, which Flower's ``Message`` reads."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _flower_server(grid, nodes, min_clients=0):
    server = object.__new__(flower._flower_server_class())
    server.grid, server.nodes, server.timeout, server.vocabulary = grid, dict(nodes), 30, "v"
    server.wire, server.min_clients, server._posted = {}, min_clients, {}
    import logging

    server.logger = logging.getLogger("test")
    return server


def test_a_lost_node_is_dropped_from_the_round_when_fed_min_clients_allows(caplog, task_identity):
    grid = FakeGrid({1: "de", 2: "fr"}, lost={2})
    server = _flower_server(grid, {"de": 1, "fr": 2}, min_clients=1)
    with caplog.at_level("WARNING"):
        replies = server.call_each("fit", {"de": (), "fr": ()})
    assert replies == {"de": ["de", 1]}
    assert "markets ['fr'] did not reply" in caplog.text and "fed_min_clients=1" in caplog.text


def test_a_lost_node_is_waited_for_and_its_restarted_node_takes_over(caplog, task_identity):
    grid = FakeGrid({1: "de", 2: "fr"}, lost={2}, arrive={3: "fr"})
    server = _flower_server(grid, {"de": 1, "fr": 2})  # fed_min_clients 0: every market
    with caplog.at_level("INFO"):
        replies = server.call_each("evaluate", {"de": (), "fr": ()})
    assert replies == {"de": ["de", 1], "fr": ["fr", 3]}  # answered by the new node
    assert server.nodes == {"de": 1, "fr": 3}
    assert "waiting up to" in caplog.text and "SuperNodes of markets ['fr']" in caplog.text
    assert "market [fr] is back on node 3" in caplog.text
    assert grid.sent[-1] == ("fr", "evaluate")  # resent to it


def test_a_returning_node_of_another_vocabulary_is_refused(task_identity):
    grid = FakeGrid({1: "de", 2: "fr"}, lost={2}, arrive={3: "fr"})
    server = _flower_server(grid, {"de": 1, "fr": 2})
    server.vocabulary = "other"
    with pytest.raises(ValueError, match="item vocabularies differ"):
        server.call_each("evaluate", {"de": (), "fr": ()})


def test_without_flower_the_launcher_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    with pytest.raises(SystemExit, match=r"pip install '\.\[flower\]'"):
        launcher.deploy(["--model=FedAvgSASRec", "--dataset=xmrec-mini"])


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_kill_inside_a_deployment_stops_its_processes_with_a_one_line_message(stop, tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) and ``kill`` (SIGTERM, turned into the same KeyboardInterrupt) during a
    deployment: every process it started is stopped, then its node workers, its folder is
    removed, and the launcher ends with one line naming the signal. (A real deployment stopped
    by a signal: the next test.)"""
    import signal

    started, stopped = [], []

    def deploy_until_signalled(argv, work, keep):
        with launcher.Deployment(work, lambda: stopped.append("node workers")) as deployment, \
                launcher._sigterm_interrupts():
            started.append((work, deployment.start("sleeper", ["sleep", "120"])))
            os.kill(os.getpid(), getattr(signal, stop))
            time.sleep(60)  # the signal interrupts this
        pytest.fail(f"{stop} did not interrupt the deployment")

    monkeypatch.setattr(launcher, "_deploy", deploy_until_signalled)
    terminal = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(SystemExit, match=rf"^recbole_cmr.flower: stopped \({stop}\); every process"):
            launcher.main(["--model=FedAvgSASRec", "--dataset=xmrec-mini"])
    finally:
        signal.signal(signal.SIGINT, terminal)
    [(work, sleeper)] = started
    assert sleeper.returncode == -signal.SIGTERM and not _running(sleeper.pid)  # stopped and reaped
    assert stopped == ["node workers"] and not work.exists()


@pytest.mark.deployment(cost=1)
def test_kill_stops_every_process_of_a_real_deployment(tmp_path):
    """Flower's own SuperExec (``--executor=subprocess``: a fresh ``flwr-clientapp`` per message,
    the path of SuperNodes that organisations run themselves) delivers the first message (the
    node's worker serves); then ``kill`` (SIGTERM) to the launcher stops every process of the
    deployment, the node's worker (in a session of its own) included. The forked ClientApps of
    the default executor: the killed-ServerApp test below leaves nothing running either."""
    import json
    import signal
    import subprocess

    stop, executor = "SIGTERM", "subprocess"
    launch = subprocess.Popen(
        [sys.executable, "-m", "recbole_cmr.flower", "--model=FedAvgSASRec", "--dataset=xmrec-mini",
         "--markets", "de", "--rounds", "50", f"--executor={executor}", *SMALL[3:], f"--checkpoint_dir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    first = launch.stdout.readline()
    while not first.startswith("Flower deployment in "):
        first = launch.stdout.readline()
        assert first, "the launcher ended before starting the deployment"
    workdir = first.split()[3]
    link = first.split("SuperLink ")[1].split(",")[0]
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("flower-*.clients/de.worker")):
        time.sleep(0.5)  # the run under way: the node's worker serves
    [info] = tmp_path.glob("flower-*.clients/de.worker")
    worker = json.loads(info.read_text())["pid"]
    assert _running(worker)
    assert any(link in c for c in _command_lines())
    launch.send_signal(getattr(signal, stop))
    try:  # the deployment stops within ~15 s; a loaded CI machine gets a wide margin
        output, _ = launch.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        launch.kill()
        left = [c for c in _command_lines() if workdir in c or link in c or "recbole_cmr" in c]
        pytest.fail(f"the launcher did not end 240 s after {stop}; still running: {left}")
    assert launch.returncode != 0
    assert f"recbole_cmr.flower: stopped ({stop})" in output.splitlines()[-1]
    assert not [c for c in _command_lines() if workdir in c or link in c]
    assert not _running(worker)  # the node's worker, in a session of its own


def test_a_node_process_that_ended_unreaped_counts_as_gone():
    """A killed SuperNode or SuperExec stays a zombie until its parent (the launcher) reaps it:
    the node's worker must take it for gone (it ends with them) and must not serve a new node."""
    import subprocess

    from recbole_cmr.federated.flower_node import _alive

    ended, running = subprocess.Popen(["true"]), subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.time() + 30
        while time.time() < deadline and Path(f"/proc/{ended.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.05)  # ended, not reaped: a zombie
        assert not _alive(ended.pid) and _alive(running.pid) and _alive(os.getpid())
    finally:
        running.kill()
        running.wait()
        ended.wait()
    assert not _alive(ended.pid) and not _alive(running.pid)


def test_the_fork_executor_runs_each_clientapp_task_in_a_clean_child_and_reaps_it(monkeypatch, tmp_path):
    """recbole_cmr's SuperExec forks a child per ClientApp task that runs Flower's run_clientapp
    with the task's address and token, without the SuperExec's exit and signal handlers (a
    handler of the parent must not run in the child); ended children are reaped."""
    import json
    import signal

    from flwr.supercore.constant import TaskType
    from flwr.supercore.exit import ExitCode, exit_handler, flwr_exit
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus
    from recbole_cmr.federated import flower_exec

    def run_clientapp(**task):
        (tmp_path / f"{task['token']}.json").write_text(json.dumps({
            "pid": os.getpid(), "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            **{k: task[k] for k in ("runtime_api_address", "insecure", "parent_pid")}}))
        flwr_exit(ExitCode.SUCCESS)  # as run_clientapp ends: runs the registered exit handlers

    monkeypatch.setattr(flower_exec, "run_clientapp", run_clientapp)
    monkeypatch.setattr(exit_handler, "registered_exit_handlers", [])
    exit_handler.add_exit_handler(lambda: (tmp_path / "parent-handler-ran").touch())
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # the SuperExec's graceful handler
    try:
        executor = flower_exec.ForkExecutor()
        specs = [ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token=token,
                               insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                               parent_pid=os.getpid(), suppress_output=False, task_id=i + 1)
                 for i, token in enumerate(["a1", "b2"])]
        assert all(executor.launch(spec).status == LaunchResultStatus.ACCEPTED for spec in specs)
        children = set(executor.children)
        assert len(children) == 2 and os.getpid() not in children
        deadline = time.time() + 60
        while executor.children and time.time() < deadline:
            executor.reconcile()
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not executor.children and not any(_running(pid) for pid in children)  # reaped, no zombie
    for spec in specs:
        task = json.loads((tmp_path / f"{spec.token}.json").read_text())
        assert task["pid"] in children and task["sigterm_default"]
        assert (task["runtime_api_address"], task["insecure"], task["parent_pid"]) == ("127.0.0.1:9094", True, os.getpid())
    assert not (tmp_path / "parent-handler-ran").exists()
    assert len(exit_handler.registered_exit_handlers) == 1  # the parent's list is untouched


def test_bad_input_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit, match=r"^recbole_cmr.flower: error: markets \['xx'\] named in the config have no file"):
        launcher.main(["--model=FeCoSR", "--dataset=xmrec-mini", "--markets", "de", "xx"])


def _restart_like(*pids):
    """Kill the processes ``pids`` (a SuperNode, then its SuperExec if it has its own) and start
    their command lines again (same environment and folder), the SuperExec tied to the new
    SuperNode (``--parent-pid``): an operator restarting a node. Returns the new processes."""
    import signal
    import subprocess

    def command_of(pid):
        proc = Path(f"/proc/{pid}")
        env = dict(line.split(b"=", 1) for line in proc.joinpath("environ").read_bytes().split(b"\0") if b"=" in line)
        return proc.joinpath("cmdline").read_bytes().rstrip(b"\0").split(b"\0"), env, os.readlink(proc / "cwd")

    commands = [command_of(pid) for pid in pids]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    started = []
    for command, env, cwd in commands:
        if started and b"--parent-pid" in command:
            command[command.index(b"--parent-pid") + 1] = str(started[0].pid).encode()
        started.append(subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True))
    return started


POISON = """

_forward = forward


def forward(message, context):  # test: market fr sends NaN parameters in round 0
    import json

    import numpy as np
    from flwr.app import Array, ArrayRecord

    reply = _forward(message, context)
    calls = json.loads(message.content["plain"]["json"])["calls"]
    fit = [i for i, call in enumerate(calls) if call["__tuple__"][0] == "fit"]
    if (context.node_config["market"] == "fr" and fit
            and calls[fit[0]]["__tuple__"][1]["__tuple__"][1] == 0):  # fit(params, round 0, ...)
        replies = json.loads(reply.content["plain"]["json"])
        key = replies[fit[0]]["__tuple__"][0]["__tensors__"]  # (update, count, metrics)
        update = reply.content[key]
        reply.content[key] = ArrayRecord({k: Array(np.full_like(v.numpy(), np.nan)) for k, v in update.items()})
    return reply
"""


@pytest.mark.deployment(cost=3)
def test_nan_and_killed_supernodes_are_left_out_of_their_round(tmp_path, monkeypatch):
    """Round 0: `fr` sends NaN parameters, which the server leaves out of the aggregate (as
    in-process). Then `fr`'s SuperNode is killed and restarted (with its SuperExec, which ends
    with it, and so does its worker): with fed_min_clients=1 round 1 aggregates `de` alone;
    validation waits for `fr`, whose new node (a new node id) starts a new worker that takes over
    from fr's session file."""
    import json
    import signal
    import threading
    import time

    write_app = launcher.write_app

    def poisoned_app(folder, settings, timeout):
        write_app(folder, settings, timeout)
        with open(folder / "recbole_cmr_node.py", "a") as f:
            f.write(POISON)

    monkeypatch.setattr(launcher, "write_app", poisoned_app)
    out = {}

    def run():
        try:
            out["run"] = launcher.deploy([
                "--model=FedAvgSASRec", "--dataset=xmrec-mini", "--markets", "de", "fr", "--rounds", "3",
                "--fed_min_clients=1", *SMALL[3:], f"--checkpoint_dir={tmp_path}"])
        except Exception as err:  # reported by the assertion below
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("FedAvgSASRec-xmrec-mini-federated-*.pth")):
        time.sleep(0.5)  # round 0 closed
    assert thread.is_alive(), out
    [info] = tmp_path.glob("flower-*.clients/fr.worker")
    workers = {json.loads(info.read_text())["pid"]}  # fr's worker, which ends with its node
    restarted = _restart_like(launcher.LAST_RUN["nodes"]["fr"], launcher.LAST_RUN["execs"]["fr"])
    try:
        deadline = time.time() + 900
        while thread.is_alive() and time.time() < deadline:
            try:
                workers.add(json.loads(info.read_text())["pid"])
            except (OSError, ValueError):
                pass
            thread.join(0.5)
    finally:
        for process in restarted:
            for pid in (process.pid, *launcher.descendants(process.pid)):
                launcher._signal(pid, signal.SIGKILL)
            process.wait()
    assert "error" not in out, out.get("error")
    history = out["run"]["federated_rounds"]["history"]
    assert [r["round"] for r in history] == [0, 1, 2]
    assert [r.get("dropped") for r in history] == [None, ["fr"], None]
    [log] = list((tmp_path / "log" / "FedAvgSASRec").glob("*.log"))  # the ServerApp's
    text = log.read_text()
    assert "Round 0: the update of market [fr] holds NaN/Inf values" in text
    assert "fit: markets ['fr'] did not reply" in text and "is back on node" in text
    assert len(workers) == 2  # the new node's own worker, from fr's session file
    assert set(out["run"]["per_market"]) == {"de", "fr"}
    assert all(out["run"]["per_market"][m]["test"]["ndcg@10"] >= 0 for m in ("de", "fr"))


def _left_running(run):
    """Command lines still running that belong to the deployment ``run`` (a ``LAST_RUN``)."""
    ports = [f"127.0.0.1:{p}" for p in run["ports"]]
    alive = [pid for pid in run["pids"] if _running(pid)]
    return alive + [c for c in _command_lines() if run["workdir"] in c or any(p in c for p in ports)]


@pytest.mark.deployment(cost=4)
def test_a_killed_serverapp_resumes_to_the_in_process_numbers_and_leaves_nothing_running(tmp_path):
    """FeCoSR on two SuperNodes: federated rounds (adapters local), then each SuperNode's own
    fine-tuning, with ``--resume_dir``. The ServerApp is killed once round 0 closed; the same
    command again continues from the round checkpoint the folder names and gives exactly the
    uninterrupted in-process numbers, every market trained from its own seed, round by round,
    and neither deployment leaves a process behind."""
    import signal
    import threading
    import time

    argv = ["--model=FeCoSR", "--dataset=xmrec-mini", "--markets", "de", "fr", "--rounds", "2",
            *SMALL, f"--checkpoint_dir={tmp_path / 'flower'}", f"--resume_dir={tmp_path / 'resume'}"]
    out = {}

    def run():
        try:
            out["run"] = launcher.deploy(argv)
        except RuntimeError as err:
            out["error"] = str(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "flower").glob("FeCoSR-*-federated-*.pth")):
        time.sleep(0.2)  # round 0 closed: its checkpoint is written
    pids = {p for pid in launcher.LAST_RUN["pids"] for p in (pid, *launcher.descendants(pid))}
    serverapps = [p for p in pids if b"flwr-serverapp" in _cmdline(p)]
    assert serverapps, "no ServerApp process found"
    for pid in serverapps:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    thread.join(timeout=600)
    assert "the Flower run ended without results" in out.get("error", ""), out
    assert time.time() - killed_at < 45  # seen at once, not after the SuperLink's missed heartbeats (60 s)
    killed = dict(launcher.LAST_RUN)
    assert not _left_running(killed)
    [checkpoint] = (tmp_path / "flower").glob("FeCoSR-*-federated-*.pth")
    assert json.loads((tmp_path / "resume" / "federated.json").read_text())["checkpoint"] == str(checkpoint)
    resumed = launcher.deploy(argv)
    in_process = run_recbole_cmr(model="FeCoSR", dataset="xmrec-mini", config_dict={
        **_settings(SMALL), "markets": ["de", "fr"], "fed_rounds": 2,
        "checkpoint_dir": str(tmp_path / "in-process")})
    for market in ("de", "fr"):  # the fine-tuned and the federated stage's results
        remote, local = resumed["per_market"][market], in_process["per_market"][market]
        for stage_remote, stage_local in ((remote, local), (remote["federated"], local["federated"])):
            for phase in ("valid", "test"):
                assert stage_remote[phase] == {k: float(v) for k, v in stage_local[phase].items()}
        assert Path(remote["checkpoint"]).exists()  # the node's own fine-tuned model
    rounds = [(r["valid_score"], r["train_loss"]) for r in resumed["federated_rounds"]["history"]]
    assert rounds == [(r["valid_score"], r["train_loss"]) for r in in_process["federated_rounds"]["history"]]
    assert len(rounds) == 2
    remote = torch.load(checkpoint, weights_only=True)
    local = _round_checkpoint(tmp_path / "in-process")
    assert remote["round"] == local["round"] == 1
    assert all(torch.equal(remote["global"][n], t) for n, t in local["global"].items())
    # each node kept its own state in its own folder; the server file holds parameters only
    assert "clients" not in remote and list((tmp_path / "flower").glob("*.clients/de.pth"))
    assert not _left_running(launcher.LAST_RUN)


SCENARIO_PAIR = ["under25", "45plus"]  # two of the four scenarios: a node each


def test_pf_msmtrec_through_the_flower_app_gives_the_in_process_numbers(scenarios, tmp_path, task_identity):
    """Two scenarios share users, items and features through the vocabulary file the launcher
    writes: the personalized federation, through the Flower App's whole message path (Flower's
    wire format included), gives exactly the in-process numbers. (The same path between real
    SuperLink and SuperNode processes: the FeCoSR and FedAvgSASRec deployments above.)"""
    settings = {**scenarios, "fed_rounds": 2, "state": "INFO"}
    argv = [f"--{k}={v}" for k, v in settings.items()
            if k not in ("checkpoint_dir", "load_col", "eval_args")] + ["--markets", *SCENARIO_PAIR]
    argv += ["--config_files", str(_yaml(tmp_path, {k: scenarios[k] for k in ("load_col", "eval_args")}))]
    remote, _ = _run_on_loopback(["--model=PFMSMTrec", "--dataset=mlsc", *argv,
                                  f"--checkpoint_dir={tmp_path / 'flower'}"], tmp_path)
    local = run_recbole_cmr(model="PFMSMTrec", dataset="mlsc", config_dict={
        **settings, "markets": SCENARIO_PAIR, "checkpoint_dir": str(tmp_path / "in-process")})
    assert sorted(local["per_market"]) == sorted(SCENARIO_PAIR) == sorted(remote["per_market"])
    _assert_same_results(remote, local, "bytes_up")  # bytes_up: the same parameters shared


def _yaml(folder, values):
    import yaml

    path = folder / "settings.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def over_the_wire(content):
    """``content`` (a RecordDict) as its receiver gets it: deflated into Flower's objects (what the
    SuperLink and SuperNodes store and send) and inflated again."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = get_all_nested_objects(content)
    return inflate_object_from_contents(content.object_id, {i: o.deflate() for i, o in objects.items()})


class LoopbackGrid(FakeGrid):
    """A SuperLink whose nodes are :class:`flower.NodeSession` objects in this process: the
    Flower App's whole message path (codec, Flower's wire format both ways, server, node
    sessions) without processes."""

    def __init__(self, run_config, markets, data_path):
        super().__init__({i + 1: m for i, m in enumerate(markets)})
        self.sessions = {i + 1: flower.NodeSession(run_config, {"market": m, "data-path": data_path})
                         for i, m in enumerate(markets)}

    def push_messages(self, messages):
        from flwr.app import Message

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(message.metadata.message_id)
            reply = self.sessions[message.metadata.dst_node_id].handle(over_the_wire(message.content))
            self.outbox.append(Message(over_the_wire(reply), reply_to=message))
            ids.append(message.metadata.message_id)
        return ids


def _run_on_loopback(argv, tmp_path):
    """``(result dict, grid)`` of the Flower App's run of the launcher command line ``argv`` on a
    :class:`LoopbackGrid` (the launcher's settings, vocabulary file included)."""
    import json
    from types import SimpleNamespace

    settings, markets, data_root, _ = launcher.run_settings(argv, tmp_path)
    settings["result_file"] = str(tmp_path / "result.json")
    run_config = {"settings": json.dumps(settings), "node-timeout": 60}
    grid = LoopbackGrid(run_config, markets, data_root)
    flower.server_main(grid, SimpleNamespace(run_config=run_config))
    return json.loads((tmp_path / "result.json").read_text()), grid


@pytest.mark.parametrize("strategy, extra", [
    ("fedavg", []), ("fedavg_rows", ["--market_softmax=True"]), ("fedavgm", ["--server_momentum=0.9"]),
    ("fedadam", []), ("fedyogi", []), ("fedadagrad", []), ("fedprox", ["--proximal_mu=0.1"]),
    ("fednova", ["--fed_local_steps=3"]), ("scaffold", [])])
def test_every_strategy_runs_through_the_flower_app_with_the_in_process_numbers(strategy, extra, tmp_path,
                                                                                 task_identity):
    argv = ["--model=FedAvgSASRec", "--dataset=xmrec-mini", "--markets", "de", "fr", "--rounds", "2",
            f"--fed_strategy={strategy}", *extra, *SMALL[3:], f"--checkpoint_dir={tmp_path / 'app'}"]
    remote, grid = _run_on_loopback(argv, tmp_path)
    # per node: describe, parameters with shapes, 2 rounds of fit and validation (which closes
    # the round; the best round's mark waits for the next message), and one last message
    # (restore the best round, test, export, close)
    assert len(grid.sent) == len(grid.sessions) * (2 + 2 * 2 + 1)
    local = run_recbole_cmr(model="FedAvgSASRec", dataset="xmrec-mini", config_dict={
        **_settings(SMALL[3:] + extra), "markets": ["de", "fr"], "fed_rounds": 2, "fed_strategy": strategy,
        "checkpoint_dir": str(tmp_path / "in-process")})
    _assert_same_results(remote, local, "train_loss")
    for market, result in local["per_market"].items():  # each test user's values crossed the wire
        assert remote["per_market"][market]["per_user"] == result["per_user"] and result["per_user"]["user"]
