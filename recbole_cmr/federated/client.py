"""A federated client: one market's RecBole loaders, its own model, trainer and private state.

The contract maps one-to-one onto Flower's ``NumPyClient``/``ClientApp``::

    client.fit(global_params, round, config[, control]) -> (update, num_examples, metrics[, change])
    client.evaluate(global_params, phase) -> RecBole result dict
    client.evaluate(global_params, phase, best, per_user=True) -> (result, per-user values)

Only ``update`` (named tensors), ``num_examples`` (an int), ``metrics`` (floats), SCAFFOLD's
control-variate ``change`` (named tensors) and evaluation results leave the client; its
interactions (train, valid and test loaders), its non-shared
parameters, its optimizer state, its best round's local parameters and its exported model stay
here. The server sends parameters, round numbers, phase names and file *names* only (the other
messages: ``parameter_shapes``, ``keep_local``, ``end_round`` (``mark_best``, ``save_state``),
``restore_best``, ``export``, ``load_state``), so the same calls run in-process or under Flower.
"""

import itertools
import zlib
from contextlib import contextmanager
from logging import getLogger
from pathlib import Path

import numpy as np
import torch
from recbole.utils import init_seed

from recbole_cmr.compat import load_checkpoint
from recbole_cmr.federated.strategy import select_shared
from recbole_cmr.utils import save_atomic


def client_seed(seed, client_id, stage):
    """A 31-bit seed for client ``client_id`` at ``stage``, derived from the run's ``seed``."""
    return zlib.crc32(f"{seed}/{client_id}/{stage}".encode()) & 0x7FFFFFFF


def _detached(state_dict, names):
    """``{name: detached copy}`` of ``names`` in ``state_dict``."""
    return {name: state_dict[name].detach().clone() for name in names}


class LocalSteps:
    """``steps`` batches of a RecBole training loader, as one "epoch" for ``Trainer._train_epoch``:
    the loader's epochs one after another (each reshuffled by the loader's own generator), cut
    after ``steps`` batches; the next round starts a new epoch.

    Args:
        loader (TrainDataLoader): the market's training loader.
        steps (int): batches (optimizer steps) per round.
    """

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, int(steps)
        self.shuffle = loader.shuffle

    def __len__(self):
        return self.steps

    def __iter__(self):
        def epochs():
            while True:
                empty = True
                for batch in self.loader:
                    empty = False
                    yield batch
                if empty:
                    raise ValueError("fed_local_steps: the market's training loader is empty.")

        return itertools.islice(epochs(), self.steps)


