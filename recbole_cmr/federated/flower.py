"""Federated training on Flower's deployment runtime (``pip install ".[flower]"``, flwr 1.41).

A Flower App around the package's own objects, with no second copy of the round logic:

* the **ServerApp** runs :class:`~recbole_cmr.federated.server.FederatedServer` itself; only its
  ``deliver`` (every server -> client call) is replaced by Flower messages to the SuperNodes
  (:class:`FlowerServer`): one message per node carries all the calls the server makes of it at
  that point (e.g. the test evaluation, the export, the fine-tuning and ``close`` at the end), and
  calls without a reply the server needs wait for the node's next message. It loads no interaction file: it holds parameters, counts and metrics.
* the **ClientApp** (:mod:`recbole_cmr.federated.flower_node`, copied into the App folder) hands
  each message to the node's worker process, which keeps a :class:`NodeSession`: a
  :class:`~recbole_cmr.federated.client.Client` of the node's own market, built once from that
  market's files only (node config ``market``, ``data-path``) with the dataset's shared item
  vocabulary (``item_vocabulary``). After every message the client's state (optimizer, local
  parameters, loader RNG, best round) is written to
  ``<checkpoint_dir>/flower-<run id>.clients/<market>.pth`` on the node, so a restarted node
  continues where it stopped.

Messages: each carries a list of calls (``(method, args)``, made in order) and its reply the list
of their replies; its type is ``train`` when it holds ``Client.fit``, ``evaluate`` when it holds
``Client.evaluate``, else ``query.call`` (e.g. ``end_round``, or ``export``, ``finetune`` and
``close``). Arguments and replies are JSON (``ConfigRecord``) with named tensors (``ArrayRecord``)
at any depth.

Run it with ``python -m recbole_cmr.flower`` (one machine) or by hand (README).
"""

import json
import os
import time
from logging import getLogger

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.serverapp import Grid, ServerApp
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError("Flower is not installed: pip install '.[flower]' (flwr==1.41.0).") from err

import numpy as np
import torch

TENSORS = "__tensors__"
TUPLE = "__tuple__"


# ---- codec: plain data <-> RecordDict --------------------------------------------------------
def _scalar(value):
    """A numpy scalar or one-element tensor as a Python number; anything else unchanged."""
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _jsonable(value):
    """``value`` (results: dicts, lists and scalars) as JSON-able data."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return _scalar(value)


def _is_tensors(value):
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _pack(value, records):
    """``value`` as JSON-able data: each ``{name: tensor}`` dict inside it (at any depth) goes to
    ``records`` as an ``ArrayRecord`` and is replaced by ``{TENSORS: key}``; a tuple becomes
    ``{TUPLE: [...]}`` so that it comes back a tuple."""
    if _is_tensors(value):
        key = f"a{len(records)}"
        records[key] = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in value.items()})
        return {TENSORS: key}
    if isinstance(value, tuple):
        return {TUPLE: [_pack(v, records) for v in value]}
    if isinstance(value, list):
        return [_pack(v, records) for v in value]
    if isinstance(value, dict):
        return {str(k): _pack(v, records) for k, v in value.items()}
    return _scalar(value)


def _unpack(value, content):
    """The inverse of :func:`_pack` (tensors read from the ``RecordDict`` ``content``)."""
    if isinstance(value, dict):
        if TENSORS in value:
            return content[value[TENSORS]].to_torch_state_dict()
        if TUPLE in value:
            return tuple(_unpack(v, content) for v in value[TUPLE])
        return {k: _unpack(v, content) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, content) for v in value]
    return value


def encode(value):
    """A ``RecordDict`` of ``value``: plain data (JSON-able, with tuples) holding named-tensor
    dicts at any depth, each sent as an ``ArrayRecord``."""
    records = {}
    plain = _pack(value, records)
    records["plain"] = ConfigRecord({"json": json.dumps(plain)})
    return RecordDict(records)


def decode(content):
    """The value of an :func:`encode` ``RecordDict``."""
    return _unpack(json.loads(content["plain"]["json"]), content)


MESSAGE_TYPES = {"fit": "train", "evaluate": "evaluate"}


# ---- the server side -------------------------------------------------------------------------
class RemoteClient:
    """Stands for a market's client on a SuperNode: the server knows its name and node only."""

    def __init__(self, client_id, node_id):
        self.client_id, self.node_id = client_id, node_id


def content_bytes(content):
    """Bytes of a message's records (tensors and JSON; Flower adds a small framing)."""
    return sum(record.count_bytes() for record in content.values())


# Error codes of a reply the SuperLink writes for a node it lost (no heartbeat, message gone):
# the node may come back; any other error is the ClientApp's own and is raised.
LOST_NODE_CODES = (3, 4, 5)  # flwr ErrorCode MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE
POLL_S = 0.2  # reply polling interval (Flower's send_and_receive polls every 3 s)


