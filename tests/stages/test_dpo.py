"""DPO: the loss and its gradient against a direct computation, the reference model (frozen copy or, with LoRA, the
base with adapters disabled), the exact mean over the pairs of an accumulated step, and what checkpoints hold."""

import copy
import json
import math
import re
import subprocess
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import read_hparams, read_scalars, run_cli
from torch.utils.data import DataLoader

from llmtrain.data.tables import pad_batch
from llmtrain.errors import UserError
from llmtrain.interop.hf import export_hf
from llmtrain.interop.lora import apply_lora
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.dpo import DPO, PAIR_STATS, frozen_copy, reference_for, sequence_logps
from llmtrain.training.module import LanguageModel

BETA = 0.5
VOCAB = 61


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0) | kw
    return GPT(GPTConfig(**config))


def dpo(reference: torch.nn.Module | None, beta: float = BETA) -> DPO:
    """The DPO stage as its YAML builds it, with `reference` as the reference its build_model would take."""
    stage = DPO(train_blocks="all", lora=None, beta=beta, num_samples=0, sample_tokens=0)
    stage.reference = reference
    return stage


def nudged(model: GPT, seed: int = 1, scale: float = 0.05) -> GPT:
    """A copy of model with every weight moved a little: a policy some steps away from its reference."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def pair_batch(n_pairs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """n_pairs pairs of random prompts and responses of different lengths, as the preference collate lays them out:
    chosen rows first, then the rejected rows; labels -100 on the prompt and the padding."""
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    for side in range(2):
        for i in range(n_pairs):
            prompt = torch.randint(0, VOCAB, (3 + i,), generator=g).tolist()
            response = torch.randint(0, VOCAB, (2 + (3 * i + 5 * side) % 7,), generator=g).tolist()
            full = prompt + response
            seqs.append(full[:-1])
            labels.append([-100] * (len(prompt) - 1) + full[len(prompt):])
    return pad_batch(seqs, 0, labels)


def direct_logp(model: GPT, input_ids: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """log pi(response | prompt) of each row, one token at a time from the softmax over the vocabulary."""
    probs = torch.softmax(model(input_ids), dim=-1)  # (N, T, V)
    out = []
    for row in range(input_ids.size(0)):
        total = torch.zeros(())
        for t in range(input_ids.size(1)):
            if labels[row, t] != -100:
                total = total + torch.log(probs[row, t, labels[row, t]])
        out.append(total)
    return out


def direct_dpo(policy: GPT, reference: GPT, batch: dict[str, torch.Tensor], beta: float) -> dict:
    """The paper's eq. 7 written out pair by pair: the mean loss, and each pair's rewards."""
    pi = direct_logp(policy, batch["input_ids"], batch["labels"])
    with torch.no_grad():
        ref = direct_logp(reference, batch["input_ids"], batch["labels"])
    b = len(pi) // 2
    losses, chosen, rejected = [], [], []
    for i in range(b):
        z = beta * ((pi[i] - pi[b + i]) - (ref[i] - ref[b + i]))
        losses.append(-torch.log(1 / (1 + torch.exp(-z))))
        chosen.append(float(beta * (pi[i] - ref[i])))
        rejected.append(float(beta * (pi[b + i] - ref[b + i])))
    return {"loss": sum(losses) / b, "chosen": chosen, "rejected": rejected}


def test_sequence_logps_sums_the_response_tokens_only():
    model = tiny_gpt()
    batch = pair_batch(2)
    got = sequence_logps(model(batch["input_ids"]), batch["labels"])
    expected = torch.stack(direct_logp(model, batch["input_ids"], batch["labels"]))
    assert torch.allclose(got, expected, atol=1e-5)
    assert (batch["labels"] == -100).sum(dim=1).min() >= 2  # every row has masked positions to leave out


def test_loss_rewards_and_gradient_equal_a_direct_computation():
    reference = tiny_gpt()
    policy = nudged(reference)
    batch = pair_batch(3)
    stats = dpo(frozen_copy(reference)).pair_stats(policy, batch)
    stats["loss"].mean().backward()

    twin = copy.deepcopy(policy)
    twin.zero_grad()
    expected = direct_dpo(twin, reference, batch, BETA)
    expected["loss"].backward()

    assert stats["loss"].mean().item() == pytest.approx(expected["loss"].item(), abs=1e-6)
    assert stats["rewards/chosen"].tolist() == pytest.approx(expected["chosen"], abs=1e-5)
    assert stats["rewards/rejected"].tolist() == pytest.approx(expected["rejected"], abs=1e-5)
    margins = [c - r for c, r in zip(expected["chosen"], expected["rejected"], strict=True)]
    assert stats["rewards/margin"].tolist() == pytest.approx(margins, abs=1e-5)
    assert stats["rewards/accuracy"].tolist() == [float(m > 0) for m in margins]
    assert 0 < sum(m > 0 for m in margins) < 3  # the batch tells a right and a wrong ranking apart
    for (name, p), q in zip(policy.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert set(stats) == set(PAIR_STATS)


def test_at_the_start_the_policy_is_its_reference():
    """Step 0: every reward is exactly 0, the loss log 2, and no pair counts as ranked right."""
    policy = tiny_gpt()
    stats = dpo(reference_for(policy)).pair_stats(policy, pair_batch(3))
    assert torch.equal(stats["rewards/chosen"], torch.zeros(3))
    assert torch.allclose(stats["loss"], torch.full((3,), math.log(2)))
    assert stats["rewards/accuracy"].sum() == 0


def test_evaluation_averages_over_the_pairs_of_every_batch():
    """Batches of 1 and 3 pairs: each metric is the mean over the 4 pairs, not the mean of the two batch means."""
    start = tiny_gpt()
    policy, stage = nudged(start), dpo(frozen_copy(start))
    batches = [pair_batch(1, seed=1), pair_batch(3, seed=2)]
    with torch.no_grad():
        sums = [stage.eval_sums(policy, batch) for batch in batches]
        metrics = stage.eval_metrics({name: sums[0][name] + sums[1][name] for name in sums[0]})
        stats = [stage.pair_stats(policy, batch) for batch in batches]
    assert sums[0]["count"] == 1 and sums[1]["count"] == 3
    for name in PAIR_STATS:
        expected = torch.cat([s[name] for s in stats]).double().mean().item()
        assert metrics[name].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), name


def test_the_reference_of_a_plain_model_is_a_frozen_copy_of_its_starting_weights():
    policy = tiny_gpt(tie_weights=True)
    reference = reference_for(policy)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)  # the policy trains on
    assert all(torch.equal(v, start[k]) for k, v in reference.state_dict().items())
    assert not any(p.requires_grad for p in reference.parameters())
    assert reference.tied  # tied within the copy, as in the model


def test_beta_must_be_positive():
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo(None, beta=0.0)


def fit_one_step(module: LanguageModel, batches: list[dict], accumulate: int) -> None:
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))


def test_one_step_averages_over_the_pairs_of_the_accumulated_step_and_the_reference_stays_put():
    """Micro-batches of 1 and 3 pairs accumulated into one SGD step (lr 1) move the weights by minus the gradient
    of the mean loss over all 4 pairs -- not the mean of the two micro-batch means; the reference gets no gradient
    and keeps its weights."""
    start = tiny_gpt()
    policy = nudged(start)  # away from its reference, so that the gradient differs from pair to pair
    small, large = pair_batch(1, seed=1), pair_batch(3, seed=2)

    twin = copy.deepcopy(policy)
    a, b = direct_dpo(twin, start, small, BETA), direct_dpo(twin, start, large, BETA)
    ((a["loss"] * 1 + b["loss"] * 3) / 4).backward()
    expected = {n: -p.grad for n, p in twin.named_parameters()}

    preference = dpo(frozen_copy(start))
    reference_before = copy.deepcopy(preference.reference.state_dict())
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    module = LanguageModel(policy, preference, partial(torch.optim.SGD, lr=1.0), 0, 1, 1.0)
    fit_one_step(module, [small, large], accumulate=2)
    for n, p in policy.named_parameters():
        assert torch.allclose(p.detach() - before[n], expected[n], atol=1e-5), n
    assert all(p.grad is None and not p.requires_grad for p in preference.reference.parameters())
    for k, v in preference.reference.state_dict().items():
        assert torch.equal(v, reference_before[k]), k


def test_with_lora_the_reference_is_the_base_with_adapters_disabled_and_no_copy():
    base = tiny_gpt()
    plain = frozen_copy(base)  # what the base computes, kept aside for the comparison only
    policy = apply_lora(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)  # adapters that change the output
    preference = dpo(reference_for(policy))
    assert preference.reference is None and list(preference.parameters()) == []
    module = LanguageModel(policy, preference, partial(torch.optim.SGD, lr=0.1), 0, 1, 1.0)
    assert sum(isinstance(m, GPT) for m in module.modules()) == 1  # one model in memory, not two
    batch = pair_batch(2)
    ref = preference.reference_logps(policy, batch["input_ids"], batch["labels"])
    assert torch.allclose(ref, sequence_logps(plain(batch["input_ids"]), batch["labels"]), atol=1e-5)
    with_adapters = sequence_logps(policy(batch["input_ids"]), batch["labels"])  # adapters back on afterwards
    assert (with_adapters - ref).abs().max() > 1e-3
    assert policy.training == module.training  # the reference pass put the policy back in its mode

    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    fit_one_step(module, [batch], accumulate=1)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if n in frozen)
    assert any(not torch.equal(p, adapters[n]) for n, p in policy.named_parameters() if n in adapters)


def test_the_reference_runs_without_dropout_whatever_the_policy_mode():
    reference = tiny_gpt(drop_rate=0.5)
    policy = copy.deepcopy(reference).train()
    preference = dpo(frozen_copy(reference))
    preference.train()  # Lightning puts every submodule in training mode
    batch = pair_batch(2)
    first = preference.reference_logps(policy, batch["input_ids"], batch["labels"])
    second = preference.reference_logps(policy, batch["input_ids"], batch["labels"])
    assert torch.equal(first, second)  # no dropout: no random numbers drawn, the same values every time
    assert preference.reference.training  # and its mode is given back


def test_checkpoints_leave_the_reference_out_and_a_resume_puts_it_back():
    start = tiny_gpt()
    preference = dpo(frozen_copy(start))
    module = LanguageModel(nudged(start), preference, partial(torch.optim.SGD, lr=1.0), 0, 1, 1.0)
    checkpoint = {"state_dict": module.state_dict()}
    assert any(k.startswith("stage.reference.") for k in checkpoint["state_dict"])
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("model.") for k in checkpoint["state_dict"])

    resumed = LanguageModel(tiny_gpt(seed=5), dpo(frozen_copy(start)), partial(torch.optim.SGD, lr=1.0), 0, 1, 1.0)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])  # strict: every key is there
    for (n, p), q in zip(resumed.model.state_dict().items(), module.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert all(torch.equal(p, q) for p, q in zip(resumed.stage.reference.parameters(), start.parameters(),
                                                 strict=True))


def test_without_a_reference_the_policy_must_be_a_peft_model():
    with pytest.raises(ValueError, match="needs a peft policy"):
        dpo(None).pair_stats(tiny_gpt(), pair_batch(2))


# ---- the stage's config checks ----

def test_the_stage_checks_its_data_and_beta(tmp_path):
    from conftest import compose

    from llmtrain.run.resolve import resolve_run

    start = export_start(tmp_path / "instruct")
    run = resolve_run(compose(["finetune=dpo", f"init_from={start}"], tmp_path))
    assert run.tokenizer == "bytes" and run.model_config.drop_rate == 0.0
    cases = {("finetune.beta=0",): "finetune.beta must be positive",
             ("finetune.beta=-1", "data=instruct_embedded"): "finetune.beta must be positive (how far the policy may "
                                                              "move from the reference; 0.1 is usual), got -1; the dpo "
                                                              "stage trains on a PreferenceDataModule but data is "
                                                              "llmtrain.data.tables.InstructDataModule: choose "
                                                              "data=preference_embedded or data=truthy_dpo",
             ("finetune=instruct", "finetune._target_=llmtrain.stages.dpo.DPO", "data=preference_embedded"):
                 "the dpo stage needs finetune.beta: set finetune.beta=..., or choose its own preset (finetune=dpo)"}
    for overrides, message in cases.items():
        args = ["finetune=dpo", f"init_from={start}", *overrides] if overrides[0] != "finetune=instruct" else \
            [*overrides, f"init_from={start}"]
        with pytest.raises(UserError, match=re.escape(message)):
            resolve_run(compose(args, tmp_path))


def test_a_dpo_checkpoint_resumes_only_against_its_own_reference(tmp_path):
    from llmtrain.interop.checkpoints import ModelInfo
    from llmtrain.run.checks import check_resume

    config = tiny_gpt().config
    info = ModelInfo(kind="llmtrain", path="x.ckpt", model_config=config, stage="dpo", init_from="runs/instruct")
    check_resume(info, config, dpo(None), "x.ckpt", "runs/instruct")
    with pytest.raises(UserError, match="resume with init_from=runs/instruct"):
        check_resume(info, config, dpo(None), "x.ckpt", "runs/other")


# ---- the stage from the command line ----

def export_start(folder: Path) -> Path:
    """A tiny byte-level model exported as an instruct run leaves it: the DPO stage's usual init_from."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, context_length=320, emb_dim=32, n_heads=2, n_layers=2, tie_weights=True))
    meta = {"tokenizer": "bytes", "stage": "instruct", "prompt_template": "alpaca"}
    return export_hf(model, folder / "hf", meta)


