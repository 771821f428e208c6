"""The in-process federated server: select, broadcast, collect, aggregate, validate, checkpoint.

Settings (defaults in properties/overall.yaml)::

    fed_rounds: 50              # (int) Communication rounds.
    fed_local_epochs: 1         # (int) Local epochs each selected market trains per round.
    fed_local_steps: ~          # (int) Instead: optimizer steps (batches) per round and market.
    fed_client_fraction: 1.0    # (float) Share of markets trained per round: max(1, round(f * n)),
                                #   drawn with a generator seeded by `seed` (reproducible).
    fed_min_clients: 0          # (int) Under Flower: a round goes on without the selected markets
                                #   whose node is lost once this many replied (0: wait for all).
    fed_strategy: fedavg        # (str) fedavg, fedavg_rows, fedavgm, fedadam, fedyogi, fedadagrad,
                                #   fedprox, fednova, scaffold (recbole_cmr.federated.strategy).
    fed_shared_params: ["*"]    # (list) fnmatch/regex patterns of the aggregated parameters.
    fed_local_params: []        # (list) Patterns kept on each market (FedBN: ["*LayerNorm*"]).
    fed_rowwise: False          # (bool) Per-row averaging under any strategy (see strategy.py).
    server_learning_rate, server_momentum, eta, beta_1, beta_2, tau, proximal_mu, eta_l
                                # Flower's names for the strategies' settings (strategy.py).

RecBole's own keys keep their meaning, counted in rounds: ``eval_step`` (validate every n rounds),
``stopping_step`` (patience, in validations), ``valid_metric`` (macro average over markets),
``checkpoint_dir``, ``show_progress`` (a progress bar over rounds) and ``seed``.

The server never sees interactions: from a client it receives named parameter tensors, an int
count and float metrics (checked in :meth:`FederatedServer._collect`). It holds the global (and
personalized) parameters, counts and metrics only; every client keeps its own loaders, local
parameters, best round and exported model, and writes its own round checkpoint
(``<run checkpoint>.clients/<market>.pth``) when the server writes the run's.
"""

import random
from logging import getLogger
from time import time

import numpy as np
import torch
from recbole.utils import calculate_valid_score, early_stopping, set_color
from tqdm import tqdm

from recbole_cmr import __version__
from recbole_cmr.compat import checkpoint_safe, load_checkpoint
from recbole_cmr.federated.client import Client
from recbole_cmr.federated.strategy import FitRes, make_strategy, matching
from recbole_cmr.resume import federated_resume, rng_states
from recbole_cmr.resume import set_rng_states as restore_rng_states
from recbole_cmr.trainer import checkpoint_file, macro_average, new_market_trainer
from recbole_cmr.utils import as_patterns, save_atomic, user_set


def setting(config, key):
    """``config[key]`` (defaults in properties/overall.yaml); a pattern setting as a list."""
    value = config[key]
    return as_patterns(value) if key in ("fed_shared_params", "fed_local_params") else value


def nbytes(tensors):
    """Total size in bytes of the values of ``{name: tensor}``."""
    return sum(t.nelement() * t.element_size() for t in tensors.values())


def _mb(n_bytes):
    return f"{n_bytes / 2**20:.2f} MiB"


def is_finite(update):
    """True when no floating tensor of ``update`` holds NaN or Inf."""
    return all(
        bool(torch.isfinite(t).all())
        for t in update.values()
        if t.is_floating_point() or t.is_complex()
    )


def drop_non_finite(round_idx, results):
    """``results`` without the updates that hold NaN/Inf, each dropped one with a warning (and
    one more when none is left: the parameters then stay unchanged)."""
    kept = []
    for result in results:
        client_id, update, _ = result
        if is_finite(update) and is_finite(getattr(result, "extra", {})):
            kept.append(result)  # as it came: a FitRes keeps its metrics
        else:
            getLogger().warning(set_color(
                f"Round {round_idx}: the update of market [{client_id}] holds NaN/Inf values; "
                "it is left out of the aggregate.", "red"))
    if not kept:
        getLogger().warning(set_color(
            f"Round {round_idx}: no finite update; the parameters stay unchanged.", "red"))
    return kept


def aggregate_round(strategy, round_idx, results, current):
    """The new global parameters: ``strategy`` over the finite updates of ``results``.

    Args:
        strategy (Strategy): the aggregation strategy.
        round_idx (int): 0-based round index.
        results (list[tuple[str, dict[str, Tensor], int]]): ``(client_id, update, num_examples)``.
        current (dict[str, Tensor]): the global parameters before this round.

    Returns:
        dict[str, Tensor]: ``current`` updated by the aggregate; ``current`` itself when every
        update was dropped.
    """
    kept = drop_non_finite(round_idx, results)
    return {**current, **strategy.aggregate(round_idx, kept)} if kept else current


