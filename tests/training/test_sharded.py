"""Under FSDP (weights sharded across ranks) every forward pass outside the training and validation steps either
gets full weights on every rank or is skipped with a reason. Lightning refuses FSDP without a GPU: here a stand-in
FSDPStrategy hands out the full state dict that FSDP gathers on rank zero (benchmarks/gpu_check.sh runs the real
thing on GPUs)."""

import logging
from functools import partial
from types import SimpleNamespace

import torch
from conftest import compose, lm_stage
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

from llmtrain.interop.pretrained import load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.outputs import write_outputs
from llmtrain.training import sharded
from llmtrain.training.hardware import is_sharded
from llmtrain.training.module import LanguageModel

CONFIG = GPTConfig(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=2, tie_weights=True)


class GatheringFSDP(FSDPStrategy):
    """FSDP as write_outputs sees it: lightning_module_state_dict() is a collective whose full result only rank zero
    receives (with FSDP's wrapper names inside the keys, as an older torch leaves them)."""

    def __init__(self, full_state: dict, rank: int) -> None:
        super().__init__()
        self.full_state, self.rank, self.gathers = full_state, rank, 0

    def lightning_module_state_dict(self) -> dict:
        self.gathers += 1
        if self.rank:
            return {}
        return {k.replace("blocks.0.", "blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module."): v
                for k, v in self.full_state.items()}


def sharded_run(tmp_path, overrides: list[str], rank: int, classes: int | None = None):
    """(module whose own weights are the local shards' stand-ins, trainer on `rank`, cfg, the full weights)."""
    cfg = compose(overrides, tmp_path)
    torch.manual_seed(0)
    full = GPT(CONFIG)
    shard = GPT(CONFIG)  # other weights: an export taken from them would be wrong
    if classes:
        full.replace_head(classes)
        shard.replace_head(classes)
    module = SimpleNamespace(model=shard, gpt=shard, stage=instantiate(cfg.finetune, _convert_="all"))
    state = {f"model.{k}": v for k, v in full.state_dict().items()}
    trainer = SimpleNamespace(strategy=GatheringFSDP(state, rank), is_global_zero=rank == 0, global_step=7)
    return module, trainer, cfg, full


def test_the_export_under_fsdp_is_the_full_weights_gathered_from_every_rank(tmp_path):
    meta = {"tokenizer": "bytes", "num_classes": 3, "stage": "classify", "label_names": ["a", "b", "c"]}
    module, trainer, cfg, full = sharded_run(tmp_path, ["finetune=classify"], rank=1, classes=3)
    assert write_outputs(module, trainer, None, cfg, meta) == [] and trainer.strategy.gathers == 1  # took part
    assert not (tmp_path / "hf").exists()
    module, trainer, cfg, full = sharded_run(tmp_path, ["finetune=classify"], rank=0, classes=3)
    written = write_outputs(module, trainer, None, cfg, meta)
    assert written == [f"model exported to {tmp_path / 'hf'} (Hugging Face GPT-2 layout, gathered from the FSDP ranks)"]
    model, info = load_pretrained(str(tmp_path / "hf"))
    assert info.num_classes == 3 and info.step == 7
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in model.state_dict().items())


def test_generation_and_lora_outputs_are_skipped_under_fsdp_with_the_reason(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sharded, "_said", set())  # each reason is logged once per process
    module, trainer, cfg, _ = sharded_run(tmp_path, ["finetune=instruct", "lora=default"], rank=0)
    with caplog.at_level(logging.INFO):
        written = write_outputs(module, trainer, None, cfg, {"stage": "instruct", "num_classes": None})
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert written == [f"no LoRA adapter or merged export under FSDP (the weights are sharded across ranks); the "
                       f"final state is in {last}", "no test answers under FSDP (the weights are sharded across ranks)"]
    assert trainer.strategy.gathers == 0  # every rank skips: nobody waits in a gather
    assert not (tmp_path / "test_generations.jsonl").exists() and not (tmp_path / "adapter").exists()
    assert "no test answers under FSDP (the weights are sharded across ranks): skipped" in caplog.text


def test_text_samples_are_written_on_one_device_and_skipped_under_fsdp(caplog, monkeypatch):
    monkeypatch.setattr(sharded, "_said", set())
    texts = []
    logger = SimpleNamespace(log_samples=lambda samples, step: texts.extend(samples))
    stage = lm_stage(sample_prompt="The ", sample_tokens=4)
    module = LanguageModel(GPT(CONFIG), stage, partial(torch.optim.AdamW), 0, 10, 0.1, tokenizer="bytes")
    for strategy, expected in ((SingleDeviceStrategy("cpu"), ["samples/0"]), (GatheringFSDP({}, 0), [])):
        texts.clear()
        module.trainer = SimpleNamespace(strategy=strategy, logger=logger, loggers=[logger], global_rank=0,
                                         global_step=3)
        with caplog.at_level(logging.INFO):
            module._log_samples()
        assert texts == expected
    assert "no text samples under FSDP (the weights are sharded across ranks): skipped" in caplog.text


def test_both_of_lightnings_fsdp_strategies_shard_and_model_parallels_full_state_is_gathered(tmp_path):
    """ModelParallelStrategy (FSDP2) shards too; with save_distributed_checkpoint=False its state dict is the full
    weights on rank zero, which gathered_gpt turns into a GPT; with True (its default) shards, so no GPT."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert is_sharded(FSDPStrategy()) and is_sharded(ModelParallelStrategy())
    assert not is_sharded(SingleDeviceStrategy("cpu"))
    torch.manual_seed(0)
    full = GPT(CONFIG)
    for distributed, gathered in ((True, False), (False, True)):
        strategy = ModelParallelStrategy(save_distributed_checkpoint=distributed)
        strategy.lightning_module_state_dict = lambda: {f"model.{k}": v for k, v in full.state_dict().items()}
        plain = sharded.gathered_gpt(SimpleNamespace(strategy=strategy, is_global_zero=True), CONFIG, None)
        assert (plain is not None) == gathered
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in plain.state_dict().items())


def test_a_skip_is_logged_once_per_thing(caplog, monkeypatch):
    monkeypatch.setattr(sharded, "_said", set())
    with caplog.at_level(logging.INFO):
        phrases = [sharded.skip_sharded("text samples") for _ in range(3)] + [sharded.skip_sharded("test answers")]
    assert phrases[0] == phrases[2] == "no text samples under FSDP (the weights are sharded across ranks)"
    assert [r.getMessage() for r in caplog.records if "under FSDP" in r.getMessage()] == [
        "no text samples under FSDP (the weights are sharded across ranks): skipped",
        "no test answers under FSDP (the weights are sharded across ranks): skipped"]
