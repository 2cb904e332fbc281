"""Optimizer policy: parameter groups by role, the warmup + cosine schedule, Muon with AdamW."""

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, lm_stage

from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.train import build
from llmtrain.training import optim
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import MuonAdamW, lr_factor, param_groups

MUON = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, adjust_lr_fn="original",
            embedding_lr=3e-3, head_lr=2e-3, scalar_lr=1e-3, adamw_betas=(0.9, 0.95), adamw_eps=1e-8,
            adamw_weight_decay=0.0)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**(dict(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=2) | kw)))


def names_in(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_warmup_then_cosine_to_min():
    f = [lr_factor(s, warmup_steps=10, max_steps=110, min_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:110], f[11:111]))
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)


def test_warmup_stable_then_linear_cooldown_to_min():
    f = [lr_factor(s, warmup_steps=10, max_steps=110, min_ratio=0.0, cooldown_fraction=0.2) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:88])  # held at the peak until the last 22 steps
    assert f[88] == pytest.approx(1.0) and f[89] == pytest.approx(21 / 22) and f[109] == pytest.approx(1 / 22)
    assert all(a > b for a, b in zip(f[88:110], f[89:111]))  # then linear, down to min_ratio at max_steps
    assert f[110] == 0.0 and f[119] == 0.0


def test_groups_by_role_and_weight_decay_on_matrices_only():
    m = tiny(tie_weights=False)
    groups = {g["name"]: g for g in param_groups(m)}
    assert list(groups) == ["matrix", "embedding", "head", "scalar"]
    assert names_in(m, groups["matrix"]) == {f"blocks.{i}.{w}.weight" for i in range(2)
                                            for w in ("attn.qkv", "attn.out_proj", "mlp.fc1", "mlp.fc2")}
    assert names_in(m, groups["embedding"]) == {"tok_emb.weight", "pos_emb.weight"}
    assert names_in(m, groups["head"]) == {"head.weight"}
    assert all(p.dim() == 1 for p in groups["scalar"]["params"]) and groups["scalar"]["weight_decay"] == 0.0
    assert all("weight_decay" not in groups[r] for r in ("matrix", "embedding", "head"))  # the optimizer's
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == m.num_params()

    tied = {g["name"]: g for g in param_groups(tiny(tie_weights=True))}
    assert "head" not in tied  # the tied head is the token embedding, counted once
    assert tied["embedding"]["tied_to_head"] and "tied_to_head" not in groups["embedding"]


def test_muon_trains_an_untied_table_at_embedding_lr_and_a_tied_one_at_the_head_lr():
    """An untied table's rows move only where their token occurs, and take a high rate (0.1 by default); a table
    that is also the head gets a dense gradient from every position, and the head's rate."""
    lrs = {}
    for tie in (False, True):
        opt = MuonAdamW(param_groups(tiny(tie_weights=tie)), **MUON)
        lrs[tie] = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs[False] == {"matrix": 0.02, "embedding": 3e-3, "head": 2e-3, "scalar": 1e-3}
    assert lrs[True] == {"matrix": 0.02, "embedding": 2e-3, "scalar": 1e-3}


def test_frozen_parameters_are_left_out():
    m = tiny()
    m.requires_grad_(False)
    m.blocks[1].requires_grad_(True)
    assert {n for g in param_groups(m) for n in names_in(m, g)} == {n for n, _ in m.blocks[1].named_parameters(
        prefix="blocks.1")}


def test_adamw_partial_and_schedule_step_per_optimizer_step():
    module = LanguageModel(tiny(), lm_stage(), partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), warmup_steps=4,
                           max_steps=20, min_lr_ratio=0.1)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"matrix": 0.1, "embedding": 0.1, "head": 0.1, "scalar": 0.0}
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)


def test_muon_takes_the_block_matrices_and_adamw_the_rest_each_with_its_lr():
    m = tiny(tie_weights=False)
    opt = MuonAdamW(param_groups(m), **MUON)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert {n: g["optimizer"] for n, g in by_name.items()} == {
        "matrix": "muon", "embedding": "adamw", "head": "adamw", "scalar": "adamw"}
    assert {n: g["lr"] for n, g in by_name.items()} == {"matrix": 0.02, "embedding": 3e-3, "head": 2e-3,
                                                        "scalar": 1e-3}
    assert opt._muon.param_groups == [by_name["matrix"]]
    assert isinstance(opt._muon, torch.optim.Muon) and isinstance(opt._adamw, torch.optim.AdamW)


def loss_of(model: GPT, seed: int) -> torch.Tensor:
    x = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(seed))
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def train_steps(model, opt, sched, seeds):
    for seed in seeds:
        opt.zero_grad()
        loss_of(model, seed).backward()
        opt.step()
        sched.step()


