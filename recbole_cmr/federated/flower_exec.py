"""The SuperExec of the launcher's SuperNodes: Flower's own SuperExec loop with an executor that
forks every ClientApp process from this already loaded process.

Flower's SuperNode hands each message to a SuperExec, whose subprocess executor starts a fresh
``flwr-clientapp`` process; importing Flower costs that process about 1.7 CPU-s, on every message
of every node. The launcher (``recbole_cmr.flower``, ``--executor=fork``, the default) instead
starts each SuperNode with ``--isolation process`` and, beside it, this file:

    python recbole_cmr_exec.py --insecure --runtime-api-address 127.0.0.1:PORT --parent-pid PID

(``PID``: its SuperNode, with which it ends, as Flower's own SuperExec does). It runs Flower's ``run_superexec`` (task polling, launch results, shutdown with its SuperNode)
with :class:`ForkExecutor`: a ClientApp task is run by a forked child calling Flower's own
``run_clientapp`` with the task's token, exactly what ``flwr-clientapp`` runs, so the message
path is Flower's; the fork costs a few hundredths of a second. Other task types go to Flower's
subprocess executor. Needs ``os.fork`` (Linux, macOS); elsewhere the launcher uses Flower's
SuperExec (``--executor=subprocess``).

The launcher copies this file into the deployment's folder and runs it from there, so the
process imports only the standard library and Flower (not ``recbole_cmr``, not torch).
"""

import argparse
import os
import signal
import sys
import traceback

import flwr.app
import flwr.clientapp
from flwr.supercore.constant import TaskType
from flwr.supercore.exit import exit_handler
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import LaunchResult
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp

PRELOADED = (flwr.app, flwr.clientapp)  # what the ClientApp module imports, loaded before any fork


class ForkExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that a ClientApp task runs in a forked child."""

    def __init__(self):
        self.children = set()

    def launch(self, spec):
        """Fork a child that runs the ClientApp task ``spec`` (a Flower ``ExecutionSpec``)."""
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        pid = os.fork()
        if pid == 0:  # the child never returns into the SuperExec loop
            os._exit(run_task(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self):
        """Reap the children that ended (called by the SuperExec loop before every poll)."""
        for pid in list(self.children):
            try:
                ended, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                ended = pid
            if ended:
                self.children.discard(pid)


def run_task(spec):
    """In a forked child: run the ClientApp task as ``flwr-clientapp`` would; its exit status."""
    exit_handler.registered_exit_handlers.clear()  # the SuperExec's own, inherited by the fork
    for sig in exit_handler.SIGNAL_TO_EXIT_CODE:
        signal.signal(sig, signal.SIG_DFL)
    if spec.suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    status = 1
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid, runtime_dependency_install=spec.runtime_dependency_install)
        status = 0
    except SystemExit as done:  # run_clientapp ends with flwr_exit
        status = done.code if isinstance(done.code, int) else int(done.code is not None)
    except BaseException:  # noqa: B036  (reported, then the child ends like a failed process)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(description="Flower's SuperExec, forking ClientApp processes.")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API")
    parser.add_argument("--parent-pid", type=int, default=None, help="end when this process ends")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    args = parser.parse_args(argv)
    superexec.get_executor = lambda *_, **__: ForkExecutor()
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                            root_certificates_path=args.root_certificates, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
