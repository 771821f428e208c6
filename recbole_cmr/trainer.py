"""Trainers: RecBole's own, with multi-market validation and weights-only checkpoints."""

import copy
import os
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from recbole.data.interaction import Interaction, cat_interactions
from recbole.evaluator import Collector as RecBoleCollector
from recbole.utils import (EvaluatorType, calculate_valid_score, get_local_time,
                           init_seed, set_color)

from recbole_cmr import __version__, resume
from recbole_cmr.evaluator import Evaluator  # also registers the plugin's metrics
from recbole_cmr.compat import checkpoint_safe, load_checkpoint, other_parameter_state
from recbole_cmr.data.dataloader import (SampledBatch, ScoreMask, first_rows, scores_from_one_encoding,
                                         shares_sequence)
from recbole_cmr.utils import matching, pattern_setting, save_atomic


class Collector(RecBoleCollector):
    """RecBole's evaluation ``Collector``; its ``get_data_struct`` calls ``.cpu()`` on every
    entry, so the int and Counter entries that ItemCoverage, GiniIndex, AveragePopularity and
    TailPercentage need (``data.num_items``, ``data.count_items``) crash RecBole 1.2.1. Here
    non-tensor entries are passed through as they are."""

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        """RecBole's, plus ``data.user``: the user of each row the metrics see (a labeled row for
        value metrics such as ``CTRGAUC``, a score row for ranking metrics), for per-user metrics
        and the per-user values (:func:`~recbole_cmr.evaluator.per_user_values`)."""
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        users = row_users(interaction, len(scores_tensor), self.config["USER_ID_FIELD"])
        if users is not None:
            self.data_struct.update_tensor("data.user", users)

    def get_data_struct(self):
        data = self.data_struct._data_dict
        plain = {k: v for k, v in data.items() if not isinstance(v, torch.Tensor)}
        for key in plain:
            del data[key]
        returned = super().get_data_struct()
        if "data.user" in self.data_struct:  # per evaluation, like RecBole's data.label
            del self.data_struct["data.user"]
        for key, value in plain.items():
            self.data_struct.set(key, value)
            returned.set(key, copy.deepcopy(value))
        return returned


def row_users(interaction, n_rows, uid_field):
    """The user of each of a batch's ``n_rows`` evaluated rows.

    Value metrics and full ranking score one row per interaction row; sampled ranking
    (``uni99``) scores one row per user, whose interaction rows (positives, then their sampled
    negatives) are consecutive.

    Args:
        interaction (Interaction): the batch.
        n_rows (int): the rows of the batch's scores (``[n_rows]`` or ``[n_rows, n_items]``).
        uid_field (str): ``USER_ID_FIELD``.

    Returns:
        torch.LongTensor | None: ``[n_rows]``, on the interaction's device; None when the batch
        has no user field or its users do not match the rows.
    """
    if uid_field not in interaction.columns:
        return None
    users = interaction[uid_field]
    if len(users) != n_rows:
        users = torch.unique_consecutive(users)
    return users if len(users) == n_rows else None


def macro_average(results):
    """Average each metric over markets: ``{market: {metric: v}}`` -> ``{metric: mean}``."""
    results = list(results.values())
    return OrderedDict(
        (metric, round(float(np.mean([r[metric] for r in results])), 6)) for metric in results[0]
    )


