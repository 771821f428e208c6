"""Multi-market datasets: one RecBole dataset per market over one shared item id space.

Layout of a multi-market dataset folder ``<data_path>/<dataset>/``::

    <market>.inter      one RecBole atomic interaction file per market (users are per market)
    <dataset>.item      optional, shared by all markets (item text and features)
    <market>.user       optional, per market
    <dataset>.kg        knowledge-aware models: the knowledge graph, shared by all markets
    <dataset>.link      knowledge-aware models: item -> entity, shared by all markets

Each market is read, filtered and remapped by the dataset class RecBole picks for the model
(``<Model>Dataset`` if RecBole has one, else the model type's: ``Dataset``, ``SequentialDataset``,
``KnowledgeBasedDataset``), with the market's files mixed in (:func:`market_dataset_class`);
then item ids are re-numbered so that one item token has one internal id in every market (and, for
pooled training, user ids are made disjoint across markets). With a single market the ids are
exactly those plain RecBole assigns.

A knowledge graph describes items, not a market's users, so one ``.kg`` and one ``.link`` serve
every market (as the shared ``.item`` file does). Each market merges item and entity ids as
RecBole does (entity id = item id; the entities no item of the market links to follow); with
shared ids the entities are then re-numbered over the shared item ids, so one entity has one id in
every market and the relations (one ``.kg``) have the same ids everywhere.
"""

import os
from functools import cached_property
from logging import getLogger

import numpy as np
import pandas as pd
import torch
from recbole.data import dataset as recbole_datasets
from recbole.data.dataset import (
    Dataset,
    DIENDataset,
    GRU4RecKGDataset,
    KnowledgeBasedDataset,
    KSRDataset,
    SequentialDataset,
)
from recbole.utils import FeatureSource, FeatureType, ModelType, set_color

from recbole_cmr.data import entity, vocabulary

PAD = "[PAD]"
# The RecBole types read as numbers: a value of them that is not a number fails the read.
NUMERIC_TYPES = (FeatureType.FLOAT.value, FeatureType.FLOAT_SEQ.value)


class MarketDatasetMixin:
    """One market: ``<market>.inter`` (and ``<market>.user``) with the shared ``<dataset>.item``."""

    # Fields whose tokens pooled training prefixed with ``<market>:`` to keep markets disjoint.
    prefixed_fields = frozenset()

    def __init__(self, config, market):
        self.market = market
        super().__init__(config)

    def market_tokens(self, field, ids):
        """The market's own tokens of ``ids`` of token field ``field`` (``[n]`` ids -> ``[n]``
        tokens): ``id2token``, without the ``<market>:`` prefix pooled training gives user ids
        and ``market_private_fields``, so a pooled run's users pair with another run's."""
        tokens = self.id2token(field, ids)
        if field not in self.prefixed_fields:
            return tokens
        cut = len(self.market) + 1
        return np.array([t[cut:] for t in np.atleast_1d(tokens)], dtype=object).reshape(np.shape(tokens))

    def _load_data(self, token, dataset_path):
        field = self.config["scenario_field"]
        self._load_inter_feat(token if field else self.market, dataset_path)
        if field:
            self._keep_scenario(field)
        self.user_feat = self._load_user_or_item_feat(
            token if field else self.market, dataset_path, FeatureSource.USER, "uid_field"
        )
        if field and self.user_feat is not None:  # the market's own users, as a <market>.user
            users = self.inter_feat[self.uid_field].unique()
            self.user_feat = self.user_feat[self.user_feat[self.uid_field].isin(users)]
            self.user_feat = self.user_feat.reset_index(drop=True)
        own_items = os.path.isfile(os.path.join(dataset_path, f"{self.market}.item"))
        self.item_feat = self._load_user_or_item_feat(
            self.market if own_items else token, dataset_path, FeatureSource.ITEM, "iid_field"
        )
        self._load_additional_feat(token, dataset_path)

    def _load_feat(self, filepath, source):
        """RecBole's ``_load_feat``; where it fails, a value of a numeric column that is not a
        number is reported as one ``ValueError`` naming the file, line, field and value (the file
        is scanned again only then)."""
        try:
            return super()._load_feat(filepath, source)
        except ValueError:
            bad = self._non_numeric_value(filepath, source)
            if bad is None:
                raise
        raise bad

    def _non_numeric_value(self, filepath, source):
        """The error for the first value of the loaded numeric columns of ``filepath`` (per
        ``load_col`` / ``unload_col`` of ``source``) that is not a number, or None."""
        load_col, unload_col = self._get_load_and_unload_col(source)
        encoding = self.config["encoding"]
        header = atomic_header(filepath, self.config["field_separator"], encoding)
        columns = {f"{field}:{ftype}": ftype for field, ftype in header.items()
                   if ftype in NUMERIC_TYPES and (load_col is None or field in load_col)
                   and (unload_col is None or field not in unload_col)}
        return non_numeric_value(filepath, columns, self.config["field_separator"],
                                 self.config["seq_separator"], encoding)

    def _keep_scenario(self, field):
        """``scenario_field``: keep this market's rows of the shared file(s), then drop the field
        (constant within a market). Benchmark files keep their sizes per split."""
        values = self.inter_feat[field].astype(str).values
        keep = values == self.market
        if self.benchmark_filename_list is not None:
            split = np.repeat(np.arange(len(self.file_size_list)), self.file_size_list)
            self.file_size_list = np.bincount(split[keep], minlength=len(self.file_size_list)).tolist()
        self.inter_feat = self.inter_feat[keep].reset_index(drop=True)
        self._del_col(self.inter_feat, field)

    def __str__(self):
        return set_color(f"[market {self.market}] ", "pink") + super().__str__()

    def field_group(self, field):
        """The fields RecBole remaps together with ``field`` (its alias group, else itself)."""
        for fields in self.alias.values():
            if field in fields:
                return list(fields)
        return [field]

    def remap_to_global(self, field, lut, global_tokens, global_token_id):
        """Re-number the token field ``field`` and its aliases with ``lut`` (local id -> global id).

        Args:
            field (str): a token or token_seq field (user id, item id or any feature).
            lut (np.ndarray): shape ``[num(field)]``, ``lut[0] == 0`` (padding).
            global_tokens (np.ndarray): shape ``[n_global]``, token of each global id.
            global_token_id (dict): token -> global id.
        """
        for f in self.field_group(field):
            for feat in self.field2feats(f):
                if f not in feat:  # e.g. the entity field, a symbol of no table
                    continue
                if self.field2type[f] == FeatureType.TOKEN:
                    feat[f] = lut[feat[f].values.astype(np.int64)]
                else:
                    feat[f] = [lut[np.asarray(seq, dtype=np.int64)] for seq in feat[f].values]
            self.field2id_token[f] = global_tokens
            self.field2token_id[f] = global_token_id
            if f in self._preloaded_weight:  # preload_weight: rows follow the ids
                self._preloaded_weight[f] = _remap_rows(self._preloaded_weight[f], lut,
                                                        len(global_tokens))
        if field in (self.uid_field, self.iid_field):
            self._reindex_feat_table(field, len(global_tokens))

    def _reindex_feat_table(self, field, n_global):
        """Give the user/item feature table one row per global id (missing rows filled)."""
        name = "user_feat" if field == self.uid_field else "item_feat"
        table = getattr(self, name)
        if table is None:
            return
        table = table[table[field] != 0]
        full = pd.DataFrame({field: np.arange(n_global)})
        setattr(self, name, pd.merge(full, table, on=field, how="left"))
        self._fill_nan()

    @property
    def item_text_embedding(self):
        """Item text embeddings over the global item ids, ``[item_num, dim]`` (cached on disk)."""
        return item_text_embedding(self.config, self.field2id_token[self.iid_field])

    @property
    def item_ids(self):
        """Sorted unique internal ids of the items that occur in this market, shape ``[n]``."""
        return np.unique(np.asarray(self.inter_feat[self.iid_field]))

    def kg_fields(self):
        """The fields whose ids a knowledge graph fixes (none here; see
        :class:`MarketKnowledgeMixin`): the markets do not share them by the plain union."""
        return []