def test_muon_learns_and_its_state_survives_a_checkpoint_bit_for_bit():
    """Five steps, a state_dict as Lightning saves it, a fresh optimizer that loads it, five more steps:
    the weights equal ten uninterrupted steps exactly, and the schedule drives both inner optimizers."""

    def fresh(model):
        opt = MuonAdamW(param_groups(model), **MUON)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 2, 10, 0.1))

    learner = tiny()
    opt, sched = fresh(learner)
    before = loss_of(learner, 0).item()
    train_steps(learner, opt, sched, [0] * 10)  # one batch, ten times: its loss must fall
    assert loss_of(learner, 0).item() < before - 0.2

    whole = tiny()
    opt, sched = fresh(whole)
    train_steps(whole, opt, sched, range(10))
    assert opt._muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.1)  # the schedule reached Muon's groups
    assert opt._adamw.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.1)

    half = tiny()
    opt, sched = fresh(half)
    train_steps(half, opt, sched, range(5))
    saved = copy.deepcopy({"model": half.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    resumed = tiny()
    resumed.load_state_dict(saved["model"])
    opt, sched = fresh(resumed)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert opt._muon.state is opt.state and opt._muon.param_groups[0] is opt.param_groups[0]
    train_steps(resumed, opt, sched, range(5, 10))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_muon_preset_builds_this_optimizer(tmp_path):
    cfg = compose(["optimizer=muon"], tmp_path)
    opt = build(cfg.optimizer)(param_groups(tiny()))
    assert isinstance(opt, MuonAdamW) and opt._muon.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_where_bf16_is_native_our_muon_steps_as_torchs_does(monkeypatch, adjust_lr_fn):
    """Three steps on a tall, a wide and a square matrix with Nesterov momentum and weight decay: bit for bit
    torch.optim.Muon's, whose Newton-Schulz iterations always run in bf16."""
    monkeypatch.setattr(optim, "native_bf16", lambda device: True)
    torch.manual_seed(0)
    shapes = [(24, 8), (8, 24), (16, 16)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    a, b = optim.Muon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    for step in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + p.numel()))
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])


def test_without_native_bf16_newton_schulz_runs_in_fp32(monkeypatch):
    """On a CPU without bf16 units the iterations run in fp32 (bf16 there is emulated, many times slower): the
    result is still Muon's semi-orthogonal update (singular values in about (0.5, 1.5)) and within bf16's
    rounding of the bf16 result."""
    torch.manual_seed(0)
    g = torch.randn(24, 8)
    fp32 = optim.orthogonalize(g, 5, (3.4445, -4.7750, 2.0315), 1e-7, torch.float32)
    bf16 = optim.orthogonalize(g, 5, (3.4445, -4.7750, 2.0315), 1e-7, torch.bfloat16)
    assert fp32.dtype == torch.float32 and fp32.shape == g.shape
    singular = torch.linalg.svdvals(fp32)
    assert singular.min() > 0.5 and singular.max() < 1.5
    assert (fp32 - bf16.float()).abs().max() < 0.05
    used = []
    monkeypatch.setattr(optim, "native_bf16", lambda device: False)
    real = optim.orthogonalize
    monkeypatch.setattr(optim, "orthogonalize", lambda *args: used.append(args[-1]) or real(*args))
    p = torch.nn.Parameter(torch.randn(24, 8))
    p.grad = g
    optim.Muon([p], lr=0.02, adjust_lr_fn="original").step()
    assert used == [torch.float32]


def test_muon_settings_other_than_the_defaults_reach_the_optimizers(tmp_path):
    """optimizer.ns_steps and optimizer.adamw_weight_decay from the command line end up in the inner optimizers'
    groups, and another number of Newton-Schulz iterations gives another update."""
    cfg = compose(["optimizer=muon", "optimizer.ns_steps=2", "optimizer.adamw_weight_decay=0.25"], tmp_path)
    assert cfg.optimizer.ns_steps != compose(["optimizer=muon"], tmp_path).optimizer.ns_steps  # not the default
    opt = build(cfg.optimizer)(param_groups(tiny()))
    assert opt._muon.param_groups[0]["ns_steps"] == 2
    assert {g["weight_decay"] for g in opt._adamw.param_groups if g["name"] != "scalar"} == {0.25}

    steps = []
    for ns in (2, 5):
        model = tiny()
        opt = build(compose(["optimizer=muon", f"optimizer.ns_steps={ns}"], tmp_path).optimizer)(param_groups(model))
        loss_of(model, seed=0).backward()
        opt.step()
        steps.append(model.blocks[0].attn.qkv.weight.detach().clone())
    assert not torch.equal(*steps)
