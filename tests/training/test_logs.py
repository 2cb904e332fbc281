"""What a run prints (llmtrain/training/logs.py): every line once, no advertisement or noise, a model summary with
FLOPs per token; and the real command line's output."""

import logging
import re
import warnings

import pytest
from conftest import TINY, run_cli
from lightning.pytorch.utilities import rank_zero_info

from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.training.flops import training_flops
from llmtrain.training.logs import describe_model, human, quiet_lightning


def test_lightning_lines_reach_the_root_handlers_once_without_adverts(caplog):
    quiet_lightning()
    assert logging.getLogger("lightning").handlers == []  # its own console handler, which printed each line again
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_lightning_deprecation_noise_is_silenced():
    quiet_lightning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_lightning()  # installs its filters in front of the "default" one
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning, stacklevel=1)
        warnings.warn("a warning of our own", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning of our own"]


def test_the_model_summary_states_parameters_and_flops_per_token():
    gpt = GPT(GPTConfig(vocab_size=257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, tie_weights=True))
    text = describe_model(gpt, context_length=16)
    assert f"{gpt.num_params():,}" in text and "2 layers, width 32, 2 heads of 16, context 32, vocab 257" in text
    weights = gpt.num_params() - 32 * 32  # all but the position table (the tied embedding is the head's matmul)
    flops = 6 * weights + 12 * 2 * 32 * 16
    assert training_flops(gpt, 2, 32).of_batch(1, 16) == flops
    assert f"training FLOPs per token: {human(flops)} (6 x {human(weights)} weights" in text
    qwen3 = GPT(GPTConfig(vocab_size=257, context_length=32, emb_dim=32, n_heads=2, head_dim=24, n_layers=2,
                          pos_emb="rope", qk_norm=True, tie_weights=True))
    flops = training_flops(qwen3, 2, 48).of_batch(1, 16)  # attention over heads x head_dim, not the width
    assert "2 heads of 24" in describe_model(qwen3, 16) and f"FLOPs per token: {human(flops)} (6 x" in \
        describe_model(qwen3, 16) and "attention 12 x 2 layers x 48 x 16 tokens" in describe_model(qwen3, 16)
    assert human(7_241_088) == "7.24 M" and human(5.65e9) == "5.65 G" and human(512) == "512"
    assert [human(n) for n in (999, 1000, 999_999, 1e6, -2500, 3e15)] == ["999", "1 k", "1 M", "1 M", "-2.5 k",
                                                                         "3 P"]


@pytest.mark.slow
def test_the_command_line_prints_each_line_once(tmp_path):
    """A debug=fast run of the tiny model: no line twice, no advertisement or deprecation noise, the summary's
    FLOPs instead of Lightning's 'Total FLOPs: 0', and (debug=fast) nothing left behind."""
    tiny = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    result = run_cli([*tiny, "debug=fast", "callbacks.progress_bar=null"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated
    assert not re.search(r"Tip:|litlogger|deprecated|Total FLOPs|weights_only. was not set", out), out
    assert "training FLOPs per token:" in out and "done: 3 steps" in out
    assert "debug=fast: removed what the run wrote in" in out and not (tmp_path / "outputs").exists()