def _remap_rows(matrix, lut, n_global):
    """``matrix`` (``[num_local, ...]``, row = local id) with its rows at ``lut``'s global ids:
    ``[n_global, ...]``, rows of ids the market lacks zero (as RecBole's missing tokens)."""
    rows = np.zeros((n_global, *matrix.shape[1:]), dtype=matrix.dtype)
    rows[lut] = matrix
    return rows


class MarketKnowledgeMixin(MarketDatasetMixin):
    """One market of a knowledge-aware dataset: the market's interactions with the dataset's
    ``<dataset>.kg`` and ``<dataset>.link``, shared by all markets.

    RecBole merges item and entity ids per market (entity id = item id for every item; the
    entities no item of the market links to follow). :meth:`share_entities` re-numbers them over
    the markets' shared item ids.

    Attributes:
        entity_slot_items (np.ndarray): ``[item_num]`` (RecBole's ids): the item token of each of
            the first ``item_num`` entity ids.
    """

    def __init__(self, config, market):
        super().__init__(config, market)
        self.entity_slot_items = self.field2id_token[self.iid_field]

    def _load_data(self, token, dataset_path):
        super()._load_data(token, dataset_path)
        for suffix in ("kg", "link"):
            path = os.path.join(dataset_path, f"{token}.{suffix}")
            if not os.path.isfile(path):
                raise ValueError(
                    f"Model [{self.config['model']}] is knowledge-aware: it needs {path}, the "
                    f"dataset's .{suffix} file shared by all markets (RecBole's atomic format).")
        self.kg_feat = self._load_kg(token, dataset_path)
        self.item2entity, self.entity2item = self._load_link(token, dataset_path)

    def kg_fields(self):
        """The entity fields (``entity_id`` and its aliases: head, tail, ...) and the relation
        fields."""
        return [self.entity_field, *self.field_group(self.head_entity_field),
                *self.field_group(self.relation_field)]

    def kg_entities(self):
        """Tokens of the market's entities of the ``.kg`` (those its items link to, then the
        others), shape ``[n]``; not the virtual entities of unlinked items."""
        tokens = self.field2id_token[self.entity_field]
        return np.concatenate([list(self.item2entity.values()), tokens[len(self.entity_slot_items):]])

    def share_entities(self, item_token_id, entity_token_id, entity_tokens):
        """Re-number the entity fields over the shared item ids: an item's entity id is its
        shared item id, another entity's is ``entity_token_id``'s.

        Args:
            item_token_id (dict): item token -> shared item id.
            entity_token_id (dict): entity token -> shared entity id (every entity of the ``.kg``;
                a linked entity's id is its item's).
            entity_tokens (np.ndarray): ``[n_entities]``, the token of each shared entity id.
        """
        tokens = self.field2id_token[self.entity_field]
        slots = len(self.entity_slot_items)
        # an item slot whose item has no shared id (item_vocabulary lacks it) keeps its entity
        lut = np.array([item_token_id[t] if t in item_token_id else entity_token_id.get(e, 0)
                        for t, e in zip(self.entity_slot_items, tokens)]
                       + [entity_token_id[e] for e in tokens[slots:]], dtype=np.int64)
        token_id = {t: i for i, t in enumerate(entity_tokens)}
        for field in (self.head_entity_field, self.entity_field):
            self.remap_to_global(field, lut, entity_tokens, token_id)


