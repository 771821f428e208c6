"""FeCoSR's components: S²CE, the market adapter, the switches."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from recbole_cmr import Config, create_dataset, data_preparation, run_recbole_cmr
from recbole_cmr.model.loss import S2CELoss, semantic_neighbours
from recbole_cmr.model.sequential_recommender.fecosr import FeCoSR, MarketAdapter
from recbole_cmr.utils import resource_path

pytestmark = pytest.mark.usefixtures("shared_text_embeddings")  # MiniLM encodes once per run

OFF = {"s2ce": False, "item_text_input": False, "adaptation": False, "train_mode": "local"}


def test_s2ce_matches_its_definition():
    torch.manual_seed(0)
    text = torch.randn(7, 5)
    text[0] = 0  # padding
    text[6] = 0  # an item without text
    eps, tau, k = 0.2, 0.5, 3
    loss_fn = S2CELoss(text, eps, tau, k)
    logits, target = torch.randn(4, 7), torch.tensor([1, 2, 6, 3])
    log_p = torch.log_softmax(logits, 1)
    unit = torch.nn.functional.normalize(text, dim=1)
    expected = []
    for row, y in enumerate(target.tolist()):
        q = torch.zeros(7)
        q[y] = 1.0
        if y != 6:
            sim = unit[y] @ unit.T
            sim[[0, 6, y]] = -float("inf")
            top = sim.topk(k)
            q = (1 - eps) * q
            q[top.indices] += eps * torch.softmax(top.values / tau, 0)
        expected.append(-(q * log_p[row]).sum())
    assert loss_fn(logits, target) == pytest.approx(torch.stack(expected).mean().item(), abs=1e-6)
    # eps = 0 is plain cross-entropy
    plain = S2CELoss(text, 0.0, tau, k)(logits, target)
    assert plain == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), abs=1e-6)


def test_neighbours_exclude_self_padding_and_textless_items():
    text = torch.randn(10, 8)
    text[[0, 4]] = 0
    index, weight = semantic_neighbours(text, topk=3, tau=0.1, chunk_size=4)
    assert index.shape == weight.shape == (10, 3)
    for item in range(10):
        assert item not in index[item] or weight[item].sum() == 0
    assert not ({0, 4} & set(index[weight.sum(1) > 0].flatten().tolist()))
    assert torch.allclose(weight.sum(1)[[1, 2, 3, 5]], torch.ones(4))
    assert weight[[0, 4]].sum() == 0


def test_adapter_starts_as_identity_and_keeps_padding_zero():
    table = torch.randn(6, 4)
    table[0] = 0
    adapter = MarketAdapter(6, 4, rank=2)
    assert torch.equal(adapter(table), table)
    with torch.no_grad():
        adapter.up.normal_()
        adapter.item_bias.normal_()
    assert torch.equal(adapter(table)[0], torch.zeros(4))
    assert not torch.allclose(adapter(table)[1:], table[1:])


def test_all_components_off_is_exactly_sasrec(two_markets):
    sasrec = run_recbole_cmr(model="SASRec", dataset="xm2", config_dict=two_markets, saved=False)
    fecosr = run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict={**two_markets, **OFF},
                             saved=False)
    assert fecosr["per_market"] == sasrec["per_market"]


def test_s2ce_without_item_text_is_a_clear_error(two_markets):
    with pytest.raises(ValueError, match=r"FeCoSR with s2ce=True .*needs item text.*xm2\.item"):
        run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict={**two_markets, "s2ce": True})


def test_finetune_stage_applies_the_adapter_only(two_markets):
    config = Config(model="FeCoSR", dataset="xm2", config_dict={**two_markets, **OFF, "adaptation": True})
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    model = FeCoSR(config, train["in"]._dataset)
    with torch.no_grad():
        model.item_embedding.adapter.up.normal_()
    base = model.item_embedding.weight.detach().clone()
    assert torch.equal(base, model.item_embedding.embedding.weight)
    model.set_stage("finetune")
    assert not torch.allclose(model.item_embedding.weight, base)
    with pytest.raises(ValueError, match="stage"):
        model.set_stage("warmup")


@pytest.fixture
def small_movielens(tmp_path):
    """40 users of two movielens-markets markets with their items' real text, as ``ml2``."""
    src = Path(resource_path("dataset", "movielens-markets"))
    out = tmp_path / "data" / "ml2"
    out.mkdir(parents=True)
    items = set()
    for market in ("ml100k", "east"):
        inter = pd.read_csv(src / f"{market}.inter", sep="\t", dtype=str)
        users = inter["user_id:token"].drop_duplicates().head(40)
        inter = inter[inter["user_id:token"].isin(users)]
        items |= set(inter["item_id:token"])
        inter.to_csv(out / f"{market}.inter", sep="\t", index=False)
    item = pd.read_csv(src / "movielens-markets.item", sep="\t", dtype=str)
    item[item["item_id:token"].isin(items)].to_csv(out / "ml2.item", sep="\t", index=False)
    return {"data_path": str(tmp_path / "data"), "epochs": 1, "show_progress": False,
            "state": "WARNING", "hidden_size": 32, "inner_size": 64, "n_layers": 1,
            "MAX_ITEM_LIST_LENGTH": 10, "adaptation": False, "item_text_fields": ["title"],
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
            "text_cache_dir": str(tmp_path / "cache"), "checkpoint_dir": str(tmp_path / "saved")}