def aggregate_personalized(strategy, round_idx, results, current, personal):
    """The global and personal parameters after a personalized ``strategy``'s round.

    What the strategy aggregates uniformly takes its new global value for every client, selected
    this round or not (and leaves every client's personal values); each selected client's
    personalized parameters take its own new value, the other clients keep theirs (they did not
    train).

    Args:
        strategy (Strategy): a personalized strategy (``aggregate -> (uniform, {client_id:
            own})``).
        round_idx (int): 0-based round index.
        results (list[tuple[str, dict[str, Tensor], int]]): ``(client_id, update, num_examples)``.
        current (dict[str, Tensor]): the global shared parameters before this round.
        personal (dict[str, dict[str, Tensor]]): each client's personalized parameters before
            this round (a subset of the shared names; absent: the global values).

    Returns:
        tuple: ``(global_params, personal)``; both unchanged when every update was dropped.
    """
    kept = drop_non_finite(round_idx, results)
    if not kept:
        return current, personal
    uniform, own = strategy.aggregate(round_idx, kept)
    personal = {cid: {n: t for n, t in params.items() if n not in uniform}  # now global
                for cid, params in personal.items()}
    return {**current, **uniform}, {**personal, **{cid: {**personal.get(cid, {}), **params}
                                                   for cid, params in own.items()}}


def select_clients(rng, client_ids, fraction):
    """The ``max(1, round(fraction * n))`` clients trained this round, in ``client_ids`` order.

    Args:
        rng (random.Random): the server's seeded generator (consumed only when sampling).
        client_ids (list[str]): every client.
        fraction (float): in ``(0, 1]``.
    """
    k = max(1, round(fraction * len(client_ids)))
    if k >= len(client_ids):
        return list(client_ids)
    chosen = set(rng.sample(list(client_ids), k))
    return [c for c in client_ids if c in chosen]


def get_rng_states(selection_rng):
    """The python, numpy, torch (and CUDA) RNG states and the selection RNG's, as plain data."""
    return {**rng_states(), "selection": selection_rng.getstate()}


def set_rng_states(states, selection_rng):
    """Restore :func:`get_rng_states` output."""
    restore_rng_states(states)
    selection_rng.setstate(states["selection"])


