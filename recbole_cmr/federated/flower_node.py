"""The ClientApp of recbole_cmr's Flower App: a thin forwarder to the node's worker process.

Flower starts a fresh ``flwr-clientapp`` process for every message. Building a market's client
(torch, RecBole, the market's data, the model) takes seconds, so a node keeps one **worker**
process per run (``python -m recbole_cmr.federated.node_worker``) that holds its client in memory
and answers every message; this module, which imports only the standard library and Flower, hands
each message's content to the worker over a local socket (``multiprocessing.connection``, with a
random key that only the node's files hold) and returns its reply. The first message of a run on a
node starts the worker; a worker that is gone (killed, crashed) is started again and continues from
the node's session file (``<checkpoint_dir>/flower-<run>.clients/<market>.pth``, written after
every message). A worker ends with the run (``close``), with its SuperNode, or after
``2 * node-timeout + 60`` idle seconds.

The launcher copies this file into the App folder as ``recbole_cmr_node.py`` so that a message's
process does not import the ``recbole_cmr`` package (and torch) just to forward it.
"""

import json
import os
import subprocess
import sys
import time
from multiprocessing.connection import Client

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

WORKER_START_S = 600  # how long a message waits for a new worker to build its market

app = ClientApp()


def node_files(run_config, node_config):
    """``(worker info file, worker log)`` of this node's worker for the run."""
    settings = json.loads(run_config["settings"])
    folder = os.path.join(settings["config_dict"].get("checkpoint_dir", "saved"),
                          f"flower-{settings['run']}.clients")
    market = str(node_config["market"])
    return os.path.join(folder, f"{market}.worker"), os.path.join(folder, f"{market}.worker.log")


def _alive(pid):
    """Whether process ``pid`` runs. A zombie (ended, not yet reaped by its parent: a SuperNode or
    SuperExec killed under the launcher) does not, so a worker ends with its node's processes."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:  # no /proc (macOS): signal 0
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def connect(info_file):
    """A connection to the running worker described by ``info_file``, or None."""
    try:
        with open(info_file) as f:
            info = json.load(f)
        if not _alive(info["pid"]):
            return None
        return Client(info["address"], family="AF_UNIX", authkey=bytes.fromhex(info["authkey"]))
    except (OSError, EOFError, ValueError, KeyError):
        return None


def start_worker(run_config, node_config, info_file, log_file):
    """Start this node's worker and return a connection once it serves (its build errors raise)."""
    os.makedirs(os.path.dirname(info_file), exist_ok=True)
    if os.path.exists(info_file):
        os.remove(info_file)
    timeout = float(run_config.get("node-timeout", 600))
    spec = {"run_config": dict(run_config), "node_config": {k: str(v) for k, v in node_config.items()},
            "info_file": info_file, "supernode_pid": os.getppid(), "idle_s": 2 * timeout + 60}
    with open(log_file, "a") as log:
        worker = subprocess.Popen([sys.executable, "-m", "recbole_cmr.federated.node_worker"],
                                  stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    worker.stdin.write(json.dumps(spec).encode())
    worker.stdin.close()
    deadline = time.time() + WORKER_START_S
    while time.time() < deadline:
        conn = connect(info_file) if os.path.exists(info_file) else None
        if conn is not None:
            return conn
        if worker.poll() is not None:
            with open(log_file) as f:
                lines = [line.strip() for line in f if line.strip()]
            raise RuntimeError(f"the worker of market [{node_config['market']}] stopped: "
                               f"{lines[-1] if lines else 'no output'} (log: {log_file})")
        time.sleep(0.1)
    raise TimeoutError(f"the worker of market [{node_config['market']}] did not start within "
                       f"{WORKER_START_S} s (log: {log_file}).")


def forward(message: Message, context: Context) -> Message:
    """The worker's reply to ``message`` (the worker's errors are raised, so Flower reports them)."""
    info_file, log_file = node_files(context.run_config, context.node_config)
    conn = connect(info_file) or start_worker(context.run_config, context.node_config, info_file, log_file)
    with conn:
        conn.send(message.content)
        status, payload = conn.recv()
    if status != "ok":
        raise RuntimeError(payload)
    return Message(payload, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    return forward(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return forward(message, context)


@app.query("call")
def query(message: Message, context: Context) -> Message:
    return forward(message, context)
