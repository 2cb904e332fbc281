"""What a finished run leaves beside its checkpoints (llmtrain/run/outputs.py): the record every file carries, the
Hugging Face export in the layout of the class that computes the model, a LoRA run's adapter under llmtrain's names
(read back by generate) and under that class's; rank zero alone writes. The trainer and module are stand-ins holding
what write_outputs reads (the real ones: tests/run/test_train.py's short run)."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, lm_stage, write_checkpoint
from hydra.utils import instantiate
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import OmegaConf

from llmtrain.interop.lora import apply_lora
from llmtrain.interop.pretrained import load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.outputs import run_meta, write_outputs
from llmtrain.stages.base import inner_gpt
from llmtrain.stages.instruct import Instruct

CONFIG = GPTConfig(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=2, tie_weights=True)


def finished(model, stage, rank: int = 0):
    """(module, trainer) of a run that ended at step 7 on one device, as write_outputs sees them."""
    module = SimpleNamespace(model=model, gpt=inner_gpt(model), stage=stage)
    trainer = SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cpu")), is_global_zero=rank == 0,
                              global_step=7)
    return module, trainer


def test_the_record_names_the_tokenizer_the_stage_init_from_and_the_effective_config(tmp_path):
    from llmtrain.interop.digest import weights_digest

    base = str(write_checkpoint(tmp_path / "base.ckpt"))
    cfg = OmegaConf.create({"init_from": base, "optimizer": {"lr": "${scale}"}, "scale": 0.5,
                            "run_dir": "runs/now", "ckpt_path": "last", "resume": {"apply": []}})
    assert run_meta(cfg, "bytes", lm_stage()) == {
        "tokenizer": "bytes", "stage": "pretrain", "prompt_template": None, "num_classes": None, "label_names": None,
        "init_from": base, "init_from_digest": weights_digest(base),  # by name and by content
        "config": {"init_from": base, "optimizer": {"lr": 0.5}, "scale": 0.5}}  # resolved; not where it runs


def test_rank_zero_alone_exports_the_final_model_with_its_record_and_step(tmp_path):
    torch.manual_seed(0)
    model, stage = GPT(CONFIG), lm_stage()
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "init_from": None})
    meta = run_meta(cfg, "bytes", stage)
    assert write_outputs(*finished(model, stage, rank=1), None, cfg, meta) == []
    assert list(tmp_path.iterdir()) == []  # another rank of DDP writes nothing
    written = write_outputs(*finished(model, stage), None, cfg, meta)
    assert written == [f"model exported to {tmp_path / 'hf'} (Hugging Face GPT-2 layout)"]
    record = json.loads((tmp_path / "hf" / "llmtrain.json").read_text())
    assert (record["step"], record["stage"], record["tokenizer"], record["init_from"]) == (7, "pretrain", "bytes", None)
    loaded, info = load_pretrained(str(tmp_path / "hf"))
    assert info.step == 7 and all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_lora_run_leaves_an_adapter_that_names_its_base(tmp_path):
    """The adapter records init_from, so that generate merges it into its base without base=."""
    from llmtrain.generate import load_model

    base = write_checkpoint(tmp_path / "base.ckpt")
    run_dir = tmp_path / "run"
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["attn.qkv"]}
    stage = Instruct(train_blocks="none", lora=lora, loss_chunk=None, num_samples=0, sample_tokens=0,
                     test_generations=0, max_new_tokens=4)
    start, _ = load_pretrained(str(base))
    model = stage.build_model(start)
    cfg = OmegaConf.create({"run_dir": str(run_dir), "init_from": str(base)})
    meta = run_meta(cfg, "bytes", stage)
    written = write_outputs(*finished(model, stage), SimpleNamespace(records={"test": []}), cfg, meta)
    assert written[1] == (f"adapter in {run_dir / 'adapter'}, and in {run_dir / 'hf_adapter'} for peft on "
                          f"transformers' GPT-2 of {base} once exported (python -m llmtrain.export source={base} "
                          f"out_dir=DIR)")
    assert written[2] == f"0 test answers in {run_dir / 'test_generations.jsonl'}"
    assert json.loads((run_dir / "adapter" / "llmtrain_adapter.json").read_text()) == {"base": str(base), **meta}
    merged, info = load_model(str(run_dir / "adapter"))
    assert info.extra["base"] == str(base) and info.prompt_template == "alpaca"


transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

QWEN3 = GPTConfig(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_kv_heads=1, head_dim=12, n_layers=2,
                  pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", mlp_hidden=32, bias=False,
                  tie_weights=True)


def test_a_lora_run_of_a_qwen3_model_writes_its_export_and_an_adapter_for_qwen3(tmp_path):
    from llmtrain.interop.hf import export_hf

    torch.manual_seed(0)
    base = GPT(QWEN3).eval()
    base_dir = export_hf(base, tmp_path / "base", {"tokenizer": "bytes"})  # what init_from names
    cfg = compose(["finetune=pretrain", "lora=default", f"init_from={base_dir}"], tmp_path / "run")
    model = apply_lora(copy.deepcopy(base), r=2, alpha=4, dropout=0.0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    module = SimpleNamespace(model=model, gpt=model.base_model.model, stage=instantiate(cfg.finetune, _convert_="all"))
    trainer = SimpleNamespace(strategy="auto", is_global_zero=True, global_step=3)
    meta = {"tokenizer": "bytes", "stage": "pretrain", "num_classes": None}
    written = write_outputs(module, trainer, None, cfg, meta)
    run = tmp_path / "run"
    assert written[0] == f"model exported to {run / 'hf'} (Hugging Face Qwen3 layout)"
    assert written[1] == (f"adapter in {run / 'adapter'}, and in {run / 'hf_adapter'} for peft on transformers' Qwen3 "
                          f"of {base_dir.resolve()}")
    x = torch.randint(0, 257, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
        adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                                 run / "hf_adapter").eval()
        assert type(merged).__name__ == "Qwen3ForCausalLM"
        torch.testing.assert_close(adapted(x).logits, model(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(merged(x).logits, model(x), atol=1e-4, rtol=0)
    assert json.loads((run / "hf_adapter" / "adapter_config.json").read_text())["target_modules"] == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
