"""The memory pre-flight: the estimate against what real runs hold, and the one-line refusal before anything starts."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, compose, subprocess_env, write_checkpoint

from llmtrain.errors import UserError
from llmtrain.run import memory
from llmtrain.run.resolve import resolve_run

GIB = 2**30


def checked(overrides: list[str], tmp_path):
    cfg = compose(overrides, tmp_path)
    return cfg, resolve_run(cfg)



def checked_fp32(overrides: list[str], tmp_path):
    """checked() at fp32 on any CPU (trainer.precision=auto would be bf16-mixed on one with native bf16)."""
    return checked([*overrides, "trainer.precision=32-true"], tmp_path)

# Two CPU shapes whose peak is made of different things: a wide vocabulary (the logits, two chunks of the default
# perf.loss_chunk), a deep and wide stack at a small vocabulary (the activations); 2 optimizer steps (the second
# runs with AdamW's state), fp32 on any CPU.
SHAPES = {
    "logits": ["data.tokenizer=gpt2", "model.vocab_size=50257", "model.emb_dim=64", "model.n_layers=2",
               "model.n_heads=2", "model.context_length=128", "data.batch_size=16"],
    "activations": ["data.tokenizer=bytes", "model.vocab_size=257", "model.emb_dim=256", "model.n_layers=8",
                    "model.n_heads=4", "model.context_length=256", "data.batch_size=16"],
}
SHORT = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=2",
         "trainer.val_check_interval=1000", "trainer.limit_val_batches=1", "callbacks.progress_bar=null",
         "data.max_documents=100", "scheduler.warmup_steps=1"]


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_estimate_is_within_30_percent_of_the_measured_peak(tmp_path, shape):
    """The peak resident memory of a real run (the command line, in a process of its own) against the estimate."""
    args = [*SHORT, *SHAPES[shape]]
    cfg, eff = checked(args, tmp_path / "run")
    est = memory.estimate(cfg, eff)
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
    assert status == 0, proc.stderr.read().decode()[-3000:]
    measured = usage.ru_maxrss * 1024  # Linux: KiB
    part = max(("activations", "logits"), key=lambda k: getattr(est, k))
    assert part == shape  # the shape tests what it means to
    assert est.total == pytest.approx(measured, rel=0.3), f"estimate {est}, measured {measured / GIB:.2f} GiB"


def test_a_run_that_cannot_fit_stops_in_one_line_naming_the_estimate_the_limit_and_the_levers(tmp_path, monkeypatch):
    """The README's `model=gpt124m trainer.devices=4` on a CPU machine with 40 GiB available: one process would fit,
    four that share the RAM do not."""
    monkeypatch.setattr(memory, "available_ram", lambda: 40 * GIB)
    memory.preflight(*checked(["model=gpt124m"], tmp_path))
    cfg, eff = checked(["model=gpt124m", "trainer.devices=4", "trainer.precision=32-true"], tmp_path)
    with pytest.raises(UserError) as e:
        memory.preflight(cfg, eff)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"the run needs about {memory.estimate(cfg, eff)} but the 4 processes of "
                              f"trainer.devices=4 share 40.0 GiB of available RAM: lower data.batch_size (and raise "
                              f"trainer.accumulate_grad_batches, or set tokens_per_step")
    assert message.endswith("set perf.activation_checkpointing=true, use fewer trainer.devices, use "
                            "trainer.precision=bf16-mixed, or set perf.memory_gb to a higher limit")
    cfg, eff = checked(["model=gpt124m", "data.batch_size=1", "perf.memory_gb=30"], tmp_path)
    assert memory.preflight(cfg, eff).total < 30 * GIB  # a lever applied, and a limit given: it runs


def test_on_gpus_the_limit_is_each_gpus_memory_and_fsdp_shards_the_states(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # eight simulated 40 GiB A100s
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=40 * GIB))
    cfg, eff = checked(["model=gpt1558m", "trainer.devices=8", "trainer.strategy=ddp", "data.batch_size=8"], tmp_path)
    with pytest.raises(UserError, match=r"but NVIDIA A100-SXM4-40GB has 40\.0 GiB: .*shard weights, gradients and "
                                        r"optimizer state over the GPUs with trainer=fsdp, or set perf.memory_gb"):
        memory.preflight(cfg, eff)
    ddp = memory.estimate(cfg, eff)
    cfg, eff = checked(["model=gpt1558m", "trainer=fsdp", "data.batch_size=8"], tmp_path)
    fsdp = memory.preflight(cfg, eff)
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 8) and fsdp.gradients == pytest.approx(ddp.gradients / 8)
    assert fsdp.activations < ddp.activations / 5  # the preset checkpoints every block's activations
    assert fsdp.weights < ddp.weights / 5


def test_the_estimate_follows_what_trains(tmp_path, base_ckpt):
    """Pretraining trains everything; the classify stage its last block and head (no activations kept below it);
    LoRA only its adapters (but a gradient passes through every block)."""
    pre = memory.estimate(*checked_fp32(["model=checkpoint", f"init_from={base_ckpt}", "data.tokenizer=bytes"],
                                        tmp_path))
    cls = memory.estimate(*checked_fp32(["finetune=classify", f"init_from={base_ckpt}"], tmp_path))
    lora = memory.estimate(*checked_fp32(["finetune=instruct", "lora=default", f"init_from={base_ckpt}"], tmp_path))
    assert pre.gradients > cls.gradients > lora.gradients > 0
    assert cls.activations < pre.activations / 2 and lora.activations > cls.activations
    lora_params = 4 * 4 * 8 * (32 + 96 + 32 + 32)  # 4 blocks x (qkv 32->96, out_proj 32->32) x r=8, fp32 grads
    assert lora.gradients == lora_params
    ckpt = memory.estimate(*checked_fp32(["model=checkpoint", f"init_from={base_ckpt}", "data.tokenizer=bytes",
                                     "perf.activation_checkpointing=true"], tmp_path))
    assert ckpt.activations < pre.activations
    # DPO: a pair is two sequences through the policy, and a frozen copy of the start is the reference (with
    # LoRA the base itself is, its adapters disabled); the classifier's head (bias-free) is counted under LoRA
    ins = memory.estimate(*checked_fp32(["finetune=instruct", f"init_from={base_ckpt}", "data.max_length=64"],
                                        tmp_path))
    dpo = memory.estimate(*checked_fp32(["finetune=dpo", f"init_from={base_ckpt}", "data.max_length=64"], tmp_path))
    dpo_lora = memory.estimate(*checked_fp32(["finetune=dpo", f"init_from={base_ckpt}", "data.max_length=64",
                                         "lora=default", "finetune.lora.target_modules=[attn.qkv]"],
                                        tmp_path))
    assert dpo.activations == 2 * ins.activations  # 8 pairs a micro-batch, against 8 instruct records
    assert dpo.weights == 2 * ins.weights  # the frozen copy
    assert dpo_lora.weights == ins.weights + dpo_lora.gradients  # no copy: the base, and its adapters (fp32, trained)
    lora_cls = memory.estimate(*checked_fp32(["finetune=classify", "lora=default", f"init_from={base_ckpt}"], tmp_path))
    # adapters + a new head of the data's classes (2 stand in for them before the data is read: the shipped
    # classify data's own count; the checkpoint's 3-class head is replaced)
    assert lora_cls.gradients == 4 * (4 * 8 * (32 + 96 + 32 + 32) + 2 * 32)


def test_cpu_processes_sharing_the_cores_are_warned_about(tmp_path, capsys):
    memory.preflight(*checked([*TINY, "trainer.devices=2"], tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: trainer.devices=2 without a GPU starts 2 processes that share "
                                               "this machine's")
    memory.preflight(*checked(TINY, tmp_path))
    assert capsys.readouterr().err == ""
    memory.preflight(*checked([*TINY, "trainer.num_nodes=2"], tmp_path))  # one process on each of two machines
    assert capsys.readouterr().err == ""


@pytest.fixture
def base_ckpt(tmp_path):
    return write_checkpoint(tmp_path / "base.ckpt", n_layers=4, label_names=["a", "b", "c"])


def test_the_chunked_loss_keeps_the_logits_of_one_chunk(tmp_path):
    """With perf.loss_chunk the logits term is one chunk's logits plus the head's and the hidden states' gradients:
    far below all logits at once, and doubling the tokens of a micro-batch adds only their hidden-state gradients
    (emb_dim values a token), not a vocabulary's worth of logits per token."""
    wide = ["data.tokenizer=gpt2", "model.vocab_size=50257", "model.emb_dim=64", "model.n_layers=2", "model.n_heads=2",
            "model.context_length=128", "trainer.precision=32-true"]
    chunked = memory.estimate(*checked([*wide, "data.batch_size=16", "perf.loss_chunk=256"], tmp_path))
    double = memory.estimate(*checked([*wide, "data.batch_size=32", "perf.loss_chunk=256"], tmp_path))
    plain = memory.estimate(*checked([*wide, "data.batch_size=16", "perf.loss_chunk=null"], tmp_path))
    assert plain.logits == 16 * 128 * 50257 * 12  # every token's logits, log-softmax and gradients in fp32
    assert chunked.logits < plain.logits / 5
    assert double.logits - chunked.logits == 16 * 128 * 64 * 4  # the added tokens' hidden-state gradients alone
    one = memory.estimate(*checked([*wide, "data.batch_size=1", "perf.loss_chunk=256"], tmp_path))  # 128 tokens
    # one chunk: its logits and the log-sum-exp's temporary (8 bytes a value; no next chunk's logits beside them)
    assert one.logits == 128 * 50257 * 8 + 50257 * 64 * 4 + 128 * 64 * 4


