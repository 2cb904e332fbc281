"""LoRA through peft on the handwritten GPT: what trains, what stays put, save/load, merge, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmtrain.errors import UserError
from llmtrain.interop.lora import apply_lora, format_trainable, load_adapter, merge, save_adapter, trainable_summary
from llmtrain.model.gpt import GPT, GPTConfig

R = 4
CFG = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, tie_weights=True)


@pytest.fixture
def base() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**CFG)).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (4, CFG["context_length"]), generator=torch.Generator().manual_seed(1))


def lora_count(model: nn.Module, targets: tuple[str, ...], r: int = R) -> int:
    """A (r, in) + B (out, r) per targeted linear."""
    return sum(
        r * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in targets)
    )


def train_steps(model: nn.Module, tokens: torch.Tensor, steps: int = 5, classes: int | None = None) -> None:
    """A few AdamW steps: next-token cross-entropy, or with `classes` the last position's class."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = tokens[:, 0] % classes if classes else None
    for _ in range(steps):
        logits = model(tokens[:, :-1])  # (B, T-1, V or classes)
        if classes:
            loss = F.cross_entropy(logits[:, -1], labels)
        else:
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def randomise_lora_b(model: nn.Module) -> None:
    """B starts at zero; give it values so that the adapters change the output."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)


def test_only_lora_params_train_and_count(base):
    total_base = base.num_params()
    pm = apply_lora(copy.deepcopy(base), r=R)
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    expected = lora_count(base, ("attn.qkv", "attn.out_proj"))
    assert expected == CFG["n_layers"] * R * ((32 + 96) + (32 + 32))
    trainable, total, fraction = trainable_summary(pm)
    assert (trainable, total) == (expected, total_base + expected)  # tied head/embedding counted once
    assert fraction == pytest.approx(expected / (total_base + expected))
    assert format_trainable(pm) == f"trainable params: {expected:,} of {total:,} ({expected / total:.2%})"
    # the LM head stays frozen and tied to the embedding
    inner = pm.base_model.model
    assert type(inner.head) is nn.Linear and inner.tied
    assert not inner.head.weight.requires_grad

    targets = ("attn.qkv", "attn.out_proj", "mlp.fc1", "mlp.fc2")
    pm_all = apply_lora(copy.deepcopy(base), r=R, target_modules=list(targets))
    grown = lora_count(base, targets)
    assert trainable_summary(pm_all)[0] == grown == expected + CFG["n_layers"] * R * 2 * (32 + 128)


def test_training_changes_only_lora(base, tokens):
    pm = apply_lora(copy.deepcopy(base), r=R, dropout=0.0)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    train_steps(pm, tokens)
    for n, p in pm.named_parameters():
        if "lora_" in n:  # B leaves zero on step 1; A's gradient is zero until then, and it moves after
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_fresh_lora_is_identity_then_diverges(base, tokens):
    with torch.no_grad():
        want = base(tokens)
    pm = apply_lora(copy.deepcopy(base), r=R).eval()
    with torch.no_grad():
        assert torch.equal(pm(tokens), want)
    train_steps(pm, tokens)
    with torch.no_grad():
        assert not torch.allclose(pm(tokens), want, atol=1e-4)


def test_save_load_round_trip(base, tokens, tmp_path):
    pm = apply_lora(copy.deepcopy(base), r=R, dropout=0.0)
    train_steps(pm, tokens)
    with torch.no_grad():
        want = pm(tokens)
    out = save_adapter(pm, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}

    loaded = load_adapter(copy.deepcopy(base), out).eval()
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen by default
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), want, atol=1e-6, rtol=0)

    again = load_adapter(copy.deepcopy(base), out, trainable=True)
    assert trainable_summary(again)[0] == trainable_summary(pm)[0]


def test_merge_matches_adapters(base, tokens):
    pm = apply_lora(copy.deepcopy(base), r=R, target_modules=["attn.qkv", "attn.out_proj", "mlp.fc1"]).eval()
    randomise_lora_b(pm)
    with torch.no_grad():
        want = pm(tokens)
        assert not torch.allclose(want, base(tokens), atol=1e-4)
    merged = merge(pm)
    assert type(merged) is GPT
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("qkv", "out_proj", "fc1")))
    assert set(merged.state_dict()) == set(base.state_dict())
    assert merged.tied  # still tied, and the embedding untouched
    assert torch.equal(merged.tok_emb.weight, base.tok_emb.weight)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), want, atol=1e-5, rtol=0)


def test_alpha_sets_the_adapter_scale(base):
    """peft scales B @ A by alpha / r: doubling alpha doubles a layer's update for the same A and B."""
    x = torch.randn(2, 5, CFG["emb_dim"], generator=torch.Generator().manual_seed(3))  # (B, T, emb_dim)
    deltas = []
    for alpha in (2 * R, 4 * R):  # scale 2, then 4
        torch.manual_seed(4)  # the same A and B in both
        pm = apply_lora(copy.deepcopy(base), r=R, alpha=alpha, dropout=0.0).eval()
        randomise_lora_b(pm)
        qkv = pm.base_model.model.blocks[0].attn.qkv
        assert qkv.scaling["default"] == alpha / R
        with torch.no_grad():
            deltas.append(qkv(x) - qkv.base_layer(x))  # (2, 5, 3 * emb_dim): the adapter's part alone
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[1], 2 * deltas[0], atol=1e-6, rtol=1e-5)


