"""One-machine Flower deployment of a federated run: a SuperLink, one SuperNode per market, the
App run with ``flwr run``, everything torn down at the end (success, error, Ctrl-C or ``kill``).

    python -m recbole_cmr.flower --model=FedAvgSASRec --dataset=xmrec-mini --markets de fr --rounds 3

Other ``--key=value`` settings are RecBole's / recbole_cmr's, as for ``run_recbole_cmr.py``. Each
SuperNode loads only its market's files; the markets' item ids come from the dataset's
``item_vocabulary`` file (written over the run's markets first when the dataset has none). The
ServerApp writes the same results files as ``run_recbole_cmr`` (log/, saved/ under the working
folder). The deployment's own folder (``/tmp/recbole_cmr_flower_*``: the processes' logs, the
App, a written vocabulary) is removed when the run ends, unless
``--keep_work`` is given (then its path is printed at the end). The run's streamed log goes to
stderr, without colour codes when stderr is not a terminal; the result JSON to stdout. Needs
``pip install ".[flower]"``. For separate machines see README ("Federation on Flower").
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
EXECUTORS = ("fork", "subprocess")  # how SuperNodes run ClientApps (``--executor``), the default first
KEEP_FLAG = "--keep_work"  # keep the deployment's folder (logs, App) after the run
ANSI_CODE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")  # colour and cursor codes
LAST_RUN = {}  # the last deploy()'s work folder, process ids, SuperNode (and SuperExec) pid per market
APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "recbole-cmr-federation"
version = "1.0.0"
description = "recbole_cmr federated run"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "recbole-cmr"

[tool.flwr.app.components]
serverapp = "recbole_cmr.federated.flower:server_app"
clientapp = "recbole_cmr_node:app"

[tool.flwr.app.config]
settings = '''{settings}'''
node-timeout = {timeout}
"""


def free_port():
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_port(port):
    """An error naming ``port`` when something already listens on it."""
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise OSError(f"port {port} on 127.0.0.1 is in use: choose another or stop what holds it.")


def run_settings(argv, workdir=None):
    """``(settings for the App, markets, data folder, launch options)`` from the command line
    (launch options: ``timeout``, ``executor``); a vocabulary the dataset lacks is written into
    ``workdir`` (default: a new temporary folder, the caller's to remove)."""
    from recbole_cmr.compat import checkpoint_safe
    from recbole_cmr.config import Config
    from recbole_cmr.data.dataset import resolve_markets
    from recbole_cmr.data.vocabulary import vocabulary_path, write_item_vocabulary

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--markets", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a node")
    parser.add_argument("--executor", choices=EXECUTORS, default=EXECUTORS[0] if hasattr(os, "fork") else "subprocess",
                        help="how a SuperNode runs a message's ClientApp: forked from one loaded process "
                             "per node (fork), or a fresh flwr-clientapp each (subprocess, Flower's SuperExec)")
    parser.add_argument("--config_files", default=None, help="yaml files, space separated")
    args, rest = parser.parse_known_args(argv)
    extra = {"train_mode": "federated", **({"markets": args.markets} if args.markets else {}),
             **({"fed_rounds": args.rounds} if args.rounds else {})}
    files = args.config_files.split() if args.config_files else None
    config = Config(model=args.model, dataset=args.dataset, config_file_list=files,
                    config_dict=extra, argv=rest)
    markets = resolve_markets(config)
    data_root = os.path.dirname(os.path.abspath(config["data_path"]))
    config_dict = {k: v for k, v in checkpoint_safe(config.external_config_dict).items()
                   if k not in ("model", "dataset")}
    config_dict["checkpoint_dir"] = os.path.abspath(config["checkpoint_dir"])
    if not config["item_vocabulary"]:
        folder = workdir or tempfile.mkdtemp(prefix="recbole_cmr_vocab_")
        path = os.path.join(folder, f"{args.dataset}.vocab")
        write_item_vocabulary(config, path)
        config_dict["item_vocabulary"] = path
    else:
        config_dict["item_vocabulary"] = os.path.abspath(vocabulary_path(config))
    settings = {"model": config["model"], "dataset": args.dataset, "markets": markets,
                "config_dict": config_dict, "run": time.strftime("%Y%m%d-%H%M%S")}
    return settings, markets, data_root, args