def test_s2ce_trains_with_real_item_text(small_movielens):
    config = Config(model="FeCoSR", dataset="ml2", config_dict=small_movielens)
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    model = FeCoSR(config, train["east"]._dataset)
    assert model.s2ce.neighbour_index.shape == (dataset.item_num, config["s2ce_topk"])
    assert model.s2ce.neighbour_weight[1:].sum(1).allclose(torch.ones(dataset.item_num - 1))
    loss = model.calculate_loss(next(iter(train["east"])))
    assert torch.isfinite(loss) and loss.requires_grad
    result = run_recbole_cmr(model="FeCoSR", dataset="ml2", config_dict=small_movielens,
                             saved=False)
    assert set(result["per_market"]) == {"ml100k", "east"}


def test_fecosr_federated_pretraining_then_local_finetuning(two_markets):
    settings = {**two_markets, "s2ce": False, "fed_rounds": 2, "adapter_rank": 4}
    result = run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict=settings)
    for market in ("in", "jp"):
        res = result["per_market"][market]
        assert set(res["federated"]) >= {"valid", "test", "checkpoint"}
        state = torch.load(res["checkpoint"], weights_only=True)
        assert state["stage"] == "finetune" and state["train_mode"] == "federated"
    adapters = [torch.load(result["per_market"][m]["checkpoint"], weights_only=True)["state_dict"]
                ["item_embedding.adapter.up"] for m in ("in", "jp")]
    assert adapters[0].abs().sum() > 0 and not torch.equal(adapters[0], adapters[1])


