"""A SuperNode's worker for one run: ``python -m recbole_cmr.federated.node_worker`` (started by
the ClientApp, :mod:`recbole_cmr.federated.flower_node`, with its spec as JSON on stdin).

It builds the node's client once (:class:`recbole_cmr.federated.flower.NodeSession`), then answers
the messages the ClientApp processes hand it over a local socket, one at a time, until the run
closes it, its SuperNode is gone, or it has been idle for ``idle_s`` seconds.
"""

import json
import os
import secrets
import sys
import threading
import time
import traceback
from multiprocessing.connection import Listener

from recbole_cmr.federated.flower_node import _alive


def write_info(info_file, address, authkey):
    """Publish the worker's address and key (owner-only file, written atomically)."""
    tmp = f"{info_file}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"address": address, "authkey": authkey.hex(), "pid": os.getpid()}, f)
    os.replace(tmp, info_file)


def watch(supernode_pid, idle_s, last_use, listener):
    """End the process when the SuperNode is gone or nothing came for ``idle_s`` seconds."""
    while _alive(supernode_pid) and time.time() - last_use[0] < idle_s:
        time.sleep(0.5)
    listener.close()
    os._exit(0)


def serve(spec):
    from recbole_cmr.federated.flower import NodeSession

    session = NodeSession(spec["run_config"], spec["node_config"])
    authkey = secrets.token_bytes(32)
    listener = Listener(family="AF_UNIX", authkey=authkey)
    write_info(spec["info_file"], listener.address, authkey)
    last_use = [time.time()]
    threading.Thread(target=watch, args=(spec["supernode_pid"], spec["idle_s"], last_use, listener),
                     daemon=True).start()
    while not session.closed:
        try:
            conn = listener.accept()
        except OSError:  # a client that failed the key check
            continue
        with conn:
            try:
                reply = ("ok", session.handle(conn.recv()))
            except Exception as err:  # the ClientApp raises it, Flower reports it to the server
                traceback.print_exc()
                reply = ("error", f"{type(err).__name__}: {err}")
            conn.send(reply)
        last_use[0] = time.time()
    listener.close()
    if os.path.exists(spec["info_file"]):
        os.remove(spec["info_file"])


def main():
    spec = json.load(sys.stdin)
    try:
        serve(spec)
    except Exception as err:  # the starting ClientApp reports the last line of the log
        traceback.print_exc()
        print(f"{type(err).__name__}: {err}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