def message_type(calls):
    """Flower's message type of a list of calls: ``train`` with a ``fit``, ``evaluate`` with an
    ``evaluate``, else ``query.call``."""
    methods = {method for method, _ in calls}
    return next((kind for method, kind in MESSAGE_TYPES.items() if method in methods), "query.call")


def call_nodes(grid, nodes, batches, timeout=None, wire=None):
    """``({market: [reply, ...]}, {market: why lost})`` of the calls ``batches[market]`` (a list of
    ``(method, args)``, made in order by ``Client.<method>(*args)``) on each market's node
    (``nodes``: ``{market: node id}``): one message per market, all sent at once. A market whose
    node the SuperLink reports unavailable, or that does not reply within ``timeout`` seconds, is
    *lost* (its node may come back); an error raised by a ClientApp is raised naming its market.
    ``wire`` (a dict), when given, adds the bytes sent (``down``: to nodes) and received."""
    messages = {cid: Message(encode({"calls": [tuple(c) for c in calls]}), dst_node_id=nodes[cid],
                             message_type=message_type(calls))
                for cid, calls in batches.items()}
    if wire is not None:
        wire["down"] = wire.get("down", 0) + sum(content_bytes(m.content) for m in messages.values())
    ids = list(grid.push_messages(list(messages.values())))
    by_id = {mid: cid for mid, cid in zip(ids, messages) if mid}
    replies, lost = {}, {cid: "the SuperLink did not accept the message" for cid, mid in zip(messages, ids)
                         if not mid}
    end = time.time() + (timeout if timeout is not None else float("inf"))
    while by_id and time.time() < end:
        for reply in grid.pull_messages(list(by_id)):
            market = by_id.pop(reply.metadata.reply_to_message_id, None)
            if market is None:
                continue
            if reply.has_error() and reply.error.code in LOST_NODE_CODES:
                lost[market] = f"node {nodes[market]} lost: {reply.error.reason}"
            elif reply.has_error():
                methods = ", ".join(method for method, _ in batches[market])
                raise RuntimeError(f"market [{market}] (node {nodes[market]}) failed in {methods}: "
                                   f"{reply.error.reason}")
            else:
                if wire is not None:
                    wire["up"] = wire.get("up", 0) + content_bytes(reply.content)
                replies[market] = decode(reply.content)
        if by_id:
            time.sleep(POLL_S)
    lost.update({cid: f"no reply within {timeout:.0f} s" for cid in by_id.values()})
    return {cid: replies[cid] for cid in batches if cid in replies}, lost


def describe_nodes(grid, node_ids, timeout):
    """``{node id: {"market", "vocabulary"}}`` of the nodes that answer ``describe``."""
    described, _ = call_nodes(grid, {n: n for n in node_ids}, {n: [("describe", ())] for n in node_ids}, timeout)
    return {n: replies[0] for n, replies in described.items()}


