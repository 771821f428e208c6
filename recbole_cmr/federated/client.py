"""A federated client: one market's RecBole loaders, its own model, trainer and private state.

The contract maps one-to-one onto Flower's ``NumPyClient``/``ClientApp``::

    client.fit(global_params, round) -> (update, num_examples, metrics)
    client.evaluate(global_params, phase) -> RecBole result dict

Only ``update`` (named tensors), ``num_examples`` (an int), ``metrics`` (floats) and evaluation
results leave the client; its interactions (train, valid and test loaders), its non-shared
parameters and its optimizer state stay here.
"""

import numpy as np
import torch

from recbole_cmr.federated.strategy import select_shared


def _detached(state_dict, names):
    """``{name: detached copy}`` of ``names`` in ``state_dict``."""
    return {name: state_dict[name].detach().clone() for name in names}


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
        show_progress (bool): RecBole's per-epoch progress bars.
    """

    def __init__(self, client_id, trainer, train_data, valid_data=None, test_data=None,
                 shared=("*",), local=(), local_epochs=1, show_progress=False):
        self.client_id = client_id
        self.trainer = trainer
        self.model = trainer.model
        self.train_data = train_data
        self.valid_data = valid_data
        self.test_data = test_data
        self.local_epochs = local_epochs
        self.show_progress = show_progress
        state = self.model.state_dict()
        self.shared_names = select_shared(state, shared, local)
        self.local_names = [n for n in state if n not in set(self.shared_names)]
        self.num_examples = int(train_data._dataset.inter_num)
        # What RecBole's Trainer.fit does before its first epoch.
        trainer.eval_collector.data_collect(train_data)
        if (trainer.config["train_neg_sample_args"] or {}).get("dynamic", False):
            train_data.get_model(self.model)

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

    def fit(self, global_params, round, config=None):
        """Train ``local_epochs`` epochs from the global shared parameters.

        Args:
            global_params (dict[str, Tensor]): the server's shared parameters (not modified).
            round (int): 0-based round index (epoch ``round * local_epochs + e`` for RecBole).
            config (dict, optional): the strategy's instructions for this round (Flower's fit
                config); ``proximal_mu > 0`` adds FedProx's proximal term to the loss.

        Returns:
            tuple: ``(update, num_examples, metrics)``: the new *values* (not deltas) of the
            shared parameters, the number of training interactions (int) and ``{"loss": float}``,
            the mean over local epochs of RecBole's epoch loss (the sum of the batch losses).
        """
        self.set_parameters(global_params)
        mu = float((config or {}).get("proximal_mu", 0.0))
        loss_func = self.proximal_loss(global_params, mu) if mu > 0 else None
        losses = []
        for epoch in range(self.local_epochs):
            loss = self.trainer._train_epoch(
                self.train_data, round * self.local_epochs + epoch, loss_func=loss_func,
                show_progress=self.show_progress,
            )
            losses.append(sum(loss) if isinstance(loss, tuple) else loss)
        return self.get_parameters(), self.num_examples, {"loss": float(np.mean(losses))}

    def proximal_loss(self, global_params, mu):
        """The model's loss plus FedProx's ``mu / 2 * sum ||w - w_global||^2`` over the shared
        trainable parameters (a model returning a tuple of losses gets it as one more part)."""
        params = dict(self.model.named_parameters())
        anchors = [(params[n], global_params[n].detach().clone().to(params[n].device))
                   for n in self.shared_names if n in params]

        def loss(interaction):
            base = self.model.calculate_loss(interaction)
            proximal = mu / 2 * sum(((p - g) ** 2).sum() for p, g in anchors)
            return (*base, proximal) if isinstance(base, tuple) else base + proximal

        return loss

    def evaluate(self, global_params, phase="valid"):
        """RecBole's result on this client's own ``phase`` loader (``valid`` or ``test``) with the
        global shared + this client's local parameters."""
        loader = {"valid": self.valid_data, "test": self.test_data}.get(phase)
        if loader is None:
            raise ValueError(f"Client [{self.client_id}] has no {phase} data "
                             "(phase must be 'valid' or 'test', given to the Client).")
        self.set_parameters(global_params)
        return self.trainer.evaluate(
            loader, load_best_model=False, show_progress=self.show_progress
        )

    def local_state(self):
        """The parameters that never leave the client, ``{name: tensor}`` (detached copies)."""
        return _detached(self.model.state_dict(), self.local_names)

    def load_local_state(self, state):
        """Load :meth:`local_state` output back into the model."""
        self.model.load_state_dict(state, strict=False)

    def private_state(self):
        """Everything a resumed run needs from this client (plain tensors and numbers only):
        local parameters, optimizer state and the training loader's shuffling RNG."""
        return {
            "local": self.local_state(),
            "optimizer": self.trainer.optimizer.state_dict(),
            "train_rng": self.train_data.generator.get_state(),
        }

    def load_private_state(self, state):
        """Restore :meth:`private_state` output."""
        self.load_local_state(state["local"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.train_data.generator.set_state(state["train_rng"].to(torch.uint8).cpu())