STAGE = ["trainer.accelerator=cpu", "callbacks.progress_bar=null", "data.batch_size=8", "trainer.log_every_n_steps=2",
         "optimizer.lr=1e-3", "scheduler.warmup_steps=2", "finetune.num_samples=1", "finetune.sample_tokens=8"]


def write_pairs(path: Path, n: int = 240) -> Path:
    """Pairs whose preference a tiny model learns in a few steps and that holds on held-out prompts: the same answer,
    begun gladly (chosen) or curtly (rejected). On the shipped pairs a model as small and as briefly trained as the
    tests can afford stays at chance: those need the prompt understood (which definition, in which voice)."""
    rows = [{"prompt": f"Tell me about item {i}.", "chosen": f"Gladly! Item {i} weighs {i % 7 + 1} kg.",
             "rejected": f"No. Item {i} weighs {i % 7 + 1} kg."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory) -> tuple[list[str], Path, subprocess.CompletedProcess]:
    """One DPO run from the command line, from a tiny model exported as an instruct run leaves it; its arguments,
    run dir and process."""
    tmp = tmp_path_factory.mktemp("dpo")
    args = ["finetune=dpo", f"init_from={export_start(tmp / 'instruct')}", "data=preference_json",
            f"data.path={write_pairs(tmp / 'pairs.jsonl')}", *STAGE]
    run = run_cli([*args, "trainer.max_steps=10", "trainer.val_check_interval=5", f"hydra.run.dir={tmp / 'dpo'}"],
                  cwd=tmp)
    return args, tmp / "dpo", run


@pytest.mark.slow
def test_dpo_raises_val_reward_accuracy_from_the_start_and_logs_the_usual_names(dpo_run):
    args, run_dir, run = dpo_run
    assert run.returncode == 0, run.stderr[-3000:]
    assert "before fine-tuning: val/loss 0.6931, val/rewards/accuracy 0.0000" in run.stdout
    scalars = read_scalars(run_dir)
    for prefix in ("train", "val"):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
            assert f"{prefix}/{name}" in scalars, f"{prefix}/{name} missing from {sorted(scalars)}"
    accuracy = [v for _, v in sorted(scalars["val/rewards/accuracy"])]
    assert accuracy[0] == 0.0  # step 0: the policy is its reference, every reward 0
    assert accuracy[-1] > 0.5 and accuracy[-1] > accuracy[0]
    assert f"val/rewards/accuracy {accuracy[-1]:.4f}" in run.stdout.splitlines()[-1]
    margins = [v for _, v in sorted(scalars["val/rewards/margin"])]
    assert margins[-1] > 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith("model.") for k in ckpt["state_dict"])  # the reference is not saved
    assert ckpt["llmtrain"]["stage"] == "dpo" and f"init_from={ckpt['llmtrain']['init_from']}" in args
    assert ckpt["llmtrain"]["prompt_template"] == "alpaca"