class Deployment:
    """The SuperLink, SuperNodes and ``flwr run`` processes of one local run (a context manager
    that stops every one of them on exit)."""

    def __init__(self, workdir, on_stop=None):
        self.workdir = Path(workdir)
        self.on_stop = on_stop  # called after every process stopped (the node workers)
        self.processes = []
        self.relays = []  # threads copying a process's output to stderr
        self.env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.workdir / "flwr-home"),
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}

    def start(self, name, command, log=True):
        """Start ``command``; its output goes to ``<workdir>/<name>.log``, or with ``log=False``
        to this process's stderr (``relay``)."""
        out = open(self.workdir / f"{name}.log", "w") if log else subprocess.PIPE
        proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        if not log:
            self.relays.append(threading.Thread(target=relay, args=(proc.stdout, sys.stderr), daemon=True))
            self.relays[-1].start()
        self.processes.append((name, proc))
        LAST_RUN.setdefault("pids", []).append(proc.pid)
        return proc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def stop(self):
        """Stop every process started and everything they started (the SuperLink's ServerApp,
        the SuperNodes' ClientApps, in sessions of their own): SIGTERM, SIGKILL after 10 s."""
        pids = set()
        for _, proc in self.processes:
            pids |= {proc.pid, *descendants(proc.pid)}
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 10
        for _, proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        while time.time() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for _, proc in self.processes:
            proc.wait()
        for thread in self.relays:
            thread.join(10)
        if self.on_stop:
            self.on_stop()


def relay(source, stream):
    """Copy the byte lines of ``source`` to the text ``stream`` until its end, without colour
    codes when ``stream`` is not a terminal."""
    plain = not (hasattr(stream, "isatty") and stream.isatty())
    for line in iter(source.readline, b""):
        stream.write((ANSI_CODE.sub(b"", line) if plain else line).decode("utf-8", "replace"))
        stream.flush()
    source.close()


def descendants(pid):
    """Process ids below ``pid`` (children, grandchildren, ...), read from /proc."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid):
    """Whether process ``pid`` runs (not a zombie): the node workers' own check."""
    from recbole_cmr.federated.flower_node import _alive as running

    return running(pid)


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_app(folder, settings, timeout):
    """The Flower App folder: ``pyproject.toml`` (recbole_cmr's ServerApp, the run's settings) and
    ``recbole_cmr_node.py`` (the ClientApp, :mod:`recbole_cmr.federated.flower_node`)."""
    from recbole_cmr.federated import flower_node

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_TOML.format(settings=json.dumps(settings), timeout=timeout))
    shutil.copyfile(flower_node.__file__, folder / "recbole_cmr_node.py")