def test_finetune_lr_scale_zero_freezes_the_shared_model(two_markets):
    from recbole_cmr.trainer import finetune_trainer

    config = Config(model="FeCoSR", dataset="xm2",
                    config_dict={**two_markets, "s2ce": False, "finetune_lr_scale": 0})
    train, _, _ = data_preparation(config, create_dataset(config))
    model = FeCoSR(config, train["in"]._dataset)
    trainer = finetune_trainer(config, model, "in", ["in"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"item_embedding.adapter.down", "item_embedding.adapter.up",
                       "item_embedding.adapter.item_bias"}
    assert model.stage == "finetune" and len(trainer.optimizer.param_groups) == 1


def test_baselines_are_registered_models(two_markets):
    fed = run_recbole_cmr(model="FedAvgSASRec", dataset="xm2",
                          config_dict={**two_markets, "fed_rounds": 2}, saved=False)
    assert fed["train_mode"] == "federated" and set(fed["per_market"]) == {"in", "jp"}
    transfer = run_recbole_cmr(model="PretrainFinetune", dataset="xm2", config_dict=two_markets)
    assert transfer["train_mode"] == "transfer"
    source = transfer["per_market"]["jp"]  # jp has the most training interactions
    assert set(source["after_transfer"]) == {"in"}
    assert source["after_transfer"]["in"] != source["test"]
    # after_transfer is the source market's test under the target's fine-tuned model
    from recbole_cmr import get_trainer, load_data_and_model

    config, model, _, _, _, _ = load_data_and_model(transfer["per_market"]["in"]["checkpoint"])
    _, _, test = data_preparation(config, create_dataset(config))  # every market's loaders
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    assert dict(trainer.evaluate(test["jp"], load_best_model=False)) == dict(source["after_transfer"]["in"])
    # ... with its per-user values, on the source's users, one line in the results JSON
    import json

    from recbole_cmr.results import results_json

    after = source["after_transfer_per_user"]["in"]
    assert after["user"] == source["per_user"]["user"] and after["ndcg@10"] != source["per_user"]["ndcg@10"]
    assert sum(after["ndcg@10"]) / len(after["ndcg@10"]) == pytest.approx(
        source["after_transfer"]["in"]["ndcg@10"], abs=1e-4)
    text = results_json(transfer)
    written = json.loads(text)["per_market"]["jp"]["after_transfer_per_user"]["in"]
    assert written["user"] == after["user"] and written["ndcg@10"] == pytest.approx(after["ndcg@10"])
    lines = text.splitlines()
    opened = next(i for i, line in enumerate(lines) if '"after_transfer_per_user"' in line)
    assert lines[opened + 1].strip().startswith('"in": {"user": [')


def test_finetuned_checkpoint_reloads_with_its_adapter(two_markets):
    from recbole_cmr import get_trainer, load_data_and_model

    settings = {**two_markets, "s2ce": False, "fed_rounds": 1, "adapter_rank": 4}
    result = run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict=settings)
    res = result["per_market"]["in"]
    config, model, _, _, _, test = load_data_and_model(res["checkpoint"])
    assert model.stage == "finetune"
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    assert dict(trainer.evaluate(test["in"], load_best_model=False)) == dict(res["test"])


def _finished_stage(two_markets, tmp_path):
    """FeCoSR trained on xm2 (2 rounds, adapter rank 4, plain CE): ``(settings, result, the
    finished round checkpoint)``."""
    settings = {**two_markets, "s2ce": False, "fed_rounds": 2, "adapter_rank": 4}
    full = run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict=settings)
    [round_file] = (tmp_path / "saved").glob("FeCoSR-xm2-federated-*.pth")
    return settings, full, round_file


def test_ablation_reuses_a_finished_federated_stage(two_markets, tmp_path):
    settings, full, round_file = _finished_stage(two_markets, tmp_path)
    before = round_file.read_bytes()
    ablation = run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict={
        **settings, "adaptation": False, "fed_pretrained": str(round_file)})
    assert round_file.read_bytes() == before  # the shared stage is read, never rewritten
    for market in ("in", "jp"):
        shared, mine = full["per_market"][market], ablation["per_market"][market]
        assert mine["federated"]["valid"] == shared["federated"]["valid"]
        assert dict(mine["federated"]["test"]) == dict(shared["federated"]["test"])
        state = torch.load(mine["checkpoint"], weights_only=True)["state_dict"]
        assert not any("adapter" in name for name in state)
        assert mine["test"] != shared["test"]  # fine-tuned without the adapter


def test_a_reused_stage_fine_tunes_as_the_run_that_trained_it(two_markets, tmp_path):
    """``fed_pretrained`` with the settings of the run that trained the stage repeats that run's
    fine-tuning exactly (the training loader's shuffling continues as it did), so a fine-tuning
    ablation on a reused stage differs from the full model by its switch alone."""
    settings, full, round_file = _finished_stage(two_markets, tmp_path)
    again = run_recbole_cmr(model="FeCoSR", dataset="xm2",
                            config_dict={**settings, "fed_pretrained": str(round_file)})
    for market in ("in", "jp"):
        done, reused = full["per_market"][market], again["per_market"][market]
        assert reused["valid"] == done["valid"] and dict(reused["test"]) == dict(done["test"])