class MarketDataset(MarketDatasetMixin, Dataset):
    """One market for general and context-aware models."""


class MarketSequentialDataset(MarketDatasetMixin, SequentialDataset):
    """One market for sequential models."""


class MarketKnowledgeBasedDataset(MarketKnowledgeMixin, KnowledgeBasedDataset):
    """One market for knowledge-aware models (RecBole's ``KnowledgeBasedDataset``)."""


class MarketDIENDataset(MarketDatasetMixin, DIENDataset):
    """One market for DIEN: RecBole's ``DIENDataset`` draws each row's negative item (``[N]``
    item ids, ``neg_item_list``) over the market's own ids when loading; they follow the shared
    item ids."""

    def remap_to_global(self, field, lut, global_tokens, global_token_id):
        super().remap_to_global(field, lut, global_tokens, global_token_id)
        if self.iid_field in self.field_group(field):
            self.neg_item_list = torch.as_tensor(lut)[self.neg_item_list]


class MarketGRU4RecKGDataset(MarketKnowledgeMixin, GRU4RecKGDataset):
    """One market for GRU4RecKG (RecBole's ``GRU4RecKGDataset``: sequential and knowledge-based)."""


class MarketKSRDataset(MarketKnowledgeMixin, KSRDataset):
    """One market for KSR (RecBole's ``KSRDataset``: sequential and knowledge-based)."""


# RecBole's dataset class -> its per-market version.
MARKET_DATASETS = {
    Dataset: MarketDataset,
    SequentialDataset: MarketSequentialDataset,
    KnowledgeBasedDataset: MarketKnowledgeBasedDataset,
    DIENDataset: MarketDIENDataset,
    GRU4RecKGDataset: MarketGRU4RecKGDataset,
    KSRDataset: MarketKSRDataset,
}
# RecBole's create_dataset: the dataset class of a model type without a <Model>Dataset.
TYPE_DATASETS = {
    ModelType.GENERAL: Dataset,
    ModelType.SEQUENTIAL: SequentialDataset,
    ModelType.CONTEXT: Dataset,
    ModelType.KNOWLEDGE: KnowledgeBasedDataset,
    ModelType.TRADITIONAL: Dataset,
    ModelType.DECISIONTREE: Dataset,
}


def item_text_embedding(config, item_tokens):
    """Sentence embedding of the text of ``item_tokens`` (``[PAD]`` first): ``[len, dim]``.

    Read from ``<data_path>/<dataset>.item`` (fields ``item_text_fields``, every text field if
    unset), encoded with ``text_encoder`` in batches and cached on disk under ``text_cache_dir``.
    """
    from recbole_cmr.data.text import item_text_embeddings, read_item_text

    item_file = os.path.join(config["data_path"], f"{config['dataset']}.item")
    if not os.path.isfile(item_file):
        raise ValueError(f"Dataset [{config['dataset']}] has no item text: {item_file} does not exist.")
    texts = read_item_text(item_file, config["item_text_fields"], config["ITEM_ID_FIELD"])
    return item_text_embeddings(
        item_tokens,
        texts,
        encoder=config["text_encoder"],
        cache_dir=config["text_cache_dir"],
        batch_size=config["text_batch_size"],
        show_progress=config["show_progress"],
    )


def recbole_dataset_class(config):
    """The dataset class RecBole's ``create_dataset`` picks: ``recbole.data.dataset.<Model>Dataset``
    if it exists, else the one of ``MODEL_TYPE``."""
    own = getattr(recbole_datasets, f"{config['model']}Dataset", None)
    return own if own is not None else TYPE_DATASETS[config["MODEL_TYPE"]]


