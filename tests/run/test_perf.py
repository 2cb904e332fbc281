"""Speed switches from config, each shown on CPU: activation checkpointing, tokens per step, compile, MFU."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose, read_scalars

from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.resolve import accumulation_steps, resolve_run
from llmtrain.run.train import train
from llmtrain.training.flops import training_flops


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=3))
    x = torch.randint(0, 97, (2, 16))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_tokens_per_step_sets_gradient_accumulation(tmp_path):
    cfg = compose([*TINY, "tokens_per_step=1024"], tmp_path)  # 1 device x 8 x 32 = 256 per micro-step
    problems = []
    assert accumulation_steps(cfg, 32, problems) == 4 and not problems
    assert resolve_run(cfg).accumulate == 4
    cfg = compose([*TINY, "tokens_per_step=1000"], tmp_path)
    with pytest.raises(UserError, match=r"tokens_per_step=1000 is not a multiple of .* = 256\)"):
        resolve_run(cfg)


def test_tokens_per_step_counts_every_node(tmp_path):
    """Each node adds its devices' batches to one optimizer step, so two nodes halve the accumulation."""
    cfg = compose([*TINY, "tokens_per_step=1024", "trainer.num_nodes=2"], tmp_path)  # 1 x 2 nodes x 8 x 32 = 512
    problems = []
    assert accumulation_steps(cfg, 32, problems) == 2 and not problems
    cfg = compose([*TINY, "tokens_per_step=768", "trainer.num_nodes=2"], tmp_path)  # a multiple of 256, not 512
    assert accumulation_steps(cfg, 32, problems) == 1
    assert problems == ["tokens_per_step=768 is not a multiple of devices x nodes x data.batch_size x context "
                        "(1 x 2 x 8 x 32 = 512): choose a multiple of 512 or change data.batch_size"]


def test_flops_per_token_follows_the_model_shape():
    m = GPT(GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, qkv_bias=True,
                      tie_weights=True))
    non_embedding = 124_439_808 - 1024 * 768
    assert training_flops(m, 12, 768).of_batch(1, 1024) == 6 * non_embedding + 12 * 12 * 768 * 1024


@pytest.mark.slow
def test_compiled_run_with_mfu_and_accumulation(tmp_path):
    """torch.compile of the GPT inside a real run; checkpoints keep plain keys; MFU is logged from a given peak."""
    run_dir = tmp_path / "run"
    cfg = compose([*TINY, "perf.compile=true", "perf.peak_flops=1e11", "tokens_per_step=512",
                   "trainer.max_steps=6", "trainer.val_check_interval=12", "trainer.log_every_n_steps=2"], run_dir)
    train(cfg)
    scalars = read_scalars(run_dir)
    mfu = [v for _, v in scalars["train/mfu"]]
    assert mfu and all(0 < v < 1 for v in mfu)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    batches = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert batches == 12  # two micro-batches of 8 x 32 tokens per optimizer step


def test_scale_presets_compose_and_build_their_strategy(tmp_path):
    """trainer=fsdp and trainer=multinode are Lightning's own strategies; FSDP needs CUDA (Lightning refuses it on
    CPU), so here its strategy object is built and its wrap policy checked, not run."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from llmtrain.model.gpt import Block

    # accelerator=gpu, as the presets set it, is refused on a machine without CUDA; auto validates anywhere
    cfg = compose(["trainer=fsdp", "model=gpt1558m", "trainer.accelerator=auto"], tmp_path)
    resolve_run(cfg)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    cfg = compose(["trainer=multinode", "trainer.accelerator=auto"], tmp_path)
    resolve_run(cfg)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"
