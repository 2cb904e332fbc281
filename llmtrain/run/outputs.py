"""What a finished run leaves beside its checkpoints (written by rank zero): the final model as a Hugging Face
folder of its family, GPT-2's or Llama's (`hf/`, read back exactly), a LoRA stage's adapter (`adapter/` for ours,
`hf_adapter/` for transformers' GPT-2), an instruct stage's answers to the test split (see sharded.py for what
changes under FSDP).

Every file describes itself with the same record (`run_meta`): tokenizer, task, stage, labels, prompt template,
the weights the run started from. Checkpoints carry it too (the LightningModule stores it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from llmtrain.data.prompts import record_prompt, template_of
from llmtrain.data.tokenizer import TOKENIZER_FILE, continuation_text, is_file_tokenizer
from llmtrain.errors import UserError
from llmtrain.interop.adapters import export_hf_adapter
from llmtrain.interop.gpt2 import gpt2_mismatches
from llmtrain.interop.hf import export_hf
from llmtrain.interop.lora import ADAPTER_META, save_adapter
from llmtrain.interop.pretrained import hf_folder
from llmtrain.training.sharded import gathered_gpt, is_sharded, skip_sharded


def run_meta(cfg: DictConfig, tokenizer: str, label_names: list[str] | None) -> dict:
    """What checkpoints, exports and adapters of this run record about it (JSON-serialisable)."""
    task = cfg.finetune.task
    classes = len(label_names) if label_names else None
    return {"tokenizer": tokenizer, "stage": cfg.finetune.name, "num_classes": classes, "label_names": label_names,
            "prompt_template": template_of(task), "init_from": cfg.init_from}


def keep_tokenizer(tokenizer: str, run_dir: Path, write: bool = True) -> str:
    """The tokenizer name this run's checkpoints record: a built-in name as is; a tokenizer.json is copied into the
    run dir (when `write`: on the launching rank), so that the run keeps working wherever its source goes."""
    if not is_file_tokenizer(tokenizer):
        return tokenizer
    kept = run_dir / TOKENIZER_FILE
    if write and Path(tokenizer).resolve() != kept.resolve():
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{TOKENIZER_FILE}.", dir=run_dir)
        os.close(fd)
        shutil.copyfile(tokenizer, tmp)
        os.replace(tmp, kept)
    return str(kept.resolve())


def write_outputs(module, trainer, datamodule, cfg: DictConfig, meta: dict) -> list[str]:
    """Write the run's outputs into its run dir; a phrase for the summary line per thing written (or skipped).

    Every rank calls it: under FSDP the export gathers the weights from all of them. Rank zero writes the files;
    the other ranks return an empty list."""
    run_dir, written = Path(cfg.run_dir), []
    if is_sharded(trainer.strategy):
        return _write_sharded(module, trainer, cfg, meta)
    if not trainer.is_global_zero:
        return []
    try:  # LoRA merged: what transformers, init_from= and generate.py read, without pickle
        export_hf(module.model, run_dir / "hf", {**meta, "step": trainer.global_step})
        layout = "GPT-2" if not gpt2_mismatches(module.gpt) else "Llama"
        written.append(f"model exported to {run_dir / 'hf'} (Hugging Face {layout} layout)")
    except UserError as e:  # an architecture that no Hugging Face class computes
        written.append(f"no export: {e}")
    if cfg.finetune.lora:
        save_adapter(module.model, run_dir / "adapter")
        (run_dir / "adapter" / ADAPTER_META).write_text(json.dumps({"base": cfg.init_from, **meta}, indent=1))
        written.append(f"adapter in {run_dir / 'adapter'}")
        if not gpt2_mismatches(module.gpt):  # peft's names for transformers' GPT-2
            base = hf_folder(cfg.init_from)
            export_hf_adapter(module.model, run_dir / "hf_adapter", base, meta["num_classes"] is not None)
            on = base or f"{cfg.init_from} once exported (python -m llmtrain.export {cfg.init_from} DIR)"
            written[-1] += f", and in {run_dir / 'hf_adapter'} for peft on transformers' GPT-2 of {on}"
    if cfg.finetune.task == "instruct":
        path = run_dir / "test_generations.jsonl"
        n = write_test_generations(module, datamodule, path, cfg.finetune.test_generations,
                                   cfg.finetune.max_new_tokens)
        written.append(f"{n} test answers in {path}")
    return written


def _write_sharded(module, trainer, cfg: DictConfig, meta: dict) -> list[str]:
    """Under FSDP: the export from the weights gathered on rank zero (every rank takes part); the LoRA outputs and
    the test answers are skipped, with the reason."""
    run_dir = Path(cfg.run_dir)
    classes = module.gpt.head.out_features if cfg.finetune.task == "classify" else None
    gpt = None if cfg.finetune.lora else gathered_gpt(trainer, module.gpt.config, classes)
    if not trainer.is_global_zero:
        return []
    if gpt is None:
        what = "LoRA adapter or merged export" if cfg.finetune.lora else "export of sharded state dicts"
        written = [f"{skip_sharded(what)}; the final state is in {run_dir / 'checkpoints' / 'last.ckpt'}"]
    else:
        export_hf(gpt, run_dir / "hf", {**meta, "step": trainer.global_step})
        layout = "GPT-2" if not gpt2_mismatches(gpt) else "Llama"
        written = [f"model exported to {run_dir / 'hf'} (Hugging Face {layout} layout, gathered from the FSDP ranks)"]
    if cfg.finetune.task == "instruct":
        written.append(skip_sharded("test answers"))
    return written


def write_test_generations(module, datamodule, path: Path, limit: int | None, max_new_tokens: int) -> int:
    """Answer the test split's instructions greedily; write instruction, input, reference and answer as JSONL."""
    tok, gpt = datamodule.tokenizer, module.gpt
    records = datamodule.records["test"]
    records = records[:limit] if limit is not None else records
    was_training = module.model.training
    module.model.eval()
    with open(path, "w") as f:
        for r in records:
            prompt = tok.encode_ordinary(record_prompt(r, template_of("instruct")))
            prompt = prompt[-(gpt.config.context_length - 1):]
            n_new = min(max_new_tokens, gpt.config.context_length - len(prompt))
            idx = torch.tensor([prompt], device=module.device)
            out = gpt.generate(idx, n_new, temperature=0, eos_id=tok.eot_token)  # LoRA layers sit inside gpt
            answer = continuation_text(tok, out[0, len(prompt):].tolist())
            f.write(json.dumps({"instruction": r["instruction"], "input": r.get("input") or "",
                                "reference": r["output"], "generated": answer.strip()}) + "\n")
    module.model.train(was_training)
    return len(records)