def market_dataset_class(config):
    """The per-market version of the dataset class RecBole picks for ``config['model']``."""
    recbole_class = recbole_dataset_class(config)
    if recbole_class not in MARKET_DATASETS:
        raise ValueError(
            f"RecBole loads model [{config['model']}] with its {recbole_class.__name__}, which "
            f"recbole_cmr has no per-market version of (it has: "
            f"{sorted(c.__name__ for c in MARKET_DATASETS)}): run it with RecBole's own quick start.")
    return MARKET_DATASETS[recbole_class]


def atomic_header(path, field_separator="\t", encoding="utf-8"):
    """Read and check the typed header of a RecBole atomic file.

    Returns:
        dict: field name -> FeatureType value (``token``, ``float``, ...).

    Raises:
        ValueError: a column lacks ``:type`` or has an unknown type.
    """
    with open(path, "r", encoding=encoding) as f:
        header = f.readline().rstrip("\r\n")
    types = {t.value for t in FeatureType}
    fields = {}
    for column in header.split(field_separator):
        name, _, ftype = column.partition(":")
        if not name or ftype not in types:
            raise ValueError(
                f"{path}: malformed header column [{column}]: every column must be "
                f"`name:type` with type in {sorted(types)} (e.g. user_id:token), separated by "
                f"{field_separator!r}. Header read: [{header}]"
            )
        fields[name] = ftype
    return fields


def non_numeric_value(path, columns, field_separator, seq_separator, encoding):
    """The error for the first value in ``columns`` of atomic file ``path`` that RecBole cannot
    read as a number: a ``float`` that pandas does not parse, or a piece of a ``float_seq`` (split
    by ``seq_separator``, as RecBole splits it) that ``float`` does not. Empty and NA values are
    missing values, not errors.

    Args:
        path (str): the atomic file.
        columns (dict): header column (``name:type``) -> type (``float`` or ``float_seq``).

    Returns:
        ValueError | None: naming the file, the line (the header is line 1), the column and the
        value; None if every value is a number.
    """
    if not columns:
        return None
    frame = pd.read_csv(path, delimiter=field_separator, usecols=list(columns), dtype=str,
                        encoding=encoding, engine="python", skip_blank_lines=False)
    found = []
    for column, ftype in columns.items():
        values = frame[column]
        if ftype == FeatureType.FLOAT.value:
            bad = values.notna() & pd.to_numeric(values, errors="coerce").isna()
        else:
            bad = values.fillna("").map(lambda v: _non_float(v, seq_separator) is not None)
        rows = np.flatnonzero(bad.to_numpy())
        if len(rows):
            found.append((int(rows[0]), column, ftype, values.iloc[rows[0]]))
    if not found:
        return None
    row, column, ftype, value = min(found, key=lambda f: f[0])
    what = repr(value)
    if ftype == FeatureType.FLOAT_SEQ.value:
        what = (f"{_non_float(value, seq_separator)!r} in {value!r} (a float_seq holds numbers "
                f"separated by seq_separator {seq_separator!r})")
    return ValueError(f"{path}, line {row + 2}, field [{column}]: {what} is not a number; fix or "
                      "remove the row.")


def _non_float(value, seq_separator):
    """The first piece of the float_seq ``value`` that is not a number, or None."""
    for piece in filter(None, value.split(seq_separator)):
        try:
            float(piece)
        except ValueError:
            return piece
    return None


def inter_file_suffix(config):
    """``".inter"``, or ``".<first benchmark file>.inter"`` with RecBole's ``benchmark_filename``
    (``<market>.train.inter``, ``<market>.valid.inter``, ``<market>.test.inter``)."""
    files = config["benchmark_filename"]
    return f".{files[0]}.inter" if files else ".inter"


def market_inter_files(config, market):
    """The interaction files of ``market``: ``[<market>.inter]`` or one per benchmark file
    (with ``scenario_field``, the dataset's shared files)."""
    files = config["benchmark_filename"]
    token = config["dataset"] if config["scenario_field"] else market
    names = [f"{token}.{f}.inter" for f in files] if files else [f"{token}.inter"]
    return [os.path.join(config["data_path"], n) for n in names]


def item_file(config, market):
    """``<market>.item`` when the dataset has one (e.g. an entity's specific item fields), else
    the shared ``<dataset>.item``."""
    own = os.path.join(config["data_path"], f"{market}.item")
    return own if os.path.isfile(own) else os.path.join(config["data_path"], f"{config['dataset']}.item")