def stop_workers(settings):
    """SIGKILL the node workers of the run that are still up (they also end with their SuperNode)."""
    folder = Path(settings["config_dict"]["checkpoint_dir"]) / f"flower-{settings['run']}.clients"
    for info in folder.glob("*.worker"):
        try:
            pid = json.loads(info.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            continue
        for _ in range(20):
            if not _alive(pid):
                break
            time.sleep(0.1)
        _signal(pid, signal.SIGKILL)


def deploy(argv=None):
    """Run one federated training on a local Flower deployment; returns the run's result dict.
    The deployment's folder is removed at the end, kept with ``--keep_work`` in ``argv``."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise SystemExit("Flower is not installed: pip install '.[flower]' (flwr==1.41.0).") from None
    argv = list(sys.argv[1:] if argv is None else argv)
    keep = KEEP_FLAG in argv
    work = Path(tempfile.mkdtemp(prefix="recbole_cmr_flower_"))
    try:
        return _deploy([a for a in argv if a != KEEP_FLAG], work, keep)
    finally:
        if keep:
            print(f"Flower deployment folder kept ({KEEP_FLAG}): {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _deploy(argv, work, keep):
    settings, markets, data_root, launch = run_settings(argv, work)
    result_file = work / "result.json"
    settings["result_file"] = str(result_file)
    link, nodes = free_port(), [free_port() for _ in markets]
    for port in (link, *nodes):
        check_port(port)
    (work / "flwr-home").mkdir()
    (work / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    write_app(work / "app", settings, launch.timeout)
    shutil.copyfile(Path(__file__).parent / "federated" / "flower_exec.py", work / "recbole_cmr_exec.py")
    LAST_RUN.update(workdir=str(work), ports=[link, *nodes], pids=[], nodes={}, execs={})
    print(f"Flower deployment in {work} (logs): SuperLink 127.0.0.1:{link}, SuperNodes "
          + ", ".join(f"{m} 127.0.0.1:{port}" for m, port in zip(markets, nodes)), flush=True)
    with Deployment(work, lambda: stop_workers(settings)) as deployment, _sigterm_interrupts():
        # the SuperLink keeps its state in memory (Flower's default; a database file costs it
        # about twice the CPU) and lives exactly as long as the run
        superlink = deployment.start("superlink", [
            "flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--port", str(link)])
        wait_listening(link, deployment, "superlink")
        for market, port in zip(markets, nodes):
            start_supernode(deployment, market, f"127.0.0.1:{link}", port, data_root, launch.executor)
        run = deployment.start("flwr-run", ["flwr", "run", str(work / "app"), "local", "--stream"], log=False)
        serverapp = ServerAppWatch(superlink.pid)
        while run.poll() is None and not result_file.exists() and not serverapp.ended():
            time.sleep(1)
        if not result_file.exists() and not serverapp.ended():
            run.wait()
            for _ in range(30):  # the ServerApp may still be writing
                if result_file.exists():
                    break
                time.sleep(1)
    if not result_file.exists():
        where = f"logs in {work}" if keep else f"rerun with {KEEP_FLAG} to keep the deployment's logs"
        raise RuntimeError(f"the Flower run ended without results; {where}")
    return json.loads(result_file.read_text())


class ServerAppWatch:
    """Whether the run's ServerApp process (a ``flwr-serverapp`` below the SuperLink) has come and
    gone. A ServerApp that crashed or was killed ends the run at once, instead of after the
    SuperLink's missed heartbeats (about a minute); where there is no ``/proc``, never."""

    def __init__(self, superlink_pid):
        self.superlink_pid, self.seen, self.gone = superlink_pid, False, False

    def ended(self):
        if not self.gone:
            try:
                running = any(_is_serverapp(pid) for pid in descendants(self.superlink_pid))
            except OSError:  # no /proc
                return False
            self.seen |= running
            self.gone = self.seen and not running
        return self.gone


def _is_serverapp(pid):
    try:
        return _alive(pid) and b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def start_supernode(deployment, market, link, port, data_root, executor):
    """Start the SuperNode of ``market`` (Runtime API on ``port``) and, with the ``fork``
    executor, its SuperExec (:mod:`recbole_cmr.federated.flower_exec`), which ends with the
    SuperNode as Flower's own does. Returns the SuperNode's process."""
    fork = executor == "fork"
    node = deployment.start(f"supernode-{market}", [
        "flower-supernode", "--insecure", "--superlink", link, "--port", str(port),
        *(["--isolation", "process"] if fork else []),
        "--node-config", f"market='{market}' data-path='{data_root}'"])
    LAST_RUN.setdefault("nodes", {})[market] = node.pid
    if fork:
        LAST_RUN.setdefault("execs", {})[market] = deployment.start(f"superexec-{market}", [
            sys.executable, str(deployment.workdir / "recbole_cmr_exec.py"), "--insecure",
            "--runtime-api-address", f"127.0.0.1:{port}", "--parent-pid", str(node.pid)]).pid
    return node


class _sigterm_interrupts:
    """Within the block a SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so the deployment is
    torn down instead of left running (main thread only; elsewhere it does nothing)."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def wait_listening(port, deployment, name, timeout=60):
    """Wait until something listens on ``port`` (the process ``name`` must stay alive)."""
    start = time.time()
    while time.time() - start < timeout:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if any(n == name and p.poll() is not None for n, p in deployment.processes):
            raise RuntimeError(f"{name} exited; see {deployment.workdir / (name + '.log')}")
        time.sleep(0.3)
    raise TimeoutError(f"{name} is not listening on port {port} after {timeout} s.")


def main(argv=None):
    """The command line; a bad input or a failed run ends with a one-line error (exit status 1)."""
    try:
        result = deploy(argv)
    except (ValueError, KeyError, OSError, TimeoutError, RuntimeError) as err:
        raise SystemExit(f"recbole_cmr.flower: error: {err}") from None
    except KeyboardInterrupt as stop:
        raise SystemExit(f"recbole_cmr.flower: stopped ({stop.args[0] if stop.args else 'SIGINT'}); "
                         "every process of the deployment was stopped.") from None
    print(json.dumps({"best_valid_result": result["best_valid_result"], "test_result": result["test_result"]},
                     indent=2))


if __name__ == "__main__":
    main()