class FederatedServer:
    """The round loop over in-process :class:`~recbole_cmr.federated.client.Client` objects.

    Args:
        config (Config): the run's settings (see the module docstring).
        clients (list[Client]): one per market, all with the same shared parameter names.
        strategy (Strategy, optional): default ``get_strategy(fed_strategy)(config)``.
        checkpoint_file (str, optional): written after every round; ``None``: no checkpoints.

    Attributes:
        global_params (dict[str, Tensor]): the current global shared parameters.
        personal (dict[str, dict[str, Tensor]]): under a personalized strategy (PF-MSMTrec's),
            each client's own values of the parameters the strategy personalizes (empty
            otherwise); a client starts a round from ``global_params`` updated by them.
        best (dict): ``round``, ``global``, ``personal`` and ``valid`` (``{market: result}``) of
            the best validated round (each client keeps its own local parameters of that round).
        history (list[dict]): one record per round: ``round``, ``markets`` (trained), ``dropped``
            (selected, but their node was lost: see ``fed_min_clients``), ``strategy`` (the
            strategy's ``round_report``, where it has one), ``train_loss`` (mean over them),
            ``valid_score``, ``bytes_up``, ``bytes_down``, ``train_time``, ``aggregate_time``,
            ``valid_time``, ``round_time`` (seconds).
    """

    def __init__(self, config, clients, strategy=None, checkpoint_file=None):
        self.config = config
        self.clients = {c.client_id: c for c in clients}
        self.strategy = strategy or make_strategy(config)
        self.rounds = setting(config, "fed_rounds")
        self.fraction = setting(config, "fed_client_fraction")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fed_client_fraction [{self.fraction}] must be in (0, 1].")
        self.min_clients = setting(config, "fed_min_clients") or 0
        if not isinstance(self.min_clients, int) or not 0 <= self.min_clients <= len(clients):
            raise ValueError(f"fed_min_clients [{self.min_clients}] must be an int from 0 (every "
                             f"selected market) to the number of markets ({len(clients)}).")
        self.valid_metric = config["valid_metric"].lower()
        self.bigger = config["valid_metric_bigger"]
        self.eval_step = min(config["eval_step"], self.rounds)
        self.stopping_step = config["stopping_step"]
        self.show_progress = config["show_progress"]
        self.device = config["device"]
        self.checkpoint_file = checkpoint_file
        self.rng = random.Random(config["seed"])
        self.logger = getLogger()
        self._posted = {}  # {client_id: [(method, args)]}: posted calls not made yet (:meth:`post`)
        self._best_to_mark = self._closed = None  # the round to mark as best / closed on the clients
        first = clients[0].client_id
        replies = self.call_many({cid: [("get_parameters", ())] * (cid == first) + [("parameter_shapes", ())]
                                  for cid in self.clients})
        self.global_params = replies[first][0]
        self.personal = {}  # {client_id: params} once a personalized strategy has aggregated
        private = market_dependent_local(config, {cid: r[-1] for cid, r in replies.items()})
        if private:  # clients that build_clients did not set up (e.g. remote ones)
            self.post("keep_local", {cid: (private,) for cid in self.clients})
            self.global_params = {n: t for n, t in self.global_params.items() if n not in private}
        self.shared_names = list(self.global_params)
        self.strategy.check_names(self.shared_names)
        self.strategy.set_clients(list(self.clients))
        self.start_round, self.cur_step, self.stopped = 0, 0, False
        self.best_score = -np.inf if self.bigger else np.inf
        self.best, self.history = None, []

    # ---- talking to the clients ----------------------------------------------------------------
    # Transports: in-process, ``deliver`` makes the calls in turn and a posted call is made at
    # once; Flower's server (``recbole_cmr.federated.flower``) sends each client's calls as one
    # message and holds posted calls for the client's next message (``DEFER_POSTED``), since every
    # Flower message costs a ClientApp process and a SuperNode poll.
    DEFER_POSTED = False

    def call_each(self, method, args):
        """``{client_id: client.<method>(*args[client_id])}`` (:meth:`call_many` of one call)."""
        return {cid: replies[-1] for cid, replies in
                self.call_many({cid: [(method, a)] for cid, a in args.items()}).items()}

    def call_many(self, calls):
        """``{client_id: [reply, ...]}`` of each client's calls ``calls[client_id]`` (a list of
        ``(method, args)``), made in order after the client's posted ones (:meth:`post`): the one
        place the server talks to its clients, plain data both ways. A client missing from the
        replies (a lost node a training round went on without, ``fed_min_clients``) keeps its
        posted calls for its next message."""
        posted = {cid: self._posted.pop(cid, []) for cid in calls}
        replies = self.deliver({cid: [*posted[cid], *batch] for cid, batch in calls.items()})
        for cid in calls:
            if cid not in replies and posted[cid]:
                self._posted[cid] = posted[cid] + self._posted.get(cid, [])
        return {cid: list(r[len(posted[cid]):]) for cid, r in replies.items()}

    def post(self, method, args):
        """Make the calls ``client.<method>(*args[client_id])`` whose replies are not needed
        (``keep_local``, ``mark_best``, ``restore_best``, ``set_parameters``), at the latest before
        the client's next call (:attr:`DEFER_POSTED`) or :meth:`flush`."""
        for cid, a in args.items():
            self._posted.setdefault(cid, []).append((method, a))
        if not self.DEFER_POSTED:
            self.flush()

    def flush(self):
        """Make every posted call now."""
        if any(self._posted.values()):
            self.call_many({cid: [] for cid, calls in self._posted.items() if calls})

    def deliver(self, batches):
        """``{client_id: [reply, ...]}`` of each client's calls ``batches[client_id]``, made in
        turn on the in-process clients (a transport overrides this)."""
        return {cid: [getattr(self.clients[cid], method)(*a) for method, a in batch]
                for cid, batch in batches.items()}

    def params_for(self, client_id, personal=None, global_params=None):
        """The shared parameters client ``client_id`` starts from: the global ones, with its own
        values of the personalized ones (of ``personal``/``global_params`` when given)."""
        personal = self.personal if personal is None else personal
        global_params = self.global_params if global_params is None else global_params
        return {**global_params, **personal.get(client_id, {})}

    @property
    def best_valid(self):
        """``{market: valid result}`` of the best round (None before any validation)."""
        return self.best["valid"] if self.best else None

    # ---- one round -------------------------------------------------------------------------
    def _collect(self, client_id, update, num_examples, metrics, extra=None):
        """Check what a client sent: named shared tensors, an int count, float metrics and, for
        some strategies (SCAFFOLD), extra named tensors of shared parameters."""
        if not isinstance(update, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in update.items()
        ):
            raise TypeError(
                f"Client [{client_id}] must send dict[str, Tensor], got {type(update)}."
            )
        unknown = set(update) - set(self.shared_names)
        if unknown:
            raise ValueError(f"Client [{client_id}] sent non-shared parameters {sorted(unknown)}.")
        if not isinstance(num_examples, int) or isinstance(num_examples, bool):
            raise TypeError(f"Client [{client_id}] must send num_examples as int.")
        unknown = set(extra or {}) - set(self.shared_names)
        if unknown:
            raise ValueError(f"Client [{client_id}] sent extra tensors of non-shared parameters "
                             f"{sorted(unknown)}.")
        return client_id, update, num_examples, {k: float(v) for k, v in metrics.items()}, extra

    def _train_round(self, round_idx):
        """Select, broadcast, local training, collect, aggregate. Returns the round's record."""
        start = time()
        selected = select_clients(self.rng, list(self.clients), self.fraction)
        results, losses, bytes_up = [], [], 0
        starts = {cid: self.params_for(cid) for cid in selected}
        personalized = getattr(self.strategy, "personalized", False)
        if personalized:  # each client's own start too
            self.strategy.configure_round(round_idx, self.global_params, starts)
        else:
            self.strategy.configure_round(round_idx, self.global_params)
        instructions = self.strategy.client_config(round_idx)
        tensors = self.strategy.client_tensors(round_idx)
        extra = () if tensors is None else (tensors,)
        replies = self.call_each("fit", {cid: (starts[cid], round_idx, instructions, *extra)
                                         for cid in selected})
        dropped = [cid for cid in selected if cid not in replies]  # lost nodes (``fed_min_clients``)
        selected = [cid for cid in selected if cid in replies]
        for client_id in selected:
            result = FitRes(*self._collect(client_id, *replies[client_id]))
            results.append(result)
            losses.append(result.metrics.get("loss", np.nan))
            bytes_up += nbytes(result[1]) + nbytes(result.extra)
        trained = time()
        if personalized:
            self.global_params, self.personal = aggregate_personalized(
                self.strategy, round_idx, results, self.global_params, self.personal)
        else:
            self.global_params = aggregate_round(self.strategy, round_idx, results,
                                                 self.global_params)
        report = self.strategy.round_report() if results else {}
        return {
            "round": round_idx,
            "markets": selected,
            "dropped": dropped,
            **({"strategy": report} if report else {}),
            "train_loss": float(np.mean(losses)),
            "bytes_up": bytes_up,
            "bytes_down": sum(nbytes(self.params_for(c)) + nbytes(tensors or {}) for c in selected),
            "train_time": trained - start,
            "aggregate_time": time() - trained,
            "valid_score": None,
            "valid_time": 0.0,
        }  # "round_time" is added by fit

    def _evaluate(self, phase, personal=None, global_params=None, best=False, per_user=False):
        """``{market: result}``: each client evaluates its shared parameters (:meth:`params_for`)
        + its own local parameters on its own ``phase`` data (the server never holds a loader);
        ``best``: the parameters are the best round's, which each client loads first;
        ``per_user``: ``{market: (result, per-user values)}`` (``Client.evaluate``)."""
        return self.call_each("evaluate", {cid: self._evaluate_args(cid, phase, personal, global_params, best,
                                                                    per_user) for cid in self.clients})

    def _evaluate_args(self, client_id, phase, personal=None, global_params=None, best=False, per_user=False):
        """The arguments of client ``client_id``'s ``evaluate`` (see :meth:`_evaluate`)."""
        extra = (per_user,) if per_user else ()
        return (self.params_for(client_id, personal, global_params), phase, best, *extra)

    def _validate_round(self, record):
        """Validate every market, update early stopping and the best states; True to stop. The
        validation message also closes the round on each client (:meth:`end_round`)."""
        start = time()
        round_idx = record["round"]
        closing = self._closing_calls(round_idx, mark=False)
        replies = self.call_many({cid: [("evaluate", self._evaluate_args(cid, "valid")), *closing]
                                  for cid in self.clients})
        per_market = {cid: r[0] for cid, r in replies.items()}
        self._closed = round_idx
        score = calculate_valid_score(macro_average(per_market), self.valid_metric)
        self.best_score, self.cur_step, stop, improved = early_stopping(
            score, self.best_score, self.cur_step, max_step=self.stopping_step, bigger=self.bigger
        )
        if improved:
            self._remember_best(record["round"], per_market)
        record.update(valid_score=float(score), valid_time=time() - start)
        return stop

    def _remember_best(self, round_idx, per_market):
        self.best = {
            "round": round_idx,
            "global": {n: t.clone() for n, t in self.global_params.items()},
            "personal": {cid: {n: t.clone() for n, t in p.items()} for cid, p in self.personal.items()},
            "valid": per_market,
        }
        self._best_to_mark = round_idx  # the clients mark it when the round ends (end_round)

    def _log_round(self, record):
        valid = "-" if record["valid_score"] is None else f"{record['valid_score']:.6f}"
        self.logger.info(
            set_color(f"round {record['round']}", "green")
            + f" [{set_color('markets', 'blue')}: {', '.join(record['markets'])}"
            + (f" (lost: {', '.join(record['dropped'])})" if record.get("dropped") else "") + ", "
            f"{set_color('train loss', 'blue')}: {record['train_loss']:.4f}, "
            f"{set_color('valid ' + self.valid_metric, 'blue')}: {valid}, "
            f"{set_color('up', 'blue')}: {_mb(record['bytes_up'])}, "
            f"{set_color('down', 'blue')}: {_mb(record['bytes_down'])}, "
            f"{set_color('time', 'blue')}: {record['round_time']:.2f}s "
            f"(train {record['train_time']:.2f}s, aggregate {record['aggregate_time']:.4f}s, "
            f"valid {record['valid_time']:.2f}s)]"
        )

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, verbose=True, callback_fn=None):
        """Run rounds ``start_round .. fed_rounds - 1`` (early stopping on the macro valid metric).

        Args:
            verbose (bool): log one line per round.
            callback_fn (callable, optional): ``callback_fn(round, valid_score)`` after each
                round's checkpoint (``valid_score`` is None in rounds without validation).

        Returns:
            tuple: ``(best_valid_score, {market: best valid result})``; the clients hold the best
            round's parameters afterwards.
        """
        rounds = range(self.start_round, self.rounds if not self.stopped else self.start_round)
        if self.show_progress:
            rounds = tqdm(rounds, total=len(rounds), ncols=100, desc=set_color("Rounds", "pink"))
        for round_idx in rounds:
            start = time()
            record = self._train_round(round_idx)
            if self.eval_step > 0 and (round_idx + 1) % self.eval_step == 0:
                self.stopped = self._validate_round(record)
            elif self.eval_step <= 0:
                self._remember_best(round_idx, None)
            record["round_time"] = time() - start  # provisional: the checkpoint below holds it
            self.history.append(record)
            self.save_checkpoint(round_idx)
            record["round_time"] = time() - start  # the round closed on the clients included
            if verbose:
                self._log_round(record)
            if callback_fn:
                callback_fn(round_idx, record["valid_score"])
            if self.stopped:
                if verbose:
                    self.logger.info(
                        f"Finished training, best eval result in round {self.best['round']}"
                    )
                break
        if self.budget_ended and self.best:
            self.logger.warning(
                f"fed_rounds={self.rounds} ended the federated rounds before early stopping did: "
                f"the best round is {self.best['round']} (0-based) and the macro valid score "
                f"improved within the last stopping_step={self.stopping_step} validations, so "
                "more rounds may still help; raise fed_rounds to train to convergence")
        self.load_best()
        return self.best_score, self.best_valid

    @property
    def budget_ended(self):
        """True when the round budget ``fed_rounds``, not early stopping, ended the rounds (the
        stage may be under-trained); False while rounds remain, after early stopping, and for a
        stage taken from a finished run (``fed_pretrained``)."""
        return not self.stopped and len(self.history) >= self.rounds

    def best_params_for(self, client_id):
        """The shared parameters of the best round that client ``client_id`` loads."""
        return self.params_for(client_id, self.best.get("personal") or {}, self.best["global"])

    def load_best(self):
        """Every client loads the best round (the shared parameters sent, its own local ones)."""
        if self.best is None:
            return
        self.post("restore_best", {cid: (self.best_params_for(cid),) for cid in self.clients})

    def export_best(self, verbose=True):
        """Each client saves its best model as a plugin checkpoint (``export`` loads the best
        round itself); ``{market: path}``."""
        return self.call_each("export", {cid: self._export_args(cid, verbose) for cid in self.clients})

    def _export_args(self, client_id, verbose):
        """The arguments of client ``client_id``'s ``export`` (see :meth:`export_best`)."""
        return (self.best_params_for(client_id) if self.best else self.params_for(client_id),
                float(self.best_score), verbose)

    def evaluate(self, phase="test", load_best=True, per_user=False):
        """``{market: RecBole result}`` of every client on its own ``phase`` data; with
        ``per_user``, ``{market: (result, per-user values)}`` in the same one message per client.

        Uses the best round's global and local parameters (loaded by the ``evaluate`` message
        itself) unless ``load_best`` is False.
        """
        if load_best and self.best is not None:
            return self._evaluate(phase, self.best.get("personal") or {}, self.best["global"], best=True,
                                  per_user=per_user)
        return self._evaluate(phase, per_user=per_user)

    def test_entries(self):
        """``{market: {"test": result, "per_user": values}}``: :meth:`evaluate` of the test data,
        as each market's run result records it."""
        return {m: {"test": result, "per_user": values}
                for m, (result, values) in self.evaluate("test", per_user=True).items()}

    def finish(self, export=True, verbose=True, then=None):
        """The run's end in one message per client: :meth:`test_entries`, then with ``export``
        :meth:`export_best`, then the client's calls ``then[client_id]`` (a list of ``(method,
        args)``, e.g. Flower's fine-tuning and ``close``).

        Returns:
            tuple: ``(test entries, {market: checkpoint path} (empty without export), {market:
            [reply of each call in then]})``.
        """
        best = self.best is not None
        personal, global_params = (self.best.get("personal") or {}, self.best["global"]) if best else (None, None)
        calls = {cid: [("evaluate", self._evaluate_args(cid, "test", personal, global_params, best, True)),
                       *([("export", self._export_args(cid, verbose))] if export else []),
                       *(then or {}).get(cid, [])] for cid in self.clients}
        replies = self.call_many(calls)
        tests = {m: {"test": r[0][0], "per_user": r[0][1]} for m, r in replies.items()}
        checkpoints = {m: r[1] for m, r in replies.items()} if export else {}
        return tests, checkpoints, {m: r[1 + export:] for m, r in replies.items()}

    # ---- checkpoints -------------------------------------------------------------------------
    def client_files_name(self):
        """What clients name their round checkpoints after: the run's file without ``.pth``."""
        return str(self.checkpoint_file)[:-4] if str(self.checkpoint_file).endswith(".pth") \
            else str(self.checkpoint_file)

    def _closing_calls(self, round_idx, mark):
        """The client call that closes round ``round_idx`` (``Client.end_round``: mark the round
        as the best when ``mark``, write the round state when the run checkpoints), or none."""
        name = self.client_files_name() if self.checkpoint_file else None
        return [("end_round", (round_idx, mark, name))] if mark or name else []

    def end_round(self, round_idx):
        """Close the round on every client: each marks the round as its best when it is (its
        local parameters now) and writes its round state when the run checkpoints. A validated
        round was closed by its validation message, before the best round was known: the mark
        (``mark_best``) then travels with the clients' next message (posted), and a resumed
        client learns it from the run checkpoint (:meth:`_load_client_states`). Otherwise one
        message closes the round."""
        mark = self._best_to_mark == round_idx
        if self._closed == round_idx:
            if mark:
                self.post("mark_best", {cid: (round_idx,) for cid in self.clients})
        else:
            closing = self._closing_calls(round_idx, mark)
            if closing:
                self.call_many({cid: closing for cid in self.clients})
        self._best_to_mark = None

    def save_checkpoint(self, round_idx):
        """Close round ``round_idx`` on the clients (:meth:`end_round`: each writes its own state
        file), then write the server's parameters, strategy, history and RNG (loads with
        ``weights_only=True``)."""
        self.end_round(round_idx)
        if not self.checkpoint_file:
            return
        config = self.config
        state = {
            "recbole_cmr": __version__,
            "kind": "federated",
            "model": config["model"],
            "dataset": config["dataset"],
            "config": checkpoint_safe(getattr(config, "external_config_dict", {})),
            "markets": list(self.clients),
            "round": round_idx,
            "cur_step": self.cur_step,
            "stopped": self.stopped,
            "best_valid_score": float(self.best_score),
            "best": self.best and checkpoint_safe(self.best),
            "history": checkpoint_safe(self.history),
            "global": self.global_params,
            "personal": self.personal,
            "strategy": self.strategy.state_dict(),
            "rng": get_rng_states(self.rng),
        }
        save_atomic(state, self.checkpoint_file)

    def _read_checkpoint(self, file):
        """A :meth:`save_checkpoint` file of these markets (ValueError otherwise)."""
        checkpoint = load_checkpoint(str(file), map_location=self.device)
        if checkpoint.get("kind") != "federated" or checkpoint["markets"] != list(self.clients):
            raise ValueError(
                f"[{file}] is not a federated checkpoint of markets {list(self.clients)}."
            )
        return checkpoint

    def load_pretrained(self, pretrained_file):
        """Take the best round of a finished federated run as this run's federated stage.

        No round is trained: :meth:`fit` returns that round at once, so fine-tuning ablations
        (e.g. FeCoSR with and without adaptation) can share one federated stage. The stored
        shared parameters must match this model's (names and shapes); stored local parameters
        this model lacks (e.g. a market adapter), or holds with other shapes (an adapter of
        another rank), are left at this model's initial values (the latter logged).
        """
        checkpoint = self._read_checkpoint(pretrained_file)
        best = checkpoint["best"]
        if not best or best.get("valid") is None:
            raise ValueError(f"fed_pretrained [{pretrained_file}] has no validated round yet.")
        stored = best["global"]
        wrong = [n for n, t in self.global_params.items()
                 if n not in stored or stored[n].shape != t.shape]
        if wrong:
            raise ValueError(
                f"fed_pretrained [{pretrained_file}] ({checkpoint['model']}) does not hold this "
                f"{self.config['model']} model's shared parameters {wrong[:5]}: pretrain with the "
                "same model and backbone settings."
            )
        self.best = {**best, "global": {n: stored[n] for n in self.shared_names}}
        self.best_score, self.history = checkpoint["best_valid_score"], checkpoint["history"]
        self.global_params = self.best["global"]
        self.personal = {cid: {n: t for n, t in p.items() if n in self.shared_names}
                         for cid, p in (best.get("personal") or {}).items()}
        self.start_round, self.stopped = checkpoint["round"] + 1, True
        self.checkpoint_file = str(pretrained_file)
        self._load_client_states(checkpoint, best_only=True)
        self.logger.info(
            f"Federated stage taken from round {best['round']} of [{pretrained_file}]; "
            "no rounds are trained."
        )

    def _load_client_states(self, checkpoint, best_only=False):
        """Every client restores its state of the checkpoint's round from its own file."""
        best_round = (checkpoint.get("best") or {}).get("round")
        self.call_each("load_state", {cid: (self.client_files_name(), checkpoint["round"], best_only, best_round)
                                      for cid in self.clients})

    def resume_checkpoint(self, resume_file):
        """Continue after the last finished round of a :meth:`save_checkpoint` file."""
        resume_file = str(resume_file)
        checkpoint = self._read_checkpoint(resume_file)
        if checkpoint["model"].lower() != self.config["model"].lower():
            raise ValueError(f"[{resume_file}] holds a {checkpoint['model']} model, "
                             f"not {self.config['model']}.")
        self.checkpoint_file = resume_file
        self.start_round = checkpoint["round"] + 1
        self.cur_step, self.stopped = checkpoint["cur_step"], checkpoint["stopped"]
        self.best_score, self.best = checkpoint["best_valid_score"], checkpoint["best"]
        self.history = checkpoint["history"]
        self.global_params = checkpoint["global"]
        self.personal = checkpoint.get("personal") or {}
        self._load_client_states(checkpoint)
        self.post("set_parameters", {cid: (self.params_for(cid),) for cid in self.clients})
        self.strategy.load_state_dict(checkpoint.get("strategy") or {"state": {}})
        set_rng_states(checkpoint["rng"], self.rng)
        self.logger.info(
            f"Checkpoint loaded. Resume federated training from round {self.start_round}"
        )