class MultiMarketTrainerMixin:
    """Adds to any RecBole trainer:

    * ``valid_data`` / ``eval_data`` may be a ``{market: loader}`` dict: every market is evaluated
      by RecBole's own ``evaluate`` and the valid score is the macro average over markets;
    * checkpoints hold plain data only (the settings, not RecBole's Config object) and load with
      ``torch.load(weights_only=True)``;
    * ``checkpoint_info``: what else the checkpoint should record (dataset, markets, ...);
    * ``learning_rate_decay``: inside ``fit``, every parameter group's learning rate is
      multiplied by ``lr_decay`` after each training epoch (PyTorch's ``StepLR`` with step 1;
      federated rounds, which call ``_train_epoch`` themselves, are not decayed);
    * sampled evaluation (``uni99``) of a sequential model encodes each user's sequence once
      (:meth:`_sampled_from_full_sort`), with RecBole's scores and metrics;
    * ``last_per_user``: after each ``evaluate``, what each user contributed to its metrics
      (:meth:`per_user`), shaped as its result (``{market: values}`` for a dict of loaders);
    * ``resume_file`` (``resume_dir``, see :mod:`recbole_cmr.resume`): ``fit`` keeps its state
      there at every epoch and continues from it when started again (a finished fit returns at
      once).
    """

    last_per_user = {}

    checkpoint_info = {}

    resume_file = None  # where fit keeps its resume state (resume_dir; see recbole_cmr.resume)

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = Collector(config)
        self.evaluator = Evaluator(config)
        self.lr_decay = check_lr_decay(config, "learning_rate_decay")
        self._in_fit = False

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False,
            callback_fn=None):
        self.best_valid_per_market = None
        if self.resume_file:
            finished = self._resume(train_data)
            if finished is not None:
                return finished
        self._in_fit = True
        self._first_epoch = self.start_epoch

        def remember_best(epoch_idx, valid_score):
            if self.cur_step == 0:  # early_stopping just recorded a new best
                self.best_valid_per_market = getattr(self, "_last_valid_per_market", None)
            if callback_fn:
                callback_fn(epoch_idx, valid_score)

        try:
            result = super().fit(train_data, valid_data, verbose, saved, show_progress, remember_best)
        finally:
            self._in_fit = False
        if self.resume_file:
            self._keep_state(train_data, self.epochs, finished=result)
        return result

    def _keep_state(self, train_data, epoch, finished=None):
        """Write the resume state (:mod:`recbole_cmr.resume`): the run as it is before training
        ``epoch`` (or, ``finished``: after ``fit``, which returned ``finished``)."""
        state = {
            "fingerprint": resume.fingerprint(self.config),
            "epoch": epoch,
            "finished": None if finished is None else checkpoint_safe(list(finished)),
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": checkpoint_safe(self.best_valid_result),
            "best_valid_per_market": checkpoint_safe(self.best_valid_per_market),
            "saved_model_file": self.saved_model_file,
            "state_dict": self.model.state_dict(),
            "other_parameter": other_parameter_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "rng": resume.rng_states(),
            "loader_rng": [g.get_state() for g in resume.loader_generators(train_data)],
        }
        save_atomic(state, self.resume_file)

    def _resume(self, train_data):
        """Take the state :meth:`_keep_state` left in ``resume_file``, if any: the fit continues
        from its epoch, or (a finished fit) ``fit``'s result is returned without training."""
        generators = resume.loader_generators(train_data)  # checked before any training
        state = resume.read_stage(self.config, self.resume_file)
        if state is None:
            return None
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state.get("other_parameter"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch, self.cur_step = state["epoch"], state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = state["best_valid_result"]
        self.best_valid_per_market = state["best_valid_per_market"]
        self.saved_model_file = state["saved_model_file"]
        resume.set_rng_states(state["rng"])
        for generator, kept in zip(generators, state["loader_rng"]):
            generator.set_state(kept.to(torch.uint8).cpu())
        markets = ", ".join(self.checkpoint_info.get("markets") or ["?"])
        if state["finished"] is not None:
            self.logger.info(f"resume_dir: market [{markets}] was trained to the end: taken from "
                             f"[{self.resume_file}], not trained again")
            return tuple(state["finished"])
        self.logger.info(f"resume_dir: market [{markets}] continues from epoch {self.start_epoch} "
                         f"([{self.resume_file}])")
        return None

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self._in_fit and self.resume_file and epoch_idx > self._first_epoch:
            self._keep_state(train_data, epoch_idx)  # the run as the epoch before left it
        self._loss_position = [epoch_idx, 0]  # epoch, batch: for _check_nan's message
        loss = super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        if self._in_fit and self.lr_decay != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.lr_decay
        return loss

    def _check_nan(self, loss):
        """Stop on a non-finite training loss (RecBole checks NaN only; Inf too here), naming the
        market, epoch and batch."""
        epoch, batch = getattr(self, "_loss_position", ["?", 0])
        if not torch.isfinite(loss).all():
            markets = self.checkpoint_info.get("markets") or ["?"]
            raise ValueError(
                f"Training loss is {float(loss.detach().sum())} in market [{', '.join(markets)}], "
                f"epoch {epoch}, batch {batch}: lower learning_rate, set clip_grad_norm, or check "
                "the data and model settings of that market."
            )
        self._loss_position = [epoch, batch + 1]

    def _valid_epoch(self, valid_data, show_progress=False):
        if not isinstance(valid_data, Mapping):
            return super()._valid_epoch(valid_data, show_progress=show_progress)
        per_market = self.evaluate(valid_data, load_best_model=False, show_progress=show_progress)
        self._last_valid_per_market = per_market
        macro = macro_average(per_market)
        return calculate_valid_score(macro, self.valid_metric), macro

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """RecBole's ``evaluate``; a dict of loaders gives ``{market: result}``."""
        if load_best_model:
            self.load_best_model(model_file)
        if isinstance(eval_data, Mapping):
            results, per_user = {}, {}
            for market, loader in eval_data.items():
                results[market] = self._evaluate_market(loader, show_progress)
                per_user[market] = self.last_per_user
            self.last_per_user = per_user
            return results
        return self._evaluate_market(eval_data, show_progress)

    def per_user(self, loader):
        """The evaluator's per-user values of its last evaluation, of ``loader``'s rows, with each
        row's user token (the market's original user id, so two runs pair by user).

        Returns:
            dict: ``{"user": [token, ...], "ndcg@10": [value, ...], ...}``: ``[n_rows]`` lists
            (float32 values; ``label`` and ``score`` per row for value metrics; plain data, so
            results compare with ``==`` and cross a message as they are), or ``{}``.
        """
        values = {k: v.tolist() for k, v in self.evaluator.last_per_user.items()}
        if values:
            dataset = loader._dataset
            tokens = getattr(dataset, "market_tokens", dataset.id2token)  # a plain RecBole dataset: id2token
            values["user"] = tokens(dataset.uid_field, values["user"]).tolist()
        return values

    def _evaluate_market(self, loader, show_progress):
        """RecBole's ``evaluate`` of one market's loader, with the catalogue-size metrics
        (ItemCoverage, GiniIndex, AveragePopularity, TailPercentage) over that market: its
        catalogue (``data.num_items``, padding included as RecBole counts it) and its training
        item counts (``data.count_items``), not the shared item table or pooled counts."""
        dataset = getattr(loader, "_dataset", None)
        train = getattr(dataset, "market_train", None)
        if train is not None:
            struct, register = self.eval_collector.data_struct, self.eval_collector.register
            if register.need("data.num_items"):
                struct.set("data.num_items", len(dataset.market_catalogue) + 1)
            if register.need("data.count_items"):
                struct.set("data.count_items", train.item_counter)
        result = super().evaluate(loader, load_best_model=False, show_progress=show_progress)
        self.last_per_user = self.per_user(loader)
        return result

    def _full_sort_batch_eval(self, batched_data):
        """RecBole's, with a market loader's :class:`ScoreMask` (foreign items, input
        sequences) applied to the scores on their device."""
        interaction, history_index, positive_u, positive_i = batched_data
        if not isinstance(history_index, ScoreMask):
            return super()._full_sort_batch_eval(batched_data)
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(
            (interaction, None, positive_u, positive_i))
        return interaction, history_index.fill_(scores), positive_u, positive_i

    def _neg_sample_batch_eval(self, batched_data):
        """RecBole's; a sequential model ranking sampled candidates (``uni99``, ``pop100``)
        scores them from one encoding per user: :meth:`_sampled_from_full_sort`. Otherwise a
        :class:`~recbole_cmr.data.dataloader.SampledBatch` of ``eval_batch_size`` users goes
        through RecBole's ``predict`` path in parts of ``eval_batch_size`` rows, as RecBole's
        own batches hold."""
        scores = self._sampled_from_full_sort(batched_data)
        if scores is not None:
            if isinstance(batched_data, SampledBatch):
                return (batched_data.user_rows(), scores, batched_data.positive_u(),
                        batched_data.positive_i())
            interaction, _, positive_u, positive_i = batched_data
            return interaction, scores, positive_u, positive_i
        if not isinstance(batched_data, SampledBatch):
            return super()._neg_sample_batch_eval(batched_data)
        times = batched_data.loader.times * int(batched_data.counts.max())
        parts = [super(MultiMarketTrainerMixin, self)._neg_sample_batch_eval(part.expand())
                 for part in batched_data.parts(max(1, self.config["eval_batch_size"] // times))]
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [len(scores) for _, scores, _, _ in parts])[:-1]
        return (cat_interactions([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] + int(o) for p, o in zip(parts, offsets)]),
                torch.cat([p[3] for p in parts]))

    def _sampled_from_full_sort(self, batched_data):
        """RecBole's score matrix of a sampled-evaluation batch with the candidates' scores
        gathered from ``full_sort_predict`` on each user's first row: one sequence encoding per
        user instead of one per candidate (RecBole calls ``predict`` on every row). The model's
        own scores, unmasked (the trainer's full-ranking masks are not applied), as ``predict``
        gives them (to float rounding).

        Args:
            batched_data (SampledBatch | tuple): a market loader's batch, or a
                ``NegSampleEvalDataLoader`` batch ``(interaction [n_rows], row_idx [n_rows],
                positive_u, positive_i)``.

        Returns:
            torch.Tensor | None: ``[n_users, n_items]``: the candidates' scores at ``(row_idx,
            item_id)``, ``-inf`` elsewhere, on the model's device; None (RecBole's path) for value
            metrics, a model that :func:`scores_from_one_encoding` rules out, a
            ``full_sort_predict`` that raises ``NotImplementedError``, or a user whose rows hold
            different sequences.
        """
        if (self.config["eval_type"] != EvaluatorType.RANKING
                or not scores_from_one_encoding(type(self.model))):
            return None
        if isinstance(batched_data, SampledBatch):
            if not batched_data.one_sequence_per_user():
                return None
            n_users, users = batched_data.n_users, batched_data.user_rows()
            row_idx, items = batched_data.candidates()
        else:
            interaction, row_idx, positive_u, _ = batched_data
            if row_idx is None:
                return None
            n_users = int(positive_u[-1]) + 1
            first = first_rows(row_idx, n_users)
            if not shares_sequence(interaction, row_idx, first, self.config):
                return None
            users, items = interaction[first], interaction[self.config["ITEM_ID_FIELD"]]
        try:
            full = self.model.full_sort_predict(users.to(self.device))
        except NotImplementedError:
            return None
        full = full.view(n_users, -1)
        if full.shape[1] != self.tot_item_num:
            return None
        rows, items = row_idx.to(full.device), items.to(full.device)
        scores = torch.full((n_users, self.tot_item_num), float("-inf"), device=full.device)
        scores[rows, items] = full[rows, items]
        return scores

    def load_best_model(self, model_file=None):
        """Load the model weights of a checkpoint (default: this trainer's best)."""
        checkpoint_file = model_file or self.saved_model_file
        if model_file is None and not os.path.exists(checkpoint_file) and \
                not np.isfinite(self.best_valid_score):
            markets = ", ".join(self.checkpoint_info.get("markets") or ["?"])
            raise ValueError(
                f"No epoch of market [{markets}] validated with a finite {self.valid_metric} (it "
                "was NaN every time, e.g. AUC of a valid split whose labels are all 0 or all 1), "
                "so there is no best model to test: use a larger valid split or another "
                "valid_metric.")
        checkpoint = load_checkpoint(checkpoint_file, map_location=self.device)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.logger.info(
            set_color("Loading model structure and parameters from ", "blue") + checkpoint_file
        )

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "recbole_cmr": __version__,
            "model": self.config["model"],
            "config": checkpoint_safe(self.config.external_config_dict),
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "state_dict": self.model.state_dict(),
            "other_parameter": other_parameter_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            **checkpoint_safe(self.checkpoint_info),
        }
        save_atomic(state, saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def resume_checkpoint(self, resume_file):
        """Continue training from a recbole_cmr checkpoint (weights, optimizer, epoch)."""
        resume_file = str(resume_file)
        self.saved_model_file = resume_file
        checkpoint = load_checkpoint(resume_file, map_location=self.device)
        if checkpoint["model"].lower() != self.config["model"].lower():
            raise ValueError(
                f"Checkpoint [{resume_file}] holds a {checkpoint['model']} model, "
                f"not {self.config['model']}."
            )
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")


def check_lr_decay(config, key):
    """``config[key]`` as a per-epoch learning-rate factor in (0, 1] (None: 1.0, no decay)."""
    value = config[key]
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{key} must be a number in (0, 1] (the learning rate's factor per epoch; "
                         f"1 = constant), not {value!r}.")
    return float(value)


class MultiTaskTrainerMixin:
    """Evaluation of a multi-task model (``model.multi_task``, e.g. MMoE): RecBole's Evaluator
    runs once per task, with the model predicting that task (``model.eval_task``) and the task's
    label (``model.task_labels``) as RecBole's label, so each market's result holds
    ``<metric>_<task>`` for every task and ``<metric>``, the mean over tasks (``valid_metric:
    AUC`` selects on the macro AUC over tasks). Its ``last_per_user`` holds each task's values
    as ``<key>_<task>`` (``label_click``, ``score_click``, ...) beside ``user``."""

    def _evaluate_market(self, loader, show_progress):
        per_task, per_user = {}, {}
        try:
            for t, task in enumerate(self.model.task_names):
                self.model.eval_task = t
                per_task[task] = super()._evaluate_market(loader, show_progress)
                per_user.update((k if k == "user" else f"{k}_{task}", v)
                                for k, v in self.last_per_user.items())
        finally:
            self.model.eval_task = 0
        self.last_per_user = per_user
        metrics = list(next(iter(per_task.values())))
        decimals = self.config["metric_decimal_place"]
        result = OrderedDict(
            (m, round(float(np.mean([r[m] for r in per_task.values()])), decimals)) for m in metrics)
        for task, res in per_task.items():
            result.update((f"{m}_{task}", v) for m, v in res.items())
        return result

    def _neg_sample_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._neg_sample_batch_eval(batched_data)
        label = self.model.task_labels(interaction)[:, self.model.eval_task]
        interaction = Interaction({**interaction.interaction, self.config["LABEL_FIELD"]: label})
        return interaction, scores, positive_u, positive_i


@lru_cache(maxsize=None)
def plugin_trainer(trainer_class, multi_task=False):
    """``trainer_class`` (a RecBole trainer) with :class:`MultiMarketTrainerMixin` mixed in (and
    :class:`MultiTaskTrainerMixin` for multi-task models)."""
    mixins = (MultiTaskTrainerMixin,) if multi_task else ()
    if not issubclass(trainer_class, MultiMarketTrainerMixin):
        mixins += (MultiMarketTrainerMixin,)
    if not mixins:
        return trainer_class
    return type(trainer_class.__name__, (*mixins, trainer_class), {})


def checkpoint_file(config, tag):
    """``<checkpoint_dir>/<model>-<dataset>-<tag>-<time>-<pid>.pth`` (``tag``: a market, ``pooled``,
    ...). The process id keeps runs started in the same second (parallel ablations) apart."""
    name = f"{config['model']}-{config['dataset']}-{tag}-{get_local_time()}-{os.getpid()}.pth"
    return os.path.join(config["checkpoint_dir"], name)


def new_market_trainer(config, dataset, tag, markets):
    """Seed, then build the model on ``dataset`` and its trainer, as RecBole's run_recbole does.

    Every call with the same seed gives the same initial weights.

    Returns:
        tuple: ``(model, trainer)``; the trainer checkpoints to :func:`checkpoint_file`.
    """
    from recbole_cmr.utils import get_model, get_trainer

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, dataset).to(config["device"])
    check_user_patterns(config, list(model.state_dict()))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    _set_checkpointing(trainer, config, tag, markets)
    return model, trainer


def check_user_patterns(config, names):
    """Check the pattern settings this run uses against the model's parameter ``names``
    (:func:`~recbole_cmr.utils.pattern_setting`): ``fed_*_params`` when federated,
    ``finetune_params`` when fine-tuning."""
    mode = config["train_mode"]
    keys = ["fed_shared_params", "fed_local_params"] if mode == "federated" else []
    if mode == "transfer" or (mode in ("federated", "pooled") and config["finetune"]):
        keys.append("finetune_params")
    for key in keys:
        pattern_setting(config, key, names)


def _set_checkpointing(trainer, config, tag, markets, **info):
    """Where ``trainer`` checkpoints, and what its checkpoints record besides the weights."""
    trainer.saved_model_file = checkpoint_file(config, tag)
    trainer.resume_file = resume.stage_file(config, tag)
    trainer.checkpoint_info = {
        "dataset": config["dataset"],
        "data_path": os.path.dirname(os.path.abspath(config["data_path"])),
        "train_mode": config["train_mode"],
        "markets": list(markets),
        **info,
    }


def finetune_trainer(config, model, tag, markets):
    """A trainer that fine-tunes a pretrained ``model`` on one market.

    The model enters its ``finetune`` stage (``set_stage``, if it has one); parameters matching
    ``finetune_params`` (e.g. a market adapter) learn at ``learning_rate``, the rest at
    ``learning_rate * finetune_lr_scale`` (0 freezes them). The optimizer starts fresh.
    """
    from recbole_cmr.utils import get_trainer

    if hasattr(model, "set_stage"):
        model.set_stage("finetune")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    _set_checkpointing(trainer, config, tag, markets, stage="finetune")
    trainer.optimizer = trainer._build_optimizer(params=_finetune_groups(config, model))
    return trainer


def keep_pretrained(trainer, valid_data, saved=True, show_progress=False):
    """Make the model as it is before fine-tuning the trainer's best so far.

    RecBole's ``fit`` then replaces it only with an epoch that validates higher, and (``saved``)
    the checkpoint that ``evaluate`` loads is the pretrained model until one does (without
    ``saved`` RecBole tests the last epoch, as it always does).

    Returns:
        float: the pretrained model's valid score.
    """
    score, result = trainer._valid_epoch(valid_data, show_progress=show_progress)
    trainer.best_valid_score, trainer.best_valid_result = score, result
    if saved:
        trainer._save_checkpoint(-1, verbose=False)
    trainer.logger.info(f"pretrained model: valid score {score:.6f}, kept unless fine-tuning "
                        "validates higher")
    return score


def _finetune_groups(config, model):
    """Optimizer parameter groups: adaptation parameters at full, the rest at scaled lr."""
    names = dict(model.named_parameters())
    own = set(matching(list(names), config["finetune_params"] or []))
    scale = config["finetune_lr_scale"]
    lr = config["learning_rate"]
    groups = [{"params": [names[n] for n in names if n in own], "lr": lr}]
    rest = [names[n] for n in names if n not in own]
    if scale:
        groups.append({"params": rest, "lr": lr * scale})
    else:
        for param in rest:
            param.requires_grad_(False)
    return [g for g in groups if g["params"]]
