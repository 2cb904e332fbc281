"""Optimizer policy and schedule of the LightningModule."""

import math

import pytest
import torch

from llmtrain.model import GPT, GPTConfig
from llmtrain.module import LanguageModel, lr_factor, param_groups


def test_warmup_then_cosine_to_min():
    f = [lr_factor(s, warmup_steps=10, max_steps=110, min_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:110], f[11:111]))
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)


def test_weight_decay_on_matrices_only():
    m = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=2, tie_weights=True))
    decay, no_decay = param_groups(m)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == m.num_params()
    names_no_decay = {n for n, p in m.named_parameters() if any(p is q for q in no_decay["params"])}
    assert "ln_f.weight" in names_no_decay and "blocks.0.attn.out_proj.bias" in names_no_decay


def test_optimizer_partial_and_schedule_step_per_optimizer_step():
    from functools import partial

    m = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    module = LanguageModel(m, partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), warmup_steps=4,
                           max_steps=20, min_lr_ratio=0.1)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)


def test_a_checkpoint_restores_every_random_generator():
    """on_save_checkpoint stores Python's, NumPy's and torch's generators; a resumed module puts them back at
    on_train_start, so that the next random numbers (dropout, sampling) are those of the uninterrupted run."""
    import random
    from functools import partial
    from types import SimpleNamespace

    import numpy as np

    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.rand()

    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    saved, checkpoint = LanguageModel(model, partial(torch.optim.AdamW), 0, 10, 0.1), {}
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    saved.on_save_checkpoint(checkpoint)
    expected = draws()

    torch.manual_seed(9), random.seed(9), np.random.seed(9)  # a new process: other states
    resumed = LanguageModel(model, partial(torch.optim.AdamW), 0, 10, 0.1)
    resumed.on_load_checkpoint(checkpoint)
    resumed.trainer = SimpleNamespace(world_size=1, global_rank=0)
    resumed.on_train_start()
    assert draws() == expected


def test_the_chunked_head_and_loss_give_the_plain_loss_and_gradients():
    """LanguageModel's lm loss through GPT.hidden + the chunked head equals the plain path through the logits,
    on a GPT with a tied head (the embedding gets both gradients)."""
    from functools import partial

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, tie_weights=True))
    batch = {"input_ids": torch.randint(0, 97, (3, 16)), "labels": torch.randint(0, 97, (3, 16))}
    batch["labels"][1, :5] = -100
    results = []
    for chunk in (None, 7):
        model.zero_grad()
        module = LanguageModel(model, partial(torch.optim.AdamW), 0, 10, 0.1, loss_chunk=chunk)
        loss, n = module._lm_loss(batch)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (plain, n_plain, grads_plain), (chunked, n_chunked, grads_chunked) = results
    assert n_plain == n_chunked == 43
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_chunked[name], grad, atol=1e-5, rtol=1e-4, msg=name)
