"""Gradient clipping where Lightning refuses what the defaults ask for: bf16-mixed with a fused optimizer (the GPU
defaults together: auto precision, fused AdamW, gradient_clip_val 1.0; the same path runs on CPU), and FSDP."""

from functools import partial
from types import SimpleNamespace

import torch
from conftest import TINY, compose, lm_stage
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy

from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.train import fused_where_supported, train
from llmtrain.training.module import LanguageModel


def test_bf16_mixed_clips_the_gradients_of_a_fused_optimizer():
    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    module = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW, fused=True), 0, 10, 0.1)
    module.trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"), strategy=None,
                                     gradient_clip_val=1.0, gradient_clip_algorithm=None)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    optimizer = module.configure_optimizers()["optimizer"]
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm=None)
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) <= 1.0 + 1e-5


def test_under_fsdp_the_norm_is_clipped_by_fsdp_over_every_shard():
    """Lightning's FSDP precision plugin refuses clipping by norm (a local norm would be wrong), so trainer=fsdp
    with the default gradient_clip_val=1.0 stopped at the first step; the root FSDP module clips instead."""
    calls = []
    strategy = FSDPStrategy()
    strategy._model = SimpleNamespace(clip_grad_norm_=calls.append)  # the FSDP root, as Lightning holds it
    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    module = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW), 0, 10, 0.1)
    module.trainer = SimpleNamespace(precision_plugin=FSDPPrecision("bf16-mixed"), strategy=strategy,
                                     gradient_clip_val=1.0, gradient_clip_algorithm=None)
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm=None)
    assert calls == [1.0]


def test_under_fsdp_clipping_by_value_stays_clipping_by_value():
    """Clipping each element needs no collective, so each rank clips its own shards; FSDP's norm clip is not used."""
    calls = []
    strategy = FSDPStrategy()
    strategy._model = SimpleNamespace(clip_grad_norm_=calls.append)  # would record a clip by norm
    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    module = LanguageModel(model, lm_stage(), partial(torch.optim.AdamW), 0, 10, 0.1)
    module.trainer = SimpleNamespace(precision_plugin=FSDPPrecision("bf16-mixed"), strategy=strategy,
                                     gradient_clip_val=0.5, gradient_clip_algorithm=None)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, 3.0 if i % 2 else -3.0)
    optimizer = module.configure_optimizers()["optimizer"]
    module.configure_gradient_clipping(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    assert calls == []
    assert all(p.grad.abs().eq(0.5).all() for p in model.parameters())  # every element cut to +-0.5


def test_a_run_with_bf16_mixed_and_a_fused_adamw_trains(tmp_path):
    cfg = compose([*TINY, "optimizer=adamw", "trainer.precision=bf16-mixed", "optimizer.fused=true",
                   "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1"], tmp_path)
    assert train(cfg) < 6.0


def test_fp16_with_clipping_gets_the_unfused_optimizer():
    """16-mixed scales the gradients; a fused optimizer unscales them inside its step, after clipping would have
    run on scaled values: Lightning rightly refuses that, so the recipe asks for the unfused one."""
    adamw = ["optimizer=adamw", "trainer.accelerator=cpu"]
    assert fused_where_supported(compose([*adamw, "trainer.precision=16-mixed"], "x")) == {}
    assert fused_where_supported(compose([*adamw, "trainer.precision=16-mixed", "trainer.gradient_clip_val=null"],
                                         "x")) == {"fused": True}
    assert fused_where_supported(compose([*adamw, "trainer.precision=bf16-mixed"], "x")) == {"fused": True}
