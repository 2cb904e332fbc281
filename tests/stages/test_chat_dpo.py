"""DPO on conversations: the stage records the chat template the pairs were rendered with (and none on text pairs);
from the command line, a tiny chat model (ChatML tokens in its tokenizer) trained on preference records of messages
prefers the chosen turns of held-out prompts, and its checkpoint and export carry the template as a chat run's do."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import make_datamodule, read_scalars, run_cli
from test_dpo import STAGE

from llmtrain.data.chat_template import CHATML, chat_tokenizer
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.stages.dpo import DPO

CHATML_BYTES = chat_tokenizer("bytes", "chatml")


def write_chat_checkpoint(path: Path) -> Path:
    """A checkpoint as a chat run leaves it: a random bytes GPT grown for ChatML's two tokens, the template
    recorded."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=259, context_length=320, emb_dim=32, n_heads=2, n_layers=2, tie_weights=True))
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "llmtrain": {"model_config": asdict(model.config), "tokenizer": CHATML_BYTES, "stage": "chat",
                             "chat_template": CHATML, "end_of_turn": 258}}, path)
    return path


def write_conversation_pairs(path: Path, n: int = 240) -> Path:
    """As test_dpo's pairs (gladly or curtly begun), in messages: a system message, an earlier exchange, and the
    final answer as a message (chosen) or as text (rejected)."""
    rows = [{"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": f"Item {i}?"},
                        {"role": "assistant", "content": "A box."}, {"role": "user", "content": "Weight?"}],
             "chosen": {"role": "assistant", "content": f"Gladly! {i % 7 + 1} kg."},
             "rejected": f"No. {i % 7 + 1} kg."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_the_stage_records_the_template_of_conversation_pairs_and_none_of_text_pairs(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": "No."} for i in range(40)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recorded = {}
    for name, path in (("messages", write_conversation_pairs(tmp_path / "chat.jsonl", 40)),
                       ("text", tmp_path / "text.jsonl")):
        dm = make_datamodule("preference_json", path=str(path), tokenizer=CHATML_BYTES, context_length=256)
        dm.setup()
        stage = DPO(train_blocks="all", lora=None, beta=0.1, num_samples=2, sample_tokens=8)
        stage.setup(dm)
        recorded[name] = (stage.record(), len(stage.sample_prompts))
    assert recorded["messages"][0] | {"stage": "dpo"} == recorded["messages"][0]
    assert (recorded["messages"][0]["chat_template"], recorded["messages"][0]["end_of_turn"]) == (CHATML, 258)
    assert recorded["messages"][0]["prompt_template"] is None and recorded["messages"][1] == 0  # no samples
    assert recorded["text"][0]["prompt_template"] == "alpaca" and "chat_template" not in recorded["text"][0]
    assert recorded["text"][1] == 2


@pytest.mark.slow
def test_dpo_on_conversations_prefers_the_chosen_turns_and_records_the_template(tmp_path):
    args = ["finetune=dpo", f"init_from={write_chat_checkpoint(tmp_path / 'chat.ckpt')}", "data=preference_json",
            f"data.path={write_conversation_pairs(tmp_path / 'pairs.jsonl')}", *STAGE, "trainer.max_steps=10",
            "trainer.val_check_interval=5", f"hydra.run.dir={tmp_path / 'dpo'}"]
    run = run_cli(args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "before fine-tuning: val/loss 0.6931, val/rewards/accuracy 0.0000" in run.stdout
    accuracy = [v for _, v in sorted(read_scalars(tmp_path / "dpo")["val/rewards/accuracy"])]
    assert accuracy[0] == 0.0 and accuracy[-1] > 0.5
    saved = torch.load(tmp_path / "dpo" / "checkpoints" / "last.ckpt", weights_only=True)["llmtrain"]
    assert saved["stage"] == "dpo" and saved["tokenizer"] == CHATML_BYTES
    assert saved["chat_template"] == CHATML and saved["end_of_turn"] == 258 and saved["prompt_template"] is None
    assert json.loads((tmp_path / "dpo" / "hf" / "tokenizer_config.json").read_text())["chat_template"] == CHATML
