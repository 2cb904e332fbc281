"""What a finished run leaves beside its checkpoints (written by rank zero): the final model as a Hugging Face
folder (`hf/`: GPT-2's, Llama's, Qwen2's or Qwen3's layout, whichever computes the model; llmtrain reads it back
exactly), a LoRA run's adapter (`adapter/` for llmtrain's GPT, `hf_adapter/` for transformers' class of the
model), and the stage's own files (an instruct stage's answers to the test split). See sharded.py for what changes
under FSDP.

Every file describes itself with the same record (`run_meta`): tokenizer, stage, classes, prompt template, the
weights the run started from. Checkpoints carry it too (the LightningModule stores it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from llmtrain.data.tokenizer import TOKENIZER_FILE, is_file_tokenizer, split_added, with_added
from llmtrain.errors import UserError
from llmtrain.files import write_atomic
from llmtrain.interop.adapters import export_hf_adapter, hf_adapter_layout
from llmtrain.interop.digest import weights_digest
from llmtrain.interop.hf import export_hf, layout_name
from llmtrain.interop.lora import ADAPTER_META, save_adapter
from llmtrain.interop.pretrained import hf_folder
from llmtrain.run.checks import effective
from llmtrain.stages.base import Stage
from llmtrain.training.hardware import is_sharded
from llmtrain.training.sharded import gathered_gpt, skip_sharded


def run_meta(cfg: DictConfig, tokenizer: str, stage: Stage) -> dict:
    """What checkpoints, exports and adapters of this run record about it (JSON-serialisable), its effective config
    among it (what a resume compares with its own), and init_from both by name and by content (its digest: what a
    resume, the DPO reference and a LoRA adapter's merge check the files behind the name against)."""
    digest = weights_digest(cfg.init_from) if cfg.init_from else None
    return {"tokenizer": tokenizer, **stage.record(), "init_from": cfg.init_from, "init_from_digest": digest,
            "config": effective(cfg)}


def keep_tokenizer(tokenizer: str, run_dir: Path, write: bool = True) -> str:
    """The tokenizer name this run's checkpoints record: a built-in name as is; a tokenizer.json is copied into the
    run dir (when `write`: on the launching rank), so that the run keeps working wherever its source goes."""
    if not is_file_tokenizer(tokenizer):
        return tokenizer
    tokenizer, added = split_added(tokenizer)
    kept = run_dir / TOKENIZER_FILE
    if write and Path(tokenizer).resolve() != kept.resolve():
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{TOKENIZER_FILE}.", dir=run_dir)
        os.close(fd)
        shutil.copyfile(tokenizer, tmp)
        os.replace(tmp, kept)
    kept_name = str(kept.resolve())
    return with_added(kept_name, added)


def write_outputs(module, trainer, datamodule, cfg: DictConfig, meta: dict) -> list[str]:
    """Write the run's outputs into its run dir; a phrase for the summary line per thing written (or skipped).

    Every rank calls it: under FSDP the export gathers the weights from all of them. Rank zero writes the files;
    the other ranks return an empty list."""
    run_dir, written, stage = Path(cfg.run_dir), [], module.stage
    if is_sharded(trainer.strategy):
        return _write_sharded(module, trainer, cfg, meta)
    if not trainer.is_global_zero:
        return []
    try:  # LoRA merged: what transformers, init_from= and generate.py read, without pickle
        export_hf(module.model, run_dir / "hf", {**meta, "step": trainer.global_step})
        layout = layout_name(module.gpt, meta["num_classes"] is not None)
        written.append(f"model exported to {run_dir / 'hf'} (Hugging Face {layout} layout)")
    except UserError as e:  # an architecture that no Hugging Face class computes
        written.append(f"no export: {e}")
    if stage.lora:
        save_adapter(module.model, run_dir / "adapter")
        write_atomic(run_dir / "adapter" / ADAPTER_META, json.dumps({"base": cfg.init_from, **meta}, indent=1))
        written.append(f"adapter in {run_dir / 'adapter'}")
        classifier = meta["num_classes"] is not None
        if hf_adapter_layout(module.gpt, classifier):  # peft's names for transformers' class of the model
            base = hf_folder(cfg.init_from)
            export_hf_adapter(module.model, run_dir / "hf_adapter", base, classifier)
            on = base or f"{cfg.init_from} once exported (python -m llmtrain.export source={cfg.init_from} out_dir=DIR)"
            written[-1] += (f", and in {run_dir / 'hf_adapter'} for peft on transformers' "
                            f"{layout_name(module.gpt, classifier)} of {on}")
    return written + stage.write_files(module.gpt, datamodule, run_dir)


def _write_sharded(module, trainer, cfg: DictConfig, meta: dict) -> list[str]:
    """Under FSDP: the export from the weights gathered on rank zero (every rank takes part); the LoRA outputs and
    the stage's own files are skipped, with the reason."""
    run_dir, stage = Path(cfg.run_dir), module.stage
    gpt = None if stage.lora else gathered_gpt(trainer, module.gpt.config, meta["num_classes"])
    if not trainer.is_global_zero:
        return []
    if gpt is None:
        what = "LoRA adapter or merged export" if stage.lora else "export of sharded state dicts"
        written = [f"{skip_sharded(what)}; the final state is in {run_dir / 'checkpoints' / 'last.ckpt'}"]
    else:
        export_hf(gpt, run_dir / "hf", {**meta, "step": trainer.global_step})
        layout = layout_name(gpt, meta["num_classes"] is not None)
        written = [f"model exported to {run_dir / 'hf'} (Hugging Face {layout} layout, gathered from the FSDP ranks)"]
    return written + [skip_sharded(what) for what in stage.outputs]