def market_dependent(shapes):
    """Names of the shared parameters whose shape differs between clients (``shapes``:
    ``{client_id: {name: shape}}``), e.g. the user embeddings of a general model (one row per
    user of the market)."""
    seen = {}
    for own in shapes.values():
        for name, shape in own.items():
            seen.setdefault(name, set()).add(tuple(shape))
    return [n for n in seen if len(seen[n]) > 1]


def market_dependent_local(config, shapes):
    """The shared parameters that must stay local because their shape depends on the market
    (``shapes``: ``{client_id: {name: shape}}``, logged once); a ``fed_shared_params`` pattern
    that names only such parameters is an error."""
    private = market_dependent(shapes)
    if not private:
        return []
    for pattern in setting(config, "fed_shared_params"):
        named = matching(list(next(iter(shapes.values()))), [pattern])
        if named and set(named) <= set(private):
            shapes = {cid: tuple(own[named[0]]) for cid, own in shapes.items()}
            raise ValueError(
                f'fed_shared_params: pattern "{pattern}" names {named}, whose shape differs '
                f"between markets ({named[0]}: {shapes}); such parameters cannot be averaged. "
                "Drop the pattern (they then stay local to each market)."
            )
    getLogger().info(set_color("Parameters kept local, their shape differs between markets", "blue")
                     + f": {private}")
    return private