def _flower_server_class():
    from recbole_cmr.federated.server import FederatedServer

    class FlowerServer(FederatedServer):
        """:class:`FederatedServer` whose clients are SuperNodes: ``deliver`` sends messages, one
        per market with all its calls; posted calls (``keep_local``, ``restore_best``, ...) wait
        for the market's next message.

        A lost node (killed, disconnected, silent for ``timeout`` s) is waited for: the server
        logs which markets it waits for and resends once a node of that market reconnects (a
        restarted SuperNode gets a new node id; it is recognised by its ``describe`` reply). A
        training round instead goes on without lost markets when at least ``fed_min_clients``
        of its selected markets replied."""

        def __init__(self, config, grid, nodes, timeout=None, vocabulary=None, **kwargs):
            self.grid, self.nodes, self.timeout = grid, dict(nodes), timeout
            self.vocabulary = vocabulary  # the digest every node must report
            self.wire = {"up": 0, "down": 0}  # message bytes so far
            super().__init__(config, [RemoteClient(m, n) for m, n in nodes.items()], **kwargs)

        DEFER_POSTED = True  # posted calls travel with the client's next message

        def deliver(self, batches):
            """One message per market with its calls; lost nodes are waited for (see above)."""
            deadline = time.time() + (self.timeout or float("inf"))
            need = len(batches)
            training = any(method == "fit" for calls in batches.values() for method, _ in calls)
            if training and self.min_clients:
                need = min(self.min_clients, len(batches))
            method = next((calls[-1][0] for calls in batches.values() if calls), "")  # for the logs
            replies, pending = {}, dict(batches)
            while pending:
                got, lost = call_nodes(self.grid, self.nodes, pending,
                                       max(1.0, deadline - time.time()), self.wire)
                replies.update(got)
                pending = {cid: a for cid, a in pending.items() if cid in lost}
                if not pending:
                    break
                why = "; ".join(f"{cid}: {reason}" for cid, reason in sorted(lost.items()))
                if len(replies) >= need:
                    self.logger.warning(f"{method}: markets {sorted(pending)} did not reply ({why}); "
                                        f"the round goes on with {sorted(replies)} "
                                        f"(fed_min_clients={self.min_clients}).")
                    break
                self.logger.warning(f"{method}: waiting up to {deadline - time.time():.0f} s for the "
                                    f"SuperNodes of markets {sorted(pending)} ({why}); restart each with "
                                    "its --node-config and the run goes on.")
                self.nodes.update(self.reconnect(sorted(pending), deadline))
            return replies

        def reconnect(self, markets, deadline):
            """``{market: node id}`` of newly connected nodes serving ``markets`` (waits until
            ``deadline``; a node of another vocabulary is an error)."""
            found, known = {}, set(self.nodes.values())
            while time.time() < deadline:
                new = [n for n in self.grid.get_node_ids() if n not in known]
                for node, described in describe_nodes(self.grid, new, max(1.0, deadline - time.time())).items():
                    known.add(node)
                    check_vocabularies({**{m: self.vocabulary for m in self.nodes},
                                        described["market"]: described["vocabulary"]})
                    if described["market"] in markets:
                        found[described["market"]] = node
                        self.logger.info(f"market [{described['market']}] is back on node {node}")
                if set(found) == set(markets):
                    return found
                time.sleep(1.0)
            raise TimeoutError(f"the SuperNodes of markets {sorted(set(markets) - set(found))} did not "
                               "come back in time (node-timeout).")

        def _train_round(self, round_idx):
            """The round, plus the message bytes of its training (``wire_up``, ``wire_down``)."""
            before = dict(self.wire)
            record = super()._train_round(round_idx)
            record.update(wire_up=self.wire["up"] - before["up"], wire_down=self.wire["down"] - before["down"])
            return record

        def client_files_name(self):
            """Nodes keep their round state in their own ``checkpoint_dir``: a file name only."""
            return os.path.basename(super().client_files_name())

    return FlowerServer


def check_vocabularies(digests):
    """Raise when the markets' item-vocabulary digests (``{market: sha256}``) differ."""
    if len(set(digests.values())) > 1:
        raise ValueError(f"the markets' item vocabularies differ (sha256 per market: {digests}): every "
                         "node must load the vocabulary file the federation agreed on.")


def wait_for_nodes(grid, markets, timeout):
    """``({market: node id}, vocabulary digest)`` once a node of every market in ``markets`` has
    connected; every node must report the same item-vocabulary digest (else a clear error)."""
    start, nodes = time.time(), []
    while time.time() - start < timeout:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= len(markets):
            break
        time.sleep(0.5)
    if len(nodes) < len(markets):
        raise TimeoutError(f"{len(nodes)} of {len(markets)} SuperNodes connected within {timeout} s.")
    described = describe_nodes(grid, nodes, timeout)
    by_market = {d["market"]: n for n, d in described.items()}
    unknown = sorted(set(by_market) - set(markets))
    if unknown or len(by_market) < len(nodes):
        raise ValueError(f"SuperNodes serve markets {sorted(d['market'] for d in described.values())}; "
                         f"this run expects one node for each of {markets}.")
    digests = {d["market"]: d["vocabulary"] for d in described.values()}
    check_vocabularies(digests)
    return {m: by_market[m] for m in markets}, next(iter(digests.values()))


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Federated rounds (the in-process round logic), each node's fine-tuning, results files."""
    from recbole_cmr.federated.server import round_summary
    from recbole_cmr.quick_start import report, summarise
    from recbole_cmr.resume import federated_resume
    from recbole_cmr.results import init_run_logger
    from recbole_cmr.trainer import checkpoint_file

    config, markets = server_config(context.run_config)
    log_path = init_run_logger(config)
    quiet_transport_logs()
    timeout = float(context.run_config.get("node-timeout", 600))
    nodes, vocabulary = wait_for_nodes(grid, markets, timeout)
    getLogger().info(f"SuperNodes: {nodes}")
    server = _flower_server_class()(config, grid, nodes, timeout=timeout, vocabulary=vocabulary,
                                    checkpoint_file=checkpoint_file(config, "federated"))
    resume_file = federated_resume(config, server.checkpoint_file, config["fed_resume"])
    if resume_file:
        server.resume_checkpoint(resume_file)
    server.fit(verbose=True)
    # one last message per node: test, export, the node's fine-tuning, close (its worker ends)
    then = {m: [("close", ())] for m in markets}
    if config["finetune"]:
        then = {m: [("finetune", (server.best_params_for(m),)), *calls] for m, calls in then.items()}
    tests, checkpoints, last = server.finish(export=True, verbose=True, then=then)
    best_valid = server.best_valid or {}
    per_market = {m: {"valid": best_valid.get(m), **tests[m], "checkpoint": checkpoints[m]}
                  for m in markets}
    if config["finetune"]:
        per_market = {m: {**last[m][0], "federated": per_market[m]} for m in markets}
    result = {**summarise(config, per_market), "federated_rounds": round_summary(server)}
    report(config, result, log_path)
    out = json.loads(context.run_config["settings"]).get("result_file")
    if out:  # the launcher's handle on the run's outcome
        with open(f"{out}.tmp", "w") as f:
            json.dump(_jsonable(result), f)
        os.replace(f"{out}.tmp", out)


