"""ANT: item modalities (real Amazon Scientific image features, price), the MoE adaptors, the
two stages on RecBole's transfer path (several sources pooled), re-learning and its ablations, on
a slice of the shipped movielens-markets (real item text)."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from recbole_cmr import Config, create_dataset, data_preparation, run_recbole_cmr
from recbole_cmr.compat import load_checkpoint
from recbole_cmr.config import plugin_model_settings
from recbole_cmr.data.modality import image_features, price_features
from recbole_cmr.model.sequential_recommender.ant import catalogue_mask
from recbole_cmr.utils import get_model, resource_path

from conftest import shared_data

pytestmark = pytest.mark.usefixtures("shared_text_embeddings")  # MiniLM encodes once per run

SHIPPED = Path(resource_path("dataset", "movielens-markets"))
MARKETS = ("ml100k", "east", "south")
N_USERS = 30
ANT_FAST = {"epochs": 1, "show_progress": False, "state": "WARNING", "hidden_size": 16,
            "inner_size": 16, "n_layers": 1, "MAX_ITEM_LIST_LENGTH": 10, "n_experts": 2,
            "train_batch_size": 256, "source_market": ["ml100k", "east"]}


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    """One item-text embedding cache for the module (the texts are the same in every test)."""
    return str(tmp_path_factory.mktemp("text_cache"))


@pytest.fixture
def domains(tmp_path, text_cache):
    """The first users of three movielens-markets markets, as dataset ``mlant``; a synthetic
    image file for half of the movies and a price column, to exercise every modality."""
    root = tmp_path / "data"
    target = root / "mlant"
    target.mkdir(parents=True)
    rated = set()
    for market in MARKETS:
        frame = pd.read_csv(SHIPPED / f"{market}.inter", sep="\t", dtype=str)
        users = sorted(frame["user_id:token"].unique())[:N_USERS]
        frame = frame[frame["user_id:token"].isin(users)]
        frame.to_csv(target / f"{market}.inter", sep="\t", index=False)
        rated.update(frame["item_id:token"])
    items = pd.read_csv(SHIPPED / "movielens-markets.item", sep="\t", dtype=str, keep_default_na=False)
    items = items[items["item_id:token"].isin(rated)].reset_index(drop=True)  # text encoded: these only
    rng = np.random.default_rng(0)
    items["price:float"] = np.where(rng.random(len(items)) < 0.7,
                                    np.round(rng.lognormal(2, 1, len(items)), 2).astype(str), "")
    items.to_csv(target / "mlant.item", sep="\t", index=False)
    with_image = items["item_id:token"].iloc[::2].tolist()
    (target / "mlant.item2index").write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(with_image)))
    rng.standard_normal((len(with_image), 8)).astype(np.float32).tofile(target / "mlant.img")
    with open(resource_path("properties", "dataset", "movielens-markets.yaml")) as f:
        settings = yaml.safe_load(f)
    return {**settings, **ANT_FAST, "data_path": str(root), "checkpoint_dir": str(tmp_path / "saved"),
            "text_cache_dir": text_cache, "image_feature_file": "mlant.img",
            "image_feature_index": "mlant.item2index", "image_feature_dim": 8,
            "price_field": "price", "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                                 "item": ["item_id", "title", "price"]}}


def _for(model, settings):
    owners = plugin_model_settings()
    return {k: v for k, v in settings.items() if model in owners.get(k, [model])}


def _model(settings, **extra):
    config = Config(model="ANT", dataset="mlant", config_dict={**settings, **extra})
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    return config, get_model("ANT")(config, train["south"]._dataset), train


# ---------------------------------------------------------------- modalities
def test_real_image_features_follow_their_index_and_bad_files_fail(tmp_path):
    folder = shared_data("amazon_scientific", "mm_subset")
    index = pd.read_csv(folder / "Scientific.item2index", sep="\t", header=None, dtype=str)
    tokens = ["[PAD]", index[0][5], "NOT_AN_ITEM", index[0][0]]
    config = {"image_feature_file": str(folder / "Scientific.feat3CLS"), "data_path": str(tmp_path),
              "image_feature_index": str(folder / "Scientific.item2index"), "image_feature_dim": 512}
    features, present = image_features(config, tokens)
    raw = np.fromfile(folder / "Scientific.feat3CLS", dtype=np.float32).reshape(-1, 512)
    assert features.shape == (4, 512) and present.tolist() == [False, True, False, True]
    assert np.array_equal(features[1].numpy(), raw[5]) and not features[2].any()
    with pytest.raises(ValueError, match=r"feat3CLS: 811520 float32 values are not 1585 rows .* 256"):
        image_features({**config, "image_feature_dim": 256}, tokens)
    cut = tmp_path / "cut.feat"
    raw[:100].tofile(cut)
    with pytest.raises(ValueError, match=r"cut\.feat: .* not 1585 rows"):
        image_features({**config, "image_feature_file": str(cut)}, tokens)


def test_price_is_a_quantile_bucket_of_log_price():
    prices = np.array([np.nan, 1.0, 10.0, 100.0, 1000.0, -1.0])
    out = price_features(prices, 4).numpy()
    assert out.shape == (6, 4)
    assert out[[0, 5]].sum() == 0  # no price, bad price
    assert out[1:5].sum(1).tolist() == [1, 1, 1, 1]
    assert out[1:5].argmax(1).tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- model
def test_shapes_uniform_gates_and_modalities(domains):
    _, model, train = _model(_for("ANT", domains))
    encoder = model.item_embedding
    assert encoder.names == ["image", "price", "text"]
    assert encoder.weight.shape == (model.n_items, 16)
    model.eval()
    for name, adaptor in encoder.adaptors.items():
        gates = adaptor.gates(encoder.features(name)[0])
        assert torch.allclose(gates, torch.full_like(gates, 0.5))  # 2 experts, uniform
    assert encoder.features("image")[1].float().mean().item() == pytest.approx(0.5, abs=0.05)
    batch = next(iter(train["south"]))
    assert model.full_sort_predict(batch).shape == (len(batch), model.n_items)
    model.train()
    loss = model.calculate_loss(batch)  # pretraining: contrastive + image-text
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_item_table_computes_only_the_markets_items(domains):
    config, model, train = _model(_for("ANT", domains))
    model.eval()
    encoder = model.item_embedding
    south = catalogue_mask(train["south"]._dataset, model.n_items)
    dataset = train["south"]._dataset
    assert south.nonzero().squeeze(1).tolist() == sorted(dataset.market_catalogue.tolist())
    assert torch.equal(encoder.active, south) and 0 < south.sum() < model.n_items - 1
    table = encoder.weight
    encoder.set_active(None)
    every = encoder.weight
    assert torch.allclose(table[south], every[south], atol=1e-6) and not table[~south].any()
    model.use_market(train["east"]._dataset)  # a transfer target: its own items
    assert torch.equal(encoder.active, catalogue_mask(train["east"]._dataset, model.n_items))


def test_checkpoints_of_other_modalities_and_shapes_load(domains):
    settings = _for("ANT", domains)
    _, full, _ = _model(settings)  # image, price and text adaptors, MoE
    state = full.state_dict()
    _, text_only, _ = _model(settings, image_modality=False, price_modality=False)
    text_only.load_state_dict(state)  # the image and price adaptors are dropped
    mine = text_only.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in mine.items())
    _, with_image, _ = _model(settings)
    fresh = {k: v.clone() for k, v in with_image.state_dict().items()}
    with_image.load_state_dict(mine)  # no image / price adaptor in the checkpoint: kept fresh
    after = with_image.state_dict()
    assert all(torch.equal(after[k], mine[k] if k in mine else fresh[k]) for k in after)
    _, linear, _ = _model(settings, moe=False)  # relearn: another adaptor shape is re-learnt anyway
    linear.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in linear.state_dict().items()
               if not k.startswith("item_embedding.adaptors."))
    _, linear_finetune, _ = _model(settings, moe=False, adaptation="finetune")
    with pytest.raises(ValueError, match="image adaptor does not fit this model"):
        linear_finetune.load_state_dict(state)
    with pytest.raises(RuntimeError, match="position_embedding"):
        text_only.load_state_dict({k: v for k, v in state.items() if not k.startswith("position")})


def test_relearn_reinitialises_and_freezes_exactly(domains):
    _, model, train = _model(_for("ANT", domains))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for batch, _ in zip(train["south"], range(2)):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    model.set_stage("finetune")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    reinit = {k for k in before if k.startswith(("position_embedding.", "item_embedding.adaptors."))}
    assert changed == {k for k in reinit if "bias" not in k or not before[k].eq(0).all()}
    for name, adaptor in model.item_embedding.adaptors.items():  # gates back to zero: uniform
        assert not adaptor.w_gate.any() and not adaptor.w_noise.any()
        for expert in adaptor.experts:  # Xavier-normal weights, zero biases (the authors' code)
            linear = getattr(expert, "linear", expert)
            fan_out, fan_in = linear.weight.shape
            assert linear.weight.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.2)
            assert not getattr(expert, "bias", linear.bias).any()
    # positions restart at N(0, initializer_range) (nn.Embedding's own reset draws N(0, 1))
    assert model.position_embedding.weight.std().item() == pytest.approx(0.02, rel=0.3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if not n.startswith("trm_encoder.")}


def test_adaptors_start_like_the_other_layers(domains):
    _, model, _ = _model(_for("ANT", domains))
    for adaptor in model.item_embedding.adaptors.values():
        for expert in adaptor.experts:
            assert getattr(expert, "linear", expert).weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_learning_rate_decays_per_epoch_in_each_stage(domains):
    settings = {**_for("ANT", domains), "epochs": 2, "eval_step": 1, "stopping_step": 10,
                "learning_rate": 0.01, "learning_rate_decay": 0.5, "pretrain_learning_rate_decay": 0.8}
    result = run_recbole_cmr(model="ANT", dataset="mlant", config_dict=settings)
    for market, decay in (("ml100k", 0.8), ("south", 0.5)):  # source (pretraining), target
        checkpoint = load_checkpoint(result["per_market"][market]["checkpoint"])
        # saved after the best epoch's training step: lr * decay^(epoch + 1)
        lrs = [g["lr"] for g in checkpoint["optimizer"]["param_groups"]]
        assert lrs == pytest.approx([0.01 * decay ** (checkpoint["epoch"] + 1)] * len(lrs))
    with pytest.raises(ValueError, match=r"learning_rate_decay must be a number in \(0, 1\]"):
        run_recbole_cmr(model="ANT", dataset="mlant", config_dict={**settings, "learning_rate_decay": 1.5})


def test_finetune_adaptation_keeps_the_adaptors(domains):
    _, model, _ = _model(_for("ANT", domains), adaptation="finetune", freeze_encoder=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_stage("finetune")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_two_stages_with_two_sources_and_stage_two_alone(domains):
    """Pretraining on two pooled sources, then the target (here with target text from a file,
    whose adaptor the target checkpoint holds at the file's width and whose role a reload
    restores with the stage); the adaptation alone from the source checkpoint."""
    settings = _for("ANT", _with_target_text(domains))
    result = run_recbole_cmr(model="ANT", dataset="mlant", config_dict=settings)
    south = result["per_market"]["south"]
    assert set(south["test"]) == {"hit@10", "ndcg@10", "mrr@10"}
    state = load_checkpoint(south["checkpoint"])["state_dict"]
    assert state["item_embedding.adaptors.target_text.w_gate"].shape[0] == 6
    from recbole_cmr.quick_start import load_data_and_model

    assert load_data_and_model(south["checkpoint"])[1].item_embedding.text_source == "target_text"
    source_checkpoint = result["per_market"]["ml100k"]["checkpoint"]
    assert source_checkpoint == result["per_market"]["east"]["checkpoint"]  # one pooled pretraining
    assert set(result["per_market"]["east"]["after_transfer"]) == {"south"}
    assert load_checkpoint(south["checkpoint"])["stage"] == "finetune"
    # what HyperTuning optimises is the adaptation: the target's valid score, not the sources'
    assert result["best_valid_result"] == south["valid"]
    assert result["best_valid_score"] == south["valid"]["mrr@10"]  # RecBole's default valid_metric
    assert result["test_result"] == south["test"]
    alone = run_recbole_cmr(model="ANT", dataset="mlant",
                            config_dict={**settings, "pretrained": source_checkpoint})
    assert alone["per_market"]["ml100k"]["test"] == result["per_market"]["ml100k"]["test"]


def test_text_only_without_moe_trains_and_evaluates(domains):
    """The text-only, no-MoE, no-fusion ablation: one linear text adaptor (no image or price
    adaptor, no experts or gates) in the model it builds and in the target checkpoint its run
    writes; on the target, training lowers its loss epoch after epoch."""
    from recbole.utils import init_seed

    from recbole_cmr.utils import get_trainer

    settings = {k: v for k, v in _for("ANT", domains).items()
                if not k.startswith(("image_feature", "price"))}
    ablation = {"moe": False, "fusion": False, "source_market": "ml100k"}
    linear = {"item_embedding.adaptors.text.weight", "item_embedding.adaptors.text.bias"}
    config, model, train = _model(settings, **ablation, learning_rate=0.01)
    assert model.item_embedding.names == ["text"] and model.item_embedding.beta == 0.0
    assert type(model.item_embedding.adaptors["text"]) is torch.nn.Linear
    assert {n for n, _ in model.named_parameters() if n.startswith("item_embedding.")} == linear
    init_seed(config["seed"], True)
    model.set_stage("finetune")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    losses = [trainer._train_epoch(train["south"], epoch) for epoch in range(3)]
    assert losses[0] > losses[1] > losses[2]
    result = run_recbole_cmr(model="ANT", dataset="mlant", config_dict={**settings, **ablation})
    south = result["per_market"]["south"]
    state = load_checkpoint(south["checkpoint"])["state_dict"]
    assert {k for k in state if k.startswith("item_embedding.")} == linear
    assert set(south["test"]) == {"hit@10", "ndcg@10", "mrr@10"}
    with pytest.raises(ValueError, match="ANT represents items by their modalities"):
        _model(settings, text_modality=False)


# ---------------------------------------------------------------- target text from a file
def _with_target_text(domains, rows_every=3, dim=6):
    """``domains`` plus a synthetic target text file (``dim``-wide rows for every
    ``rows_every``-th movie) as ``target_text_feature_*``."""
    folder = Path(domains["data_path"]) / "mlant"
    items = pd.read_csv(folder / "mlant.item", sep="\t", dtype=str, keep_default_na=False)
    with_text = items["item_id:token"].iloc[::rows_every].tolist()
    (folder / "mlant.txt2index").write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(with_text)))
    np.random.default_rng(1).standard_normal((len(with_text), dim)).astype(np.float32).tofile(
        folder / "mlant.txt")
    return {**domains, "target_text_feature_file": "mlant.txt",
            "target_text_feature_index": "mlant.txt2index", "target_text_feature_dim": dim}


def _table_moves(model, adaptor):
    """Whether the item table changes when ``adaptor``'s parameters are perturbed."""
    model.eval()
    before = model.item_embedding.weight.detach().clone()
    with torch.no_grad():
        saved = [p.clone() for p in model.item_embedding.adaptors[adaptor].parameters()]
        for p in model.item_embedding.adaptors[adaptor].parameters():
            p.add_(0.5)
        moved = not torch.equal(model.item_embedding.weight, before)
        for p, s in zip(model.item_embedding.adaptors[adaptor].parameters(), saved):
            p.copy_(s)
    return moved


