"""DPO on conversations from the command line: a tiny chat model (ChatML tokens in its tokenizer) trained on
preference records of messages prefers the chosen turns of held-out prompts, and its checkpoint records the chat
template as a chat run's does."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import read_scalars, run_cli
from test_dpo import STAGE

from llmtrain.data.chat_template import CHATML, chat_tokenizer
from llmtrain.model.gpt import GPT, GPTConfig

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