def test_another_adapter_rank_fine_tunes_from_a_finished_stage(two_markets, tmp_path):
    """A stage trained with ``adapter_rank`` 4 serves a model with rank 2 (tune_fecosr's
    adapter-rank points): the adapter, local and untrained in the rounds, starts fresh at its own
    shape; the stage's results are the stage's."""
    settings, full, round_file = _finished_stage(two_markets, tmp_path)
    other = run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict={
        **settings, "adapter_rank": 2, "fed_pretrained": str(round_file)})
    for market in ("in", "jp"):
        shared, mine = full["per_market"][market], other["per_market"][market]
        assert mine["federated"]["valid"] == shared["federated"]["valid"]
        state = torch.load(mine["checkpoint"], weights_only=True)["state_dict"]
        assert state["item_embedding.adapter.down"].shape[0] == 2


def test_run_cut_after_its_rounds_resumes_to_the_same_numbers(two_markets, tmp_path):
    """Resuming a finished round checkpoint trains no round and goes on with fine-tuning exactly
    as the uninterrupted run did (the benchmark resumes runs cut during fine-tuning this way)."""
    settings, full, round_file = _finished_stage(two_markets, tmp_path)
    again = run_recbole_cmr(model="FeCoSR", dataset="xm2",
                            config_dict={**settings, "fed_resume": str(round_file)})
    for market in ("in", "jp"):
        done, resumed = full["per_market"][market], again["per_market"][market]
        assert dict(resumed["test"]) == dict(done["test"]) and resumed["valid"] == done["valid"]
        assert dict(resumed["federated"]["test"]) == dict(done["federated"]["test"])


def test_fed_pretrained_must_hold_the_models_shared_parameters(two_markets, tmp_path):
    settings = {**two_markets, "fed_rounds": 1}
    run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict=settings)
    [round_file] = (tmp_path / "saved").glob("FedAvgSASRec-xm2-federated-*.pth")
    with pytest.raises(ValueError, match=r"item_embedding\.embedding\.weight"):
        run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict={
            **settings, "s2ce": False, "fed_pretrained": str(round_file)})
    with pytest.raises(ValueError, match="not both"):
        run_recbole_cmr(model="FedAvgSASRec", dataset="xm2", config_dict={
            **settings, "fed_pretrained": str(round_file), "fed_resume": str(round_file)})


def test_finetune_keep_pretrained_never_validates_below_the_pretrained_model(two_markets, tmp_path):
    settings = {**two_markets, "s2ce": False, "fed_rounds": 4, "adapter_rank": 4,
                "finetune_keep_pretrained": True}
    run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict=settings)
    [round_file] = (tmp_path / "saved").glob("FeCoSR-xm2-federated-*.pth")
    stage = {**settings, "fed_pretrained": str(round_file)}
    result = run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict=stage)["per_market"]
    # The same fine-tuning without keep (same federated stage, seed and 2 epochs): a market keeps
    # whichever of the pretrained and the fine-tuned model validates higher.
    plain = run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict={
        **stage, "finetune_keep_pretrained": False})["per_market"]
    for market, res in result.items():
        pretrained, finetuned = res["federated"], plain[market]
        kept = bool(pretrained["valid"]["ndcg@10"] >= finetuned["valid"]["ndcg@10"])
        assert res["kept_pretrained"] is kept
        expected = pretrained if kept else finetuned
        assert res["valid"] == expected["valid"] and dict(res["test"]) == dict(expected["test"])
    # Fine-tuning at learning rate 100 wrecks the model: the pretrained one must stay.
    wrecked = run_recbole_cmr(model="FeCoSR", dataset="xm2", config_dict={
        **stage, "learning_rate": 100.0})["per_market"]
    for market, res in wrecked.items():
        assert res["kept_pretrained"] is True
        assert res["valid"] == result[market]["federated"]["valid"]
        assert dict(res["test"]) == dict(result[market]["federated"]["test"])