class Client:
    """One market (or scenario) of a federation.

    Args:
        client_id (str): the market name.
        trainer (Trainer): a RecBole trainer (from ``recbole_cmr.get_trainer``) holding this
            client's own model; its optimizer, ``clip_grad_norm`` and logging are used as is.
        train_data (TrainDataLoader): the market's RecBole training loader.
        valid_data (AbstractDataLoader, optional): the market's validation loader.
        test_data (AbstractDataLoader, optional): the market's test loader.
        shared (Sequence[str]): patterns of the aggregated parameters (``fed_shared_params``).
        local (Sequence[str]): patterns of the parameters kept on the client (``fed_local_params``).
        local_epochs (int): local epochs per round (``fed_local_epochs``).
        local_steps (int, optional): instead of ``local_epochs``, this many optimizer steps
            (batches) per round, cycling the training data (``fed_local_steps``).
        head_epochs (int): FedRep's schedule (``fed_rep_head_epochs``): each round first trains
            only the local parameters (the "head") this many epochs, then only the shared ones
            (the "body") its ``local_epochs`` / ``local_steps``; 0 trains all together.
        show_progress (bool): RecBole's per-epoch progress bars.
        checkpoint_dir (str, optional): where :meth:`save_state` writes (default: the trainer's
            ``checkpoint_dir``).
    """

    def __init__(self, client_id, trainer, train_data, valid_data=None, test_data=None,
                 shared=("*",), local=(), local_epochs=1, show_progress=False, checkpoint_dir=None,
                 local_steps=None, head_epochs=0):
        self.client_id = client_id
        self.checkpoint_dir = Path(checkpoint_dir or trainer.config["checkpoint_dir"] or ".")
        self.best_round, self.best_local = None, None
        self.closed = None  # (round, its local parameters) of the last round closed (end_round)
        self.trainer = trainer
        self.model = trainer.model
        self.train_data = train_data
        self.valid_data = valid_data
        self.test_data = test_data
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.head_epochs = head_epochs
        self.control = {}  # SCAFFOLD's control variate c_i by parameter name (float64)
        self.show_progress = show_progress
        state = self.model.state_dict()
        self.shared_names = select_shared(state, shared, local)
        self.local_names = [n for n in state if n not in set(self.shared_names)]
        self.num_examples = int(train_data._dataset.inter_num)
        if head_epochs and not self.trainable_local():
            raise ValueError(
                f"fed_rep_head_epochs: {head_epochs} trains the local parameters first, but "
                f"market [{client_id}] keeps no trainable parameter local: name them in "
                "fed_local_params, or set fed_rep_head_epochs: 0.")
        # What RecBole's Trainer.fit does before its first epoch.
        trainer.eval_collector.data_collect(train_data)
        if (trainer.config["train_neg_sample_args"] or {}).get("dynamic", False):
            train_data.get_model(self.model)

    def parameter_shapes(self):
        """``{name: shape}`` of the shared parameters (the server's market-dependence check)."""
        state = self.model.state_dict()
        return {name: tuple(state[name].shape) for name in self.shared_names}

    def keep_local(self, names):
        """Stop sharing ``names``: they become local parameters of this client."""
        names = set(names)
        self.shared_names = [n for n in self.shared_names if n not in names]
        shared = set(self.shared_names)
        self.local_names = [n for n in self.model.state_dict() if n not in shared]

    def get_parameters(self):
        """The shared parameters, ``{name: tensor}`` (detached copies)."""
        return _detached(self.model.state_dict(), self.shared_names)

    def set_parameters(self, params):
        """Load shared parameters ``{name: tensor}`` into the model (local ones are untouched)."""
        unknown = set(params) - set(self.shared_names)
        if unknown:
            raise KeyError(
                f"Client [{self.client_id}] does not share parameters {sorted(unknown)}."
            )
        self.model.load_state_dict(params, strict=False)

    def fit(self, global_params, round, config=None, control=None):
        """Train ``local_epochs`` epochs (or ``local_steps`` steps) from the global shared
        parameters.

        Args:
            global_params (dict[str, Tensor]): the server's shared parameters (not modified).
            round (int): 0-based round index (epoch ``round * local_epochs + e`` for RecBole).
            config (dict, optional): the strategy's instructions for this round (Flower's fit
                config); ``proximal_mu > 0`` adds FedProx's proximal term to the loss;
                ``scaffold`` turns on SCAFFOLD's correction with the server's ``control``.
            control (dict[str, Tensor], optional): SCAFFOLD's server control variate ``c`` by
                parameter name (absent names: 0).

        Returns:
            tuple: ``(update, num_examples, metrics)``: the new *values* (not deltas) of the
            shared parameters, the number of training interactions (int) and ``{"loss": float,
            "num_steps": float}``: the mean over local epochs of RecBole's epoch loss (the sum of
            the batch losses; with ``local_steps``, of the steps' losses) and the optimizer steps
            taken (FedNova normalises by them; with ``head_epochs``, the body's). Under SCAFFOLD a
            fourth element: the change of this client's control variate, ``{name: tensor}``.
        """
        self.set_parameters(global_params)
        self.seed_for(round)
        config = config or {}
        mu, scaffold = float(config.get("proximal_mu", 0.0)), bool(config.get("scaffold"))
        correction = self.control_correction(control or {}) if scaffold else None
        loss_func = self.local_loss(global_params, mu, correction) if mu > 0 or scaffold else None
        if self.local_steps:
            epochs = [(LocalSteps(self.train_data, self.local_steps), round)]
        else:
            epochs = [(self.train_data, round * self.local_epochs + epoch)
                      for epoch in range(self.local_epochs)]
        if self.head_epochs:  # FedRep: the head alone first, from the round's body
            with self.training_only(self.trainable_local()):
                for epoch in range(self.head_epochs):
                    self.trainer._train_epoch(self.train_data, round * self.head_epochs + epoch,
                                              show_progress=self.show_progress)
        losses = []
        with self.training_only(self.trainable_shared() if self.head_epochs else None):
            for data, epoch_idx in epochs:
                loss = self.trainer._train_epoch(data, epoch_idx, loss_func=loss_func,
                                                 show_progress=self.show_progress)
                losses.append(sum(loss) if isinstance(loss, tuple) else loss)
        steps = sum(len(data) for data, _ in epochs)
        reply = (self.get_parameters(), self.num_examples, {"loss": float(np.mean(losses)),
                                                            "num_steps": float(steps)})
        if scaffold:
            reply += (self.update_control(global_params, control or {}, steps),)
        return reply

    def seed_for(self, stage):
        """Seed python, numpy and torch for this client's ``stage`` (a round number or a name such
        as ``"finetune"``) from the run's ``seed``: a client's training then depends on its own
        data and the parameters it gets, not on which clients trained before it in the same
        process, so it gives the same numbers in-process and in its own process (Flower)."""
        init_seed(client_seed(self.trainer.config["seed"], self.client_id, stage),
                  self.trainer.config["reproducibility"])

    def trainable_shared(self):
        """``{name: parameter}`` of the shared parameters the optimizer trains."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.shared_names if n in params}

    def trainable_local(self):
        """``{name: parameter}`` of the local parameters the optimizer trains."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.local_names if n in params and params[n].requires_grad}

    @contextmanager
    def training_only(self, params):
        """Inside the block only ``params`` (``{name: parameter}``; None: no change) get
        gradients, so the optimizer steps only them (it skips a parameter without one); every
        ``requires_grad`` is restored after."""
        if params is None:
            yield
            return
        keep = {id(p) for p in params.values()}
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in saved:
                p.requires_grad_(p.requires_grad and id(p) in keep)
            yield
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)

    def local_loss(self, global_params, mu=0.0, correction=None):
        """The model's loss plus FedProx's ``mu / 2 * sum ||w - w_global||^2`` over the shared
        trainable parameters and SCAFFOLD's ``sum <c - c_i, w>`` (``correction``: ``{name:
        c - c_i}``), whose gradient is the control-variate correction of every step; a model
        returning a tuple of losses gets them as one more part."""
        params = self.trainable_shared()
        anchors = [(p, global_params[n].detach().clone().to(p.device)) for n, p in params.items()] \
            if mu > 0 else []
        linear = [(params[n], d) for n, d in (correction or {}).items()]

        def loss(interaction):
            base = self.model.calculate_loss(interaction)
            extra = mu / 2 * sum(((p - g) ** 2).sum() for p, g in anchors) + \
                sum((p * d).sum() for p, d in linear)
            return (*base, extra) if isinstance(base, tuple) else base + extra

        return loss

    # ---- SCAFFOLD's control variate (client half) ----------------------------------------
    def control_correction(self, control):
        """``{name: c - c_i}`` for the shared trainable parameters, on their devices and dtypes
        (``control``: the server's ``c``; a name it lacks is 0, as is this client's ``c_i``
        before its first SCAFFOLD round)."""
        out = {}
        for name, p in self.trainable_shared().items():
            zero = torch.zeros_like(p, dtype=torch.float64)
            c = control.get(name, zero).to(p.device, torch.float64)
            c_i = self.control.get(name, zero).to(p.device, torch.float64)
            out[name] = (c - c_i).to(p.dtype)
        return out

    def update_control(self, global_params, control, steps):
        """SCAFFOLD option II: ``c_i+ = c_i - c + (x - y_i) / (K lr)`` after ``K = steps`` local
        steps at the optimizer's learning rate, kept as this client's ``c_i`` (float64); returns the
        change ``c_i+ - c_i`` in the parameter's dtype, which the server averages into ``c``."""
        lr = float(self.trainer.optimizer.param_groups[0]["lr"])
        change = {}
        for name, p in self.trainable_shared().items():
            y = p.detach().to(torch.float64)
            x = global_params[name].detach().to(p.device, torch.float64)
            c = control.get(name, torch.zeros_like(y)).to(p.device, torch.float64)
            c_i = self.control.get(name, torch.zeros_like(y)).to(p.device, torch.float64)
            new = c_i - c + (x - y) / (steps * lr)
            change[name], self.control[name] = (new - c_i).to(p.dtype), new  # sent as p's dtype
        return change

    def evaluate(self, global_params, phase="valid", best=False, per_user=False):
        """RecBole's result on this client's own ``phase`` loader (``valid`` or ``test``) with the
        global shared + this client's local parameters; with ``best``, ``global_params`` are the
        best round's and the client first loads that round (:meth:`restore_best`: its local
        parameters too), so one message evaluates the best round. With ``per_user``,
        ``(result, values)``: ``values`` is the trainer's ``last_per_user`` (each user's token and
        metric values, no interactions)."""
        loader = {"valid": self.valid_data, "test": self.test_data}.get(phase)
        if loader is None:
            raise ValueError(f"Client [{self.client_id}] has no {phase} data "
                             "(phase must be 'valid' or 'test', given to the Client).")
        if best:
            self.restore_best(global_params)
        else:
            self.set_parameters(global_params)
        result = self.trainer.evaluate(loader, load_best_model=False, show_progress=self.show_progress)
        return (result, self.trainer.last_per_user) if per_user else result

    # ---- the best round and the exported model ------------------------------------------------
    def mark_best(self, round_idx):
        """Remember round ``round_idx`` as the best: its local parameters (the shared ones are the
        server's), as :meth:`end_round` closed it, or the current ones when it did not (the mark
        may arrive with a later message)."""
        closed = self.closed if self.closed is not None and self.closed[0] == round_idx else None
        self.best_round, self.best_local = round_idx, dict(closed[1]) if closed else self.local_state()

    def end_round(self, round_idx, mark_best, name=None):
        """Close round ``round_idx``: keep its local parameters (for a later :meth:`mark_best`),
        :meth:`mark_best` when ``mark_best``, then :meth:`save_state` when ``name`` is given (one
        message instead of two)."""
        self.closed = (round_idx, self.local_state())
        if mark_best:
            self.mark_best(round_idx)
        if name:
            self.save_state(round_idx, name)

    def restore_best(self, params):
        """Load the best round: its shared ``params`` (sent by the server) and the local
        parameters :meth:`mark_best` kept."""
        self.set_parameters(params)
        if self.best_local is not None:
            self.load_local_state(self.best_local)

    def export(self, params, best_valid_score, verbose=True):
        """Save the best model (:meth:`restore_best` of ``params``) as a plugin checkpoint that
        ``load_data_and_model`` reads; returns its path."""
        self.restore_best(params)
        self.trainer.best_valid_score = best_valid_score
        self.trainer._save_checkpoint(-1 if self.best_round is None else self.best_round, verbose=verbose)
        return self.trainer.saved_model_file

    # ---- round checkpoints -------------------------------------------------------------------
    def state_file(self, name):
        """This client's round checkpoint for the run checkpoint ``name`` (without ``.pth``): in
        ``<name>.clients/`` beside it. A bare file name (what a Flower node gets) resolves in
        ``checkpoint_dir``; a path (the in-process server's, or a moved checkpoint's) is taken as
        it is, so the clients' folder always lies beside the round checkpoint."""
        path = Path(name)
        folder = path.parent if path.parent != Path(".") else self.checkpoint_dir
        return folder / f"{path.name}.clients" / f"{self.client_id}.pth"

    def save_state(self, round_idx, name):
        """Write what a resumed run needs from this client after round ``round_idx``
        (:meth:`private_state`, the best round's local parameters) to :meth:`state_file`."""
        self.state_file(name).parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"kind": "federated-client", "market": self.client_id, "round": round_idx,
                     **self.session_state()}, str(self.state_file(name)))

    def session_state(self):
        """What this client must keep between two messages when each runs in a fresh process
        (Flower's ClientApp): :meth:`private_state`, the best round, the shared names and the last
        closed round's local parameters (``closed``)."""
        return {"private": self.private_state(), "best_round": self.best_round,
                "best_local": self.best_local, "shared_names": list(self.shared_names),
                "closed": self.closed}

    def load_session_state(self, state):
        """Restore :meth:`session_state` output into a freshly built client of this market."""
        shared = set(state["shared_names"])
        self.keep_local([n for n in self.shared_names if n not in shared])
        self.load_private_state(state["private"])
        self.best_round, self.best_local = state["best_round"], state["best_local"]
        self.closed = state.get("closed")

    def load_state(self, name, round_idx, best_only=False, best_round=None):
        """Restore :meth:`save_state` output of round ``round_idx`` (``best_only``: just the best
        round's local parameters and the training loader's shuffling state, to reuse a finished
        run's federated stage: fine-tuning then draws what that run's fine-tuning drew, so an
        ablation differs from it by its switch alone). ``best_round`` is
        the run's best round: when it is ``round_idx`` itself, whose state was written before
        the round was known to be the best (its validation message closed it), the best local
        parameters are that round's."""
        path = self.state_file(name)
        if not path.exists():
            raise FileNotFoundError(f"market [{self.client_id}]: no client checkpoint {path} "
                                    "(it is written beside the run's round checkpoint).")
        state = load_checkpoint(str(path))
        if state.get("kind") != "federated-client" or state.get("market") != self.client_id:
            raise ValueError(f"{path} is not a client checkpoint of market [{self.client_id}].")
        if state["round"] != round_idx:
            raise ValueError(f"{path} is at round {state['round']}, the run's checkpoint at round "
                             f"{round_idx}: they must come from the same run.")
        if not best_only:
            self.load_private_state(state["private"])
        self.best_round, self.best_local = state["best_round"], state["best_local"]
        if best_round == round_idx != state["best_round"]:
            self.best_round, self.best_local = round_idx, dict(state["private"]["local"])
        if best_only:
            self.best_local = self._fitting(self.best_local)
            self.train_data.generator.set_state(state["private"]["train_rng"].to(torch.uint8).cpu())

    def _fitting(self, local):
        """The entries of ``local`` (``{name: tensor}``) this model holds with the same shapes. A
        finished stage reused by a model whose local-only parts differ (e.g. FeCoSR's market
        adapter at another ``adapter_rank``, which the federated stage does not train) leaves
        those at this model's initial values, and says so."""
        own = self.model.state_dict()
        fitting = {n: t for n, t in local.items() if n in own and own[n].shape == t.shape}
        fresh = sorted(n for n in local if n in own and n not in fitting)
        if fresh:
            getLogger().info(f"market [{self.client_id}]: the stage's local parameters {fresh} "
                             "have other shapes here; they start from this model's initial values.")
        return fitting

    def local_state(self):
        """The parameters that never leave the client, ``{name: tensor}`` (detached copies)."""
        return _detached(self.model.state_dict(), self.local_names)

    def load_local_state(self, state):
        """Load :meth:`local_state` output back into the model."""
        self.model.load_state_dict(state, strict=False)

    def private_state(self):
        """Everything a resumed run needs from this client (plain tensors and numbers only):
        local parameters, optimizer state, the training loader's shuffling RNG and SCAFFOLD's
        control variate."""
        return {
            "local": self.local_state(),
            "optimizer": self.trainer.optimizer.state_dict(),
            "train_rng": self.train_data.generator.get_state(),
            "control": dict(self.control),  # SCAFFOLD's c_i (empty otherwise)
        }

    def load_private_state(self, state):
        """Restore :meth:`private_state` output."""
        self.load_local_state(state["local"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.train_data.generator.set_state(state["train_rng"].to(torch.uint8).cpu())
        self.control = dict(state.get("control", {}))
