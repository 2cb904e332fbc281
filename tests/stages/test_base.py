"""What every stage shares: which weights train, the GPT inside a wrapper, eval mode for a block, the model a stage
builds around its starting GPT."""

import pytest
import torch
from conftest import trainable_names

from llmtrain.interop.lora import apply_lora
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.base import evaluating, inner_gpt, set_trainable
from llmtrain.stages.classify import Classify


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**(dict(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=3) | kw)))


def test_train_blocks_counts_up_to_every_block_and_no_further():
    model = tiny_gpt()
    set_trainable(model, 3)  # every block by number: all but the embeddings
    assert trainable_names(model) == {n for n, _ in model.named_parameters() if not n.endswith("_emb.weight")}
    with pytest.raises(ValueError, match=r"0\.\.3 \(the last N blocks\)"):
        set_trainable(model, 4)


def test_train_blocks_none_freezes_everything():
    """LoRA's setting: its adapters, added afterwards, are the only weights that train."""
    model = tiny_gpt(tie_weights=True)
    set_trainable(model, "none")
    assert trainable_names(model) == set()


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_gives_the_module_back_in_the_mode_it_was_in(training):
    model = tiny_gpt(drop_rate=0.1).train(training)
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training == training for m in model.modules())


def test_inner_gpt_finds_the_gpt_inside_a_lora_wrapper():
    model = tiny_gpt()
    assert inner_gpt(model) is model
    assert inner_gpt(apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["attn.qkv"])) is model


def test_a_lora_classifier_trains_its_new_head_and_the_adapters_only():
    stage = Classify(train_blocks="none", lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["attn.qkv"]})
    stage.label_names = ["a", "b", "c"]
    model = stage.build_model(tiny_gpt(tie_weights=True))
    assert inner_gpt(model).head.out_features == 3
    trainable = trainable_names(model)
    assert {n for n in trainable if "lora_" not in n} == {"base_model.model.head.modules_to_save.default.weight"}
    assert sum("lora_" in n for n in trainable) == 2 * 3  # A and B of each block's qkv
    assert model.training