def keep_market_dependent_local(config, clients):
    """In-process clients keep :func:`market_dependent_local` parameters local."""
    private = market_dependent_local(config, {c.client_id: c.parameter_shapes() for c in clients})
    for client in clients if private else []:
        client.keep_local(private)


def build_clients(config, train, valid, test=None, verbose=False):
    """One :class:`Client` per market, each with its own model built from the same seed.

    Parameters whose shape depends on the market stay local (:func:`keep_market_dependent_local`).

    Args:
        train, valid, test (dict[str, DataLoader]): ``{market: loader}`` from ``data_preparation``
            (``test`` optional: without it the clients cannot be tested).
    """
    clients = [make_client(config, market, train[market], valid[market], (test or {}).get(market),
                           verbose=verbose and i == 0) for i, market in enumerate(train)]
    keep_market_dependent_local(config, clients)
    return clients


def local_steps(config):
    """``fed_local_steps`` (None: ``fed_local_epochs`` epochs); setting both is an error."""
    steps = config["fed_local_steps"]
    if steps is not None and user_set(config, "fed_local_epochs"):
        raise ValueError("fed_local_steps and fed_local_epochs both set: a round is either "
                         f"{steps} optimizer steps or {config['fed_local_epochs']} epochs; "
                         "remove one.")
    return steps