def discover_markets(data_path, suffix=".inter"):
    """Markets of a dataset folder: the stems of its ``<market><suffix>`` files, sorted."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(
            f"Dataset folder [{data_path}] does not exist. Set `data_path` (the parent folder) and "
            "`dataset` (the folder name) so that <data_path>/<dataset>/<market>.inter exist."
        )
    markets = sorted(
        f[: -len(suffix)]
        for f in os.listdir(data_path)
        if f.endswith(suffix) and "." not in f[: -len(suffix)]
    )
    if not markets:
        raise FileNotFoundError(f"Dataset folder [{data_path}] holds no <market>{suffix} file.")
    return markets


def scenario_values(config):
    """``scenario_field``: the markets are the field's values in the dataset's interaction
    file(s), sorted as strings."""
    field = config["scenario_field"]
    values = set()
    for path in market_inter_files(config, None):
        header = atomic_header(path, config["field_separator"])
        if field not in header:
            raise ValueError(f"scenario_field [{field}] is not a column of {path} "
                             f"(its fields: {list(header)}).")
        column = f"{field}:{header[field]}"
        frame = pd.read_csv(path, sep=config["field_separator"], usecols=[column], dtype=str,
                            keep_default_na=False, encoding=config["encoding"] or "utf-8")
        values |= set(frame[column])
    if "" in values:
        raise ValueError(f"scenario_field [{field}] is empty in some rows of "
                         f"{market_inter_files(config, None)}: every row needs a scenario.")
    return sorted(values)


def resolve_markets(config):
    """The markets to load: ``config['markets']`` (checked against the folder, or against the
    values of ``scenario_field``) or all of them."""
    if config["scenario_field"]:
        available = scenario_values(config)
    else:
        available = discover_markets(config["data_path"], inter_file_suffix(config))
    wanted = config["markets"]
    if wanted is None:
        return available
    wanted = [wanted] if isinstance(wanted, str) else [str(m) for m in wanted]
    missing = [m for m in wanted if m not in available]
    if missing and config["scenario_field"]:
        raise ValueError(f"markets {missing} named in the config are not values of scenario_field "
                         f"[{config['scenario_field']}]; its values: {available}")
    if missing:
        raise ValueError(
            f"markets {missing} named in the config have no file "
            f"{[os.path.join(config['data_path'], m + '.inter') for m in missing]}; "
            f"markets available in [{config['data_path']}]: {available}"
        )
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"markets {wanted} names a market twice.")
    return wanted


def check_market_file(config, market):
    """Check the typed header of each of ``market``'s interaction files: the user, item (and
    time) fields, and the ``label_fields``. Returns the header of the first file."""
    headers = {path: atomic_header(path, config["field_separator"])
               for path in market_inter_files(config, market)}
    path, fields = next(iter(headers.items()))
    required = [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]]
    if config["eval_args"]["order"] == "TO":
        required.append(config["TIME_FIELD"])
    load_col = (config["load_col"] or {}).get("inter")
    if config["load_col"] and config["TIME_FIELD"] in required and (
        load_col is None or config["TIME_FIELD"] not in load_col
    ):
        raise ValueError(
            f"eval_args order TO needs the time field, but load_col {config['load_col']} does "
            f"not load [{config['TIME_FIELD']}] from {path}: add it to load_col['inter'] "
            "(or set load_col: ~ to load every column)."
        )
    for file, header in headers.items():
        missing = [f for f in required if f not in header]
        if missing:
            raise ValueError(
                f"{file}: fields {missing} are missing from the header (found {list(header)}). "
                "Rename the columns or set USER_ID_FIELD / ITEM_ID_FIELD / TIME_FIELD."
            )
        labels = [f for f in label_fields(config) if f not in header]
        if labels:
            raise ValueError(f"{file}: label fields {labels} (label_fields / LABEL_FIELD) are "
                             f"missing from the header (found {list(header)}).")
        if header != fields:
            raise ValueError(schema_difference(file, header, path, fields))
    return fields


def schema_difference(file, header, reference_file, reference):
    """The message for two atomic files of one dataset whose columns differ."""
    diff = sorted(set(header) ^ set(reference))
    typed = sorted(f for f in set(header) & set(reference) if header[f] != reference[f])
    what = (f"fields {diff} are in one file only" if diff else
            f"field(s) {typed} have other types ({', '.join(f'{f}:{header[f]}' for f in typed)} vs "
            f"{', '.join(f'{f}:{reference[f]}' for f in typed)})" if typed else "the column order differs")
    return (f"{file} and {reference_file} have different schemas: {what}; every market's "
            "files must have the same typed columns.")


def label_fields(config):
    """The label fields of a labeled evaluation: ``label_fields`` (multi-task) or, in RecBole's
    ``labeled`` mode, ``LABEL_FIELD``; none otherwise."""
    named = config["label_fields"]
    if named:
        return [named] if isinstance(named, str) else list(named)
    modes = config["eval_args"]["mode"]
    labeled = "labeled" in (modes.values() if isinstance(modes, dict) else [modes])
    return [config["LABEL_FIELD"]] if labeled and config["threshold"] is None else []


def check_feature_fields(config, markets):
    """Every field the yaml names for loading (``load_col``) or as a numerical feature
    (``numerical_features``) must be a column of the dataset's files (RecBole would silently
    skip it)."""
    path = config["data_path"]
    files = {"inter": market_inter_files(config, markets[0])[0],
             "user": os.path.join(path, f"{config['dataset'] if config['scenario_field'] else markets[0]}.user"),
             "item": item_file(config, markets[0])}
    headers = {k: atomic_header(f, config["field_separator"]) for k, f in files.items()
               if os.path.isfile(f)}
    for market in markets[1:]:  # entities: the union of their files' fields
        for source, file in (("inter", market_inter_files(config, market)[0]),
                             ("item", item_file(config, market))):
            if file != files[source] and os.path.isfile(file):
                files[source] = f"{files[source]} / {file}"
                headers[source] = {**headers.get(source, {}),
                                   **atomic_header(file, config["field_separator"])}
    for source, fields in (config["load_col"] or {}).items():
        if source not in headers:
            continue
        absent = [f for f in fields if f not in headers[source]]
        if absent:
            raise ValueError(f"load_col['{source}'] names fields {absent} that {files[source]} "
                             f"does not have (its fields: {list(headers[source])}).")
    load_inter = (config["load_col"] or {}).get("inter")
    if config["scenario_field"] and config["load_col"] and config["scenario_field"] not in (load_inter or []):
        raise ValueError(f"load_col['inter'] {load_inter} does not load scenario_field "
                         f"[{config['scenario_field']}] from {files['inter']}: add it.")
    leak = [f for f in config["numerical_features"] or [] if f in label_fields(config)]
    if leak:
        raise ValueError(f"numerical_features {leak} are label fields: a model must not read its "
                         "labels as features.")
    every = set().union(*headers.values()) if headers else set()
    absent = [f for f in config["numerical_features"] or [] if f not in every]
    if absent:
        raise ValueError(f"numerical_features names fields {absent} that no file of dataset "
                         f"[{config['dataset']}] has ({', '.join(headers_files(files, headers))}).")


def headers_files(files, headers):
    """``["<file>: [fields]", ...]`` of the files read."""
    return [f"{files[k]}: {list(h)}" for k, h in headers.items()]


def _global_vocabulary(token_arrays):
    """Union of per-market token arrays (each starting with ``[PAD]``), in first-seen order."""
    tokens = pd.unique(np.concatenate([t[1:] for t in token_arrays]))
    global_tokens = np.array([PAD] + list(tokens))
    return global_tokens, {t: i for i, t in enumerate(global_tokens)}


class MultiMarketDataset:
    """A thin container over per-market RecBole datasets.

    With ``shared_ids`` (every train mode but ``local``) the markets share one item id space and
    one vocabulary per token field; in ``local`` mode each market keeps the ids plain RecBole
    gives its file alone, so a market trains and ranks exactly as in plain RecBole.

    Attributes:
        markets (list[str]): market names, in config order.
        market_datasets (dict[str, Dataset]): RecBole dataset of each market.
        shared_ids (bool): whether ids are shared across markets.
        item_num (int): number of shared item ids, padding included (``shared_ids`` only).
        global_users (bool): whether user ids are disjoint across markets (pooled training).
    """

    def __init__(self, config, global_users=False, shared_ids=True):
        self.config = config
        self.dataset_name = config["dataset"]
        self.logger = getLogger()
        self.global_users = global_users
        self.shared_ids = shared_ids or global_users
        self.markets = resolve_markets(config)
        headers = {m: check_market_file(config, m) for m in self.markets}
        self.entity_fields = entity.check_entity_files(config, self.markets)
        specific = {f for fields in self.entity_fields.values() for f in fields}
        headers = {m: {f: t for f, t in h.items() if f not in specific} for m, h in headers.items()}
        first = self.markets[0]
        for market, header in headers.items():
            if header != headers[first]:
                raise ValueError(schema_difference(market_inter_files(config, market)[0], header,
                                                   market_inter_files(config, first)[0], headers[first]))
        check_feature_fields(config, self.markets)
        dataset_class = market_dataset_class(config)
        self.market_datasets = {m: self._load_market(dataset_class, m) for m in self.markets}
        self._check_labels()
        iid = config["ITEM_ID_FIELD"]
        self.shared_fields = []  # shared token fields besides the item (one per alias group)
        self.vocabulary_fields = {}  # {field: tokens} the item_vocabulary file gave
        if self.shared_ids:
            self._share_vocabularies()
            if config["item_vocabulary"]:
                self._use_vocabulary(config["item_vocabulary"])
            self._share_entities()
        self.item_tokens, _ = _global_vocabulary(
            [ds.field2id_token[iid] for ds in self.market_datasets.values()])
        self.item_token_id = {t: i for i, t in enumerate(self.item_tokens)} if self.shared_ids else None
        self.catalogues = {m: ds.item_ids for m, ds in self.market_datasets.items()}
        self._entity_features()
        if global_users:
            self._pool_user_features()
        for ds in self.market_datasets.values():
            self.logger.info(ds)

    def _entity_features(self):
        """Entities (``entity_fields``) get one item table; rows get their ``history_fields``."""
        histories = entity.history_fields(self.config, self.markets)
        if (self.entity_fields or histories) and not self.shared_ids:
            raise ValueError("entity_fields / history_fields need the markets' shared item ids, "
                             "which train_mode local does not build: use train_mode pooled (or "
                             "another shared mode).")
        if self.entity_fields:
            entity.unify_item_features(self, self.entity_fields)
        if histories:
            entity.declare_histories(self, histories)

    def _load_market(self, dataset_class, market):
        empty = ValueError(
            f"Market [{market}] ({os.path.join(self.config['data_path'], market + '.inter')}) "
            "is empty after filtering; loosen user_inter_num_interval / "
            "item_inter_num_interval / val_interval or drop it from `markets`."
        )
        try:
            ds = dataset_class(self.config, market)
        except ValueError as err:  # RecBole's own words: "Some feat is empty, ..."
            if "feat is empty" in str(err):
                raise empty from None
            raise
        if ds.inter_num == 0:
            raise empty
        return ds

    def _check_labels(self):
        """Label fields hold 0/1 only (AUC and LogLoss need binary labels)."""
        for field in label_fields(self.config):
            for market, ds in self.market_datasets.items():
                values = np.asarray(ds.inter_feat[field])
                bad = values[(values != 0) & (values != 1)]
                if len(bad):
                    raise ValueError(
                        f"Label field [{field}] of {', '.join(market_inter_files(self.config, market))} "
                        f"holds {float(bad[0]):g}: labels must be 0 or 1 (set `threshold` to "
                        "binarise a rating)."
                    )

    def _share_vocabularies(self):
        """One id space per token field across markets.

        Item ids and every other token / token_seq field get the union of the markets'
        vocabularies, so one token means one id everywhere. User ids (unless
        ``shared_user_ids``) and the fields named in ``market_private_fields`` stay per market; in pooled training they are made disjoint
        (tokens prefixed with the market) instead.
        """
        private = self._private_fields()
        done = set(self._first().kg_fields())  # the knowledge graph's: _share_entities
        for field in dict.fromkeys(f for ds in self.market_datasets.values() for f in ds.field2id_token):
            having = {m: ds for m, ds in self.market_datasets.items() if field in ds.field2id_token}
            group = next(iter(having.values())).field_group(field)
            if done.intersection(group):
                continue
            done.update(group)
            if not private.intersection(group):
                self._remap_markets(field, {m: ds.field2id_token[field] for m, ds in having.items()})
                if self.config["ITEM_ID_FIELD"] not in group:
                    self.shared_fields.append(field)
            elif self.global_users:
                self._remap_markets(field, {
                    m: np.array([PAD] + [f"{m}:{t}" for t in ds.field2id_token[field][1:]])
                    for m, ds in having.items()
                })
                for ds in having.values():
                    ds.prefixed_fields = ds.prefixed_fields | set(group)

    def _share_entities(self):
        """Knowledge-aware models: one entity id space over the shared item ids, laid out as
        RecBole's (entity id = item id for every item, linked or not; then the entities that no
        item links to, in first-seen order). The relations of the one ``.kg`` already have the
        same ids in every market."""
        markets = list(self.market_datasets.values())
        if not isinstance(markets[0], MarketKnowledgeMixin):
            return
        items = markets[0].field2id_token[markets[0].iid_field]
        item_token_id = markets[0].field2token_id[markets[0].iid_field]
        item2entity = {i: e for ds in markets for i, e in ds.item2entity.items() if i in item_token_id}
        entity_token_id = {e: item_token_id[i] for i, e in item2entity.items()}
        unlinked = [e for e in pd.unique(np.concatenate([ds.kg_entities() for ds in markets]))
                    if e not in entity_token_id]
        entity_token_id.update((e, len(items) + k) for k, e in enumerate(unlinked))
        entity_tokens = np.array([item2entity.get(t, t) for t in items] + unlinked)
        for ds in markets:
            ds.share_entities(item_token_id, entity_token_id, entity_tokens)

    def shared_field_tokens(self, field):
        """The shared tokens of token field ``field``, in id order (``[PAD]`` first)."""
        return next(ds.field2id_token[field] for ds in self.market_datasets.values()
                    if field in ds.field2id_token)

    def vocabulary_digest(self):
        """SHA-256 of the ids that the ``item_vocabulary`` file fixes (items and its fields)."""
        return vocabulary.vocabulary_digest(self.item_tokens, self.vocabulary_fields)

    def _use_vocabulary(self, name):
        """Give the item field, and every other field the ``item_vocabulary`` file lists, the ids
        of the file (its ``i``-th token of a field is id ``i``) in every market; a token the file
        lacks, or a field no market has, is an error naming it."""
        path = vocabulary.vocabulary_path(self.config, name)
        items, fields = vocabulary.read_vocabulary(path)
        for field, tokens in ((self.config["ITEM_ID_FIELD"], items), *fields.items()):
            having = {m: ds for m, ds in self.market_datasets.items() if field in ds.field2id_token}
            if not having:
                raise ValueError(f"item_vocabulary {path} lists field [{field}], which no market of "
                                 f"{self.markets} has: rewrite it for this dataset.")
            tokens = np.array([PAD] + tokens, dtype=object)
            token_id = {t: i for i, t in enumerate(tokens)}
            for market, ds in having.items():
                self._remap_to_file(path, market, ds, field, tokens, token_id)
        self.vocabulary_fields = {f: self.shared_field_tokens(f) for f in fields}

    def _remap_to_file(self, path, market, ds, field, tokens, token_id):
        """Re-number ``field`` of market ``ds`` to the file's ``tokens`` (errors name the gap)."""
        local = ds.field2id_token[field]
        used = ds.item_ids if field == ds.iid_field else range(1, len(local))
        missing = [str(local[i]) for i in used if local[i] not in token_id]
        if missing:
            what = "item(s)" if field == ds.iid_field else f"token(s) of field [{field}]"
            raise ValueError(
                f"item_vocabulary {path} lacks {len(missing)} {what} of market [{market}] "
                f"({', '.join(market_inter_files(self.config, market))}), e.g. {missing[:3]}: "
                "every market must use the vocabulary its federation agreed on (rewrite it "
                "with python -m recbole_cmr.data.vocabulary over all markets).")
        lut = np.array([token_id.get(t, 0) for t in local], dtype=np.int64)
        ds.remap_to_global(field, lut, tokens, token_id)

    def _private_fields(self):
        """The user id and ``market_private_fields`` (checked: token fields of every market)."""
        named = self.config["market_private_fields"] or []
        named = [named] if isinstance(named, str) else list(named)
        for market, ds in self.market_datasets.items():
            unknown = [f for f in named if f not in ds.field2id_token]
            if unknown:
                raise ValueError(
                    f"market_private_fields {unknown} are not token fields of market [{market}] "
                    f"(its token fields: {sorted(ds.field2id_token)})."
                )
            specific = {f for fields in self.entity_fields.values() for f in fields}
            mismatch = sorted((set(ds.field2id_token) ^ set(self._first().field2id_token)) - specific)
            if mismatch:
                raise ValueError(
                    f"Market [{market}] and market [{self.markets[0]}] differ in token fields "
                    f"{mismatch}: every market's .inter/.user files must have the same columns "
                    "(or select them with load_col)."
                )
        uid = [] if self.config["shared_user_ids"] else [self.config["USER_ID_FIELD"]]
        return {*uid, *named}

    def _first(self):
        return self.market_datasets[self.markets[0]]

    def _remap_markets(self, field, local_tokens):
        """Give ``field`` the union vocabulary of ``local_tokens`` (``{market: tokens}``, each
        starting with ``[PAD]``) in every market."""
        tokens, token_id = _global_vocabulary(list(local_tokens.values()))
        for market in local_tokens:
            ds = self.market_datasets[market]
            lut = np.array([token_id[t] for t in local_tokens[market]], dtype=np.int64)
            ds.remap_to_global(field, lut, tokens, token_id)
        self.owned_ids = getattr(self, "owned_ids", {})
        self.owned_ids[field] = {m: np.array([token_id[t] for t in local_tokens[m][1:]],
                                             dtype=np.int64) for m in local_tokens}

    def _pool_user_features(self):
        """Pooled training: every market gets the user feature rows of all markets (user ids are
        disjoint then), so a pooled model reads each user's own market's features."""
        uid = self.config["USER_ID_FIELD"]
        tables = {m: ds.user_feat for m, ds in self.market_datasets.items()
                  if ds.user_feat is not None}
        if not tables:
            return
        if len(tables) < len(self.markets) or len({tuple(sorted(t.columns)) for t in tables.values()}) > 1:
            raise ValueError(
                "pooled training needs the same user feature fields in every market: "
                + "; ".join(f"{os.path.join(self.config['data_path'], m + '.user')}: "
                            f"{sorted(t.columns) if t is not None else 'missing'}"
                            for m, t in ((m, tables.get(m)) for m in self.markets))
            )
        owned = self.owned_ids[uid]
        pooled = pd.concat([t[t[uid].isin(owned[m])] for m, t in tables.items()], ignore_index=True)
        pooled = pooled.drop_duplicates(uid)  # shared_user_ids: one user in several markets
        full = pd.DataFrame({uid: np.arange(len(self._first().field2id_token[uid]))})
        pooled = pd.merge(full, pooled, on=uid, how="left")
        for ds in self.market_datasets.values():
            ds.user_feat = pooled.copy()
            ds._fill_nan()

    @property
    def item_num(self):
        if not self.shared_ids:
            raise ValueError("In train_mode local every market has its own item ids: use "
                             "dataset.market_datasets[market].item_num.")
        return len(self.item_tokens)

    def catalogue(self, market):
        """Internal ids of the items occurring in ``market``, shape ``[n]``."""
        return self.catalogues[market]

    def build(self):
        """Split every market with RecBole's own ``build()``: ``{market: [train, valid, test]}``;
        then the rows of every split get their ``history_fields`` from the training splits."""
        built = {m: ds.build() for m, ds in self.market_datasets.items()}
        entity.add_histories(self, built)
        return built

    @cached_property
    def item_text_embedding(self):
        """Sentence embedding of each item's text, ``torch.FloatTensor [item_num, dim]`` (rows
        in shared-id order; in local mode a market's own: ``market_datasets[m].item_text_embedding``)."""
        self.item_num  # noqa: B018  (the shared ids must exist)
        return item_text_embedding(self.config, self.item_tokens)

    def __str__(self):
        lines = [set_color(f"{self.dataset_name}", "pink") + f": {len(self.markets)} markets, "
                 f"{len(self.item_tokens) - 1} items in all"
                 + ("" if self.shared_ids else " (each market with its own item ids)")]
        for m, ds in self.market_datasets.items():
            lines.append(
                f"  {m}: {ds.inter_num} inters, {len(np.unique(ds.inter_feat[ds.uid_field]))} "
                f"users, {len(self.catalogue(m))} items"
            )
        return "\n".join(lines)