def quiet_transport_logs():
    """RecBole sets the root logger to INFO; keep Flower's HTTP client from logging each request."""
    import logging

    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


# The ServerApp's data path: a folder that does not exist, so that a run proves it reads no data.
SERVER_DATA_PATH = "/nonexistent/recbole_cmr-the-serverapp-reads-no-data"


def server_config(run_config):
    """``(Config, markets)`` of the run from the App's run config (``settings``: JSON of
    ``model``, ``dataset``, ``markets`` and the ``config_dict``); its ``data_path`` does not
    exist (:data:`SERVER_DATA_PATH`)."""
    from recbole_cmr.config import Config

    settings = json.loads(run_config["settings"])
    config = Config(model=settings["model"], dataset=settings["dataset"],
                    config_dict={**settings["config_dict"], "train_mode": "federated",
                                 "data_path": SERVER_DATA_PATH},
                    argv=[])  # the process's own command line is Flower's, not settings
    return config, list(settings["markets"])


# ---- the node side (in the node's worker process) --------------------------------------------


def node_client(run_config, node_config):
    """``(config, client, session file)``: the node's market, built from its own files only."""
    from recbole.utils import init_seed

    from recbole_cmr.config import Config
    from recbole_cmr.data import create_dataset, data_preparation
    from recbole_cmr.federated.server import make_client

    settings = json.loads(run_config["settings"])
    market = str(node_config["market"])
    if market not in settings["markets"]:
        raise ValueError(f"this node serves market [{market}], which is not one of the run's "
                         f"markets {settings['markets']}.")
    config = Config(model=settings["model"], dataset=settings["dataset"], config_dict={
        **settings["config_dict"], "train_mode": "federated", "markets": [market],
        "data_path": str(node_config["data-path"]), "show_progress": False}, argv=[])
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    client = make_client(config, market, train[market], valid[market], test[market])
    session = os.path.join(config["checkpoint_dir"], f"flower-{settings['run']}.clients", f"{market}.pth")
    return config, client, dataset, session


class NodeSession:
    """The node's client for one run, kept in its worker process between messages
    (:mod:`recbole_cmr.federated.node_worker`); after every message its state is written to the
    node's session file, from which a restarted worker continues."""

    def __init__(self, run_config, node_config):
        from recbole_cmr.compat import load_checkpoint

        quiet_transport_logs()
        self.config, self.client, self.dataset, self.file = node_client(run_config, node_config)
        if os.path.exists(self.file):
            self.client.load_session_state(load_checkpoint(self.file))
        self.closed = False

    def handle(self, content):
        """The reply ``RecordDict`` to a message's ``content`` (``Client.<method>(*args)``)."""
        from recbole_cmr.utils import save_atomic

        replies = [self.call(method, args) for method, args in decode(content)["calls"]]
        os.makedirs(os.path.dirname(self.file), exist_ok=True)
        save_atomic(self.client.session_state(), self.file)
        return encode(replies)

    def call(self, method, args):
        """The reply to one call: ``Client.<method>(*args)``, or the node's own ``describe``,
        ``finetune`` and ``close`` (the run is over: the worker ends after this message)."""
        client = self.client
        if method == "describe":
            return {"market": client.client_id, "vocabulary": self.dataset.vocabulary_digest()}
        if method == "finetune":
            return node_finetune(self.config, client, *args)
        if method == "close":
            self.closed = True
            return None
        return getattr(client, method)(*args)


def node_finetune(config, client, best_params):
    """The node's local fine-tuning after the rounds, from the best round: ``{valid, test,
    checkpoint}`` as the in-process fine-tuning stage records them (the same market copy,
    :func:`recbole_cmr.modes.market_model`)."""
    from recbole_cmr.modes import finetune_local

    client.restore_best(best_params)
    market = client.client_id
    loaders = ({market: client.train_data}, {market: client.valid_data}, {market: client.test_data})
    result = finetune_local(config, {market: client.model}, *loaders, saved=True, verbose=False)[market]
    return _jsonable(result)