def make_client(config, market, train_data, valid_data=None, test_data=None, verbose=False):
    """One market's :class:`Client`: its own model (built from the run's seed, so every market
    starts from the same weights) and RecBole trainer, at client learning rate ``eta_l``."""
    model, trainer = new_market_trainer(config, train_data._dataset, market, [market])
    if verbose:
        getLogger().info(model)
    local = [*setting(config, "fed_local_params"), *getattr(model, "federated_local_params", [])]
    client = Client(market, trainer, train_data, valid_data, test_data,
                    shared=setting(config, "fed_shared_params"), local=local,
                    local_epochs=setting(config, "fed_local_epochs"),
                    local_steps=local_steps(config),
                    head_epochs=setting(config, "fed_rep_head_epochs") or 0)
    if config["eta_l"] is not None:  # Flower's name for the client learning rate
        for group in trainer.optimizer.param_groups:
            group["lr"] = float(config["eta_l"])
    return client


def export_best(server, verbose=True):
    """Save each market's best model as a plugin checkpoint ``load_data_and_model`` reads
    (:meth:`FederatedServer.export_best`).

    Returns:
        dict[str, str]: ``{market: checkpoint path}``.
    """
    return server.export_best(verbose)


def round_summary(server):
    """``{"best_round", "rounds", "budget_ended", "rounds_wall_s", "history"}`` of a server's
    rounds: the best validated round (0-based), how many rounds ran, whether the round budget
    rather than early stopping ended them (:attr:`FederatedServer.budget_ended`), their wall
    time, and per round the macro valid score (None where not validated), mean train loss,
    seconds, the tensor bytes sent up and down and, under Flower, the message bytes (``wire_up``, ``wire_down``), the markets left out
    because their node was lost (``dropped``, only where any was) and the strategy's report of
    the round (``strategy``, :meth:`Strategy.round_report`, only where it has one)."""
    keys = ("bytes_up", "bytes_down", "wire_up", "wire_down", "strategy")
    history = [{"round": r["round"], "valid_score": r["valid_score"],
                "train_loss": r["train_loss"], "round_time": round(r["round_time"], 3),
                **{k: r[k] for k in keys if k in r}, **({"dropped": r["dropped"]} if r.get("dropped") else {})}
               for r in server.history]
    return {"best_round": server.best["round"] if server.best else None, "rounds": len(history),
            "budget_ended": server.budget_ended,
            "rounds_wall_s": round(sum(r["round_time"] for r in history), 1), "history": history}


