"""What a finished run writes beside its checkpoints: the export in the layout of the class that computes the model,
and for a LoRA run its adapter under llmtrain's names and under that class's (here Qwen3's, from a Qwen3 folder)."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose
from hydra.utils import instantiate

from llmtrain.interop.lora import apply_lora
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.outputs import write_outputs

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