def test_the_activations_follow_what_each_block_keeps(tmp_path):
    """block_values: GPT-2's block keeps 17 x emb_dim a token; GQA keeps fewer key/value values, RoPE the rotated q
    and k too, QK-norm the normalised ones, heads of their own width q, k, v and the output at that width, SwiGLU four
    hidden values to GELU's two. The estimate's activations move by exactly those values (fp32: 4 bytes each, per
    block and one more block's gradients)."""
    from dataclasses import replace

    from llmtrain.model.gpt import GPTConfig

    d = 64
    assert memory.block_values(GPTConfig(emb_dim=d, n_heads=4)) == 17 * d
    llama = GPTConfig(emb_dim=d, n_heads=4, n_kv_heads=2, pos_emb="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=192)
    # norms 4d; q, k, v of 64 + 2 x 32, the output and its copy 2 x 64; rotated q and k 64 + 32; SwiGLU 4 x 192
    assert memory.block_values(llama) == 4 * d + (d + 2 * 32) + 2 * d + (d + 32) + 4 * 192
    qwen3 = replace(llama, head_dim=32, qk_norm=True)  # q 4 x 32 = 128, k and v 2 x 32 = 64 each
    assert memory.block_values(qwen3) == 4 * d + (128 + 2 * 64) + 2 * 128 + 2 * (128 + 64) + 4 * 192

    shape = ["model=llama_tiny", "data.tokenizer=bytes", "model.vocab_size=257", "model.context_length=32",
             "model.n_layers=2", "data.batch_size=4", "perf.loss_chunk=null"]
    plain = memory.estimate(*checked_fp32(shape, tmp_path))
    wide = memory.estimate(*checked_fp32([*shape, "model.head_dim=64", "model.qk_norm=true"], tmp_path))
    cfg, run = checked_fp32(shape, tmp_path)
    extra = memory.block_values(replace(run.model_config, head_dim=64, qk_norm=True)) - memory.block_values(
        run.model_config)
    assert extra > 0 and wide.activations - plain.activations == 4 * 32 * (2 + 1) * 4 * extra



def test_the_weights_are_counted_at_the_width_of_the_precision(tmp_path):
    """4 bytes a weight in fp32, 2 in bf16-true; bf16-mixed keeps fp32 weights, gradients and optimizer state, and
    autocast a 16-bit copy of each trainable weight."""
    from llmtrain.model.gpt import GPT

    fp32 = memory.estimate(*checked([*TINY, "trainer.precision=32-true"], tmp_path))
    n = sum(p.numel() for p in GPT(resolve_run(compose(TINY, tmp_path)).model_config).parameters())
    assert (fp32.weights, fp32.gradients) == (4 * n, 4 * n)
    bf16 = memory.estimate(*checked([*TINY, "trainer.precision=bf16-true"], tmp_path))
    assert (bf16.weights, bf16.gradients) == (2 * n, 2 * n)
    mixed = memory.estimate(*checked([*TINY, "trainer.precision=bf16-mixed"], tmp_path))
    assert (mixed.weights, mixed.gradients, mixed.optimizer) == (6 * n, 4 * n, fp32.optimizer)


def test_every_node_adds_its_devices_and_a_nodes_cpu_processes_share_its_ram(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_ram", lambda: 40 * GIB)
    cfg = compose([*TINY, "trainer.devices=4", "trainer.num_nodes=2"], tmp_path)
    assert memory.ranks(cfg) == 8
    assert memory.limit(cfg) == (10 * GIB, "the 4 processes of trainer.devices=4 share 40.0 GiB of available RAM")


@pytest.mark.parametrize("options", [{}, {"tie_weights": False, "pos_emb": "rope", "n_kv_heads": 1},
                                     {"mlp": "swiglu", "norm": "rmsnorm", "bias": False, "qk_norm": True}])
def test_the_parameters_of_any_number_of_blocks_are_counted_from_two_models_on_the_meta_device(options):
    from llmtrain.model.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=5, **options)
    assert memory.count_params(config) == GPT(config).num_params()


def test_loading_a_model_is_refused_when_its_stated_sizes_would_not_fit(monkeypatch):
    from llmtrain.model.gpt import GPTConfig

    config = GPTConfig(vocab_size=257, context_length=64, emb_dim=32, n_heads=2, n_layers=2)
    n = memory.count_params(config)
    decoding = 4 * 64 * (2 * 2 * 2 * 16 + 257)  # KV cache and one step's logits over the context, fp32
    need = 2 * 4 * n + decoding + 8 * (64 + 10) + memory.RUNTIME["cpu"]
    monkeypatch.setattr(memory, "available_ram", lambda: need)
    memory.check_loading(config, "ckpt_path=x", "load and generate", copies=2, context_tokens=64 + 10)
    with pytest.raises(UserError) as e:
        memory.check_loading(config, "ckpt_path=x", "load and generate", copies=2, context_tokens=64 + 11)
    assert str(e.value).startswith(f"ckpt_path=x describes a model of {n:,} parameters (n_layers=2, emb_dim=32, "
                                   "vocab_size=257) that needs about 0.5 GiB to load and generate")
    with pytest.raises(UserError):
        memory.check_loading(config, "source=x", "load and export", copies=3)
    monkeypatch.setattr(memory, "available_ram", lambda: None)  # unknown: not checked
    memory.check_loading(config, "source=x", "load and export", copies=1000)