def train_federated(config, train, valid, test, saved=True, verbose=True, resume_file=None,
                    models_out=None, pretrained_file=None, rounds_out=None):
    """Federated training over all markets; the quick start's ``train_mode: federated``.

    Args:
        config (Config): the run's settings.
        train, valid, test (dict[str, DataLoader]): ``{market: loader}`` from ``data_preparation``.
        saved (bool): write the round checkpoint and each market's best model.
        verbose (bool): log the model and one line per round.
        resume_file (str, optional): a round checkpoint to continue from.
        pretrained_file (str, optional): a finished run's round checkpoint whose best round is
            taken as this run's federated stage (see :meth:`FederatedServer.load_pretrained`).
        models_out (dict, optional): filled with ``{market: model}`` holding the best round's
            parameters (for a later local fine-tuning stage).
        rounds_out (dict, optional): filled with :func:`round_summary` of the run.

    Returns:
        dict: ``{market: {"valid": best valid result, "test": test result, "per_user": its
        per-user values, "checkpoint": path}}`` (the shape of the quick start's local mode;
        ``checkpoint`` is the market's best model).
    """
    if resume_file and pretrained_file:
        raise ValueError("Set either fed_resume (continue a run) or fed_pretrained (reuse a "
                         "finished run's federated stage), not both.")
    clients = build_clients(config, train, valid, test, verbose=verbose)
    server = FederatedServer(
        config, clients, checkpoint_file=checkpoint_file(config, "federated") if saved else None
    )
    if not pretrained_file:
        resume_file = federated_resume(config, server.checkpoint_file, resume_file)
    if resume_file:
        server.resume_checkpoint(resume_file)
    if pretrained_file:
        server.load_pretrained(pretrained_file)
    server.fit(verbose=verbose)
    tests, checkpoints, _ = server.finish(export=saved, verbose=verbose)
    if saved and verbose:
        getLogger().info(
            set_color("Federated round checkpoint", "blue") + f": {server.checkpoint_file}"
        )
    best_valid = server.best_valid or {}
    if models_out is not None:
        models_out.update({cid: client.model for cid, client in server.clients.items()})
    if rounds_out is not None:
        rounds_out.update(round_summary(server))
    return {
        m: {"valid": best_valid.get(m), **tests[m], "checkpoint": checkpoints.get(m)}
        for m in test
    }