@pytest.mark.slow
def test_a_resumed_dpo_run_ends_where_an_uninterrupted_one_does(dpo_run, tmp_path):
    """8 steps of 2 accumulated micro-batches (with dropout in the policy) against 4 steps, a checkpoint, and 4 more
    from it: the same weights bit for bit. The resume passes the stage check and gets its reference back from
    init_from (checkpoints do not hold it)."""
    from conftest import compose

    from llmtrain.run.train import train

    args, _, _ = dpo_run
    exact = [*args, "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
             "trainer.accumulate_grad_batches=2", "model.drop_rate=0.1", "callbacks.checkpoint.save_top_k=-1",
             "finetune.num_samples=0"]
    train(compose(exact, tmp_path / "straight"))
    train(compose([*exact, f"ckpt_path={tmp_path / 'straight' / 'checkpoints' / 'best-step4.ckpt'}"],
                  tmp_path / "resumed"))
    straight, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
                         for run in ("straight", "resumed"))
    assert straight["global_step"] == resumed["global_step"] == 8
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


@pytest.mark.slow
def test_dpo_with_lora_trains_adapters_against_the_base(dpo_run, tmp_path):
    args, _, _ = dpo_run
    lora = "finetune.lora={r:4,alpha:8,dropout:0.0,target_modules:[attn.qkv,attn.out_proj]}"
    run = run_cli([*args, lora, "trainer.max_steps=4", "trainer.val_check_interval=4",
                   f"hydra.run.dir={tmp_path / 'lora'}"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dpo: trainable params" in run.stdout + run.stderr
    assert 0 < read_hparams(tmp_path / "lora")["model.trainable_fraction"] < 0.5  # in the HPARAMS tab
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    accuracy = [v for _, v in sorted(read_scalars(tmp_path / "lora")["val/rewards/accuracy"])]
    assert accuracy[0] == 0.0 and accuracy[-1] > 0  # the adapters moved the policy away from the base


@pytest.mark.slow
def test_two_ddp_ranks_of_half_the_pairs_step_as_one_process_does(dpo_run, tmp_path):
    """The loss is a mean over all pairs of a step across ranks: 2 CPU ranks of 4 pairs (the same 8 pairs, split
    by the sampler) give one process's weights with 8 pairs per batch, up to the order of the float sums. Plain
    SGD, unclipped: AdamW would hide a gradient off by a constant factor."""
    from conftest import compose

    from llmtrain.run.train import train

    args, _, _ = dpo_run
    sgd = ["optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.eps",
           "optimizer.weight_decay=0", "optimizer.lr=0.5", "trainer.gradient_clip_val=null"]
    short = [*args, *sgd, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
             "finetune.num_samples=0", "trainer.precision=32-true"]  # fp32 on any CPU: equal up to float sums
    train(compose([*short, "data.batch_size=8"], tmp_path / "one"))
    ddp = run_cli([*short, "data.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp",
                   f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path, timeout=400)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in ddp.stdout + ddp.stderr
    one, two = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                for run in ("one", "two"))
    assert one.keys() == two.keys()
    for key, value in one.items():
        assert torch.allclose(value, two[key], atol=1e-6), key


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_reference_pass_gives_the_policy_back_in_the_mode_it_was_in(mode):
    """With LoRA the reference is the policy itself (adapters off), run in eval mode: afterwards the policy is in
    the mode it had, eval included (validation runs the pass on a policy in eval mode)."""
    policy = apply_lora(tiny_gpt(drop_rate=0.1), r=4, alpha=8, dropout=0.1)
    policy.train(mode == "train")
    batch = pair_batch(2)
    dpo(None).reference_logps(policy, batch["input_ids"], batch["labels"])
    assert policy.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in policy.modules())