def with_class_head(model: GPT, classes: int = 3) -> GPT:
    torch.manual_seed(2)
    model.head = nn.Linear(model.config.emb_dim, classes)  # a new module: no longer tied to tok_emb
    return model


def test_classification_head_trains_and_round_trips(base, tokens, tmp_path):
    model = with_class_head(copy.deepcopy(base))
    head_before = model.head.weight.detach().clone()
    pm = apply_lora(model, r=R, dropout=0.0, modules_to_save=["head"])
    extra = [n for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n]
    assert extra and all(".head.modules_to_save." in n for n in extra)
    trainable = trainable_summary(pm)[0]
    assert trainable == lora_count(base, ("attn.qkv", "attn.out_proj")) + 32 * 3 + 3

    train_steps(pm, tokens, classes=3)
    inner = pm.base_model.model
    assert not torch.equal(inner.head.modules_to_save["default"].weight, head_before)
    assert torch.equal(inner.tok_emb.weight, base.tok_emb.weight)
    with torch.no_grad():
        want = pm(tokens)
    assert want.shape == (*tokens.shape, 3)

    out = save_adapter(pm, tmp_path / "cls")
    fresh = with_class_head(copy.deepcopy(base))  # same shape, different init: the saved head must replace it
    with torch.no_grad():
        fresh.head.weight.zero_()
    loaded = load_adapter(fresh, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), want, atol=1e-6, rtol=0)
    merged = merge(loaded)
    assert type(merged.head) is nn.Linear and merged.head.out_features == 3
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), want, atol=1e-5, rtol=0)


def test_bad_target_is_a_user_error(base):
    with pytest.raises(UserError, match=r"'attn\.qkvv' matches no linear layer") as err:
        apply_lora(copy.deepcopy(base), target_modules=["attn.qkv", "attn.qkvv"])
    msg = str(err.value)
    assert msg.startswith("finetune.lora.target_modules") and "\n" not in msg
    assert "attn.qkv, attn.out_proj, mlp.fc1, mlp.fc2, head" in msg
    with pytest.raises(UserError, match="'ln1' matches no linear layer"):  # a module, but not a linear one
        apply_lora(copy.deepcopy(base), target_modules=["ln1"])
    with pytest.raises(UserError, match="modules_to_save: 'haed'"):
        apply_lora(copy.deepcopy(base), modules_to_save=["haed"])


def test_tied_head_cannot_be_targeted(base):
    with pytest.raises(UserError, match=r"'head' shares its weight with 'tok_emb'.*model\.tie_weights=false"):
        apply_lora(copy.deepcopy(base), target_modules=["attn.qkv", "head"])
    untied = copy.deepcopy(base)
    untied.head.weight = nn.Parameter(untied.head.weight.detach().clone())
    pm = apply_lora(untied, r=R, target_modules=["head"])
    assert trainable_summary(pm)[0] == R * (32 + CFG["vocab_size"])


def test_missing_adapter_is_a_user_error(base, tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        load_adapter(base, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no adapter_config.json"):
        load_adapter(base, tmp_path / "empty")


def test_a_target_matches_a_whole_name_or_a_suffix_after_a_dot(base):
    """peft's rule: "proj" is no suffix of blocks.0.attn.out_proj after a dot, so it must fail here, in one line."""
    with pytest.raises(UserError, match=r"^finetune\.lora\.target_modules: 'proj' matches no linear layer"):
        apply_lora(copy.deepcopy(base), target_modules=["proj"])
    pm = apply_lora(copy.deepcopy(base), r=R, target_modules=["out_proj", "blocks.1.mlp.fc1"])
    adapted = sorted(n.removesuffix(".lora_A.default") for n, _ in pm.named_modules() if n.endswith(".lora_A.default"))
    assert adapted == ["base_model.model.blocks.0.attn.out_proj", "base_model.model.blocks.1.attn.out_proj",
                       "base_model.model.blocks.1.mlp.fc1"]


@pytest.mark.parametrize("r", [0, -1])
def test_a_rank_below_one_is_a_user_error(base, r):
    with pytest.raises(UserError, match=rf"^finetune\.lora\.r must be a positive integer, got {r}"):
        apply_lora(copy.deepcopy(base), r=r)