@pytest.mark.parametrize("adaptation", ["relearn", "finetune"])
def test_target_text_takes_the_text_role_on_the_target(domains, adaptation):
    """With ``target_text_feature_file``: pretraining's table uses the sentence encoder's text and
    not the file's; from the finetune stage on, the file's vectors (their own adaptor, of their
    width) take the text role: in the table, in the image-text fusion, and the encoder text is
    out; the other pretrained adaptors stay under ``finetune``."""
    settings = _for("ANT", _with_target_text(domains))
    _, model, _ = _model(settings, adaptation=adaptation)
    encoder = model.item_embedding
    assert encoder.names == ["image", "price", "target_text", "text"]
    assert encoder.adaptors["target_text"].w_gate.shape[0] == 6
    assert encoder.features("target_text")[1].float().mean().item() == pytest.approx(1 / 3, abs=0.05)
    assert _table_moves(model, "text") and not _table_moves(model, "target_text")
    image_before = {k: v.clone() for k, v in encoder.adaptors["image"].state_dict().items()}
    model.set_stage("finetune")
    assert _table_moves(model, "target_text") and not _table_moves(model, "text")
    parts = {n: encoder.modality(n) for n in ("image", "price", "target_text")}
    expected = sum(parts.values()) + model.item_embedding.beta * parts["image"] * parts["target_text"]
    assert torch.allclose(encoder.weight, expected)
    kept = all(torch.equal(v, image_before[k]) for k, v in encoder.adaptors["image"].state_dict().items())
    assert kept == (adaptation == "finetune")
    model.set_stage("pretrain")
    assert encoder.text_source == "text"


def test_target_text_settings_that_would_go_unread_are_errors(domains):
    settings = _for("ANT", _with_target_text(domains))
    local = {k: v for k, v in settings.items() if k != "source_market"}
    with pytest.raises(ValueError, match="train_mode local without finetune never reaches"):
        _model(local, train_mode="local")
    with pytest.raises(ValueError, match="target_text_feature_file is read only with text_modality: True"):
        _model(settings, text_modality=False)
    with pytest.raises(ValueError, match=r"mlant\.txt: .* of target_text_feature_dim 4"):
        _model(settings, target_text_feature_dim=4)
