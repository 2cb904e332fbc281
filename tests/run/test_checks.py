"""The effective config: the model node against init_from, the tokenizer, and the checks' one-line refusals."""

from dataclasses import asdict

import pytest
import torch
from conftest import TINY, compose

from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.run.resolve import resolve_run

BASE = dict(vocab_size=257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=False,
            tie_weights=True)


@pytest.fixture
def base_ckpt(tmp_path):
    """A checkpoint of a bytes-tokenizer model (context 64) as the pretraining stage writes it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**BASE))
    path = tmp_path / "base.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "llmtrain": {"model_config": asdict(model.config), "tokenizer": "bytes",
                             "stage": "pretrain"}}, path)
    return path


def test_without_init_from_the_model_node_is_the_config(tmp_path, monkeypatch):
    import llmtrain.training.hardware

    monkeypatch.setattr(llmtrain.training.hardware, "cpu_flags", lambda: frozenset())  # a CPU without native bf16
    monkeypatch.delenv(llmtrain.training.hardware.CPU_BF16_ENV, raising=False)
    eff = resolve_run(compose(TINY, tmp_path))
    assert eff.model_config == GPTConfig(vocab_size=257, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
                                         tie_weights=False)  # the default model, gpt_tiny_untied
    assert eff.start is None and eff.tokenizer == "bytes" and eff.context_length == 32 and eff.accumulate == 1
    assert eff.precision == "32-true"  # auto on a machine without a GPU or bf16


def test_a_stage_takes_the_architecture_and_tokenizer_of_init_from(tmp_path, base_ckpt):
    eff = resolve_run(compose(["finetune=classify", f"init_from={base_ckpt}"], tmp_path))
    assert eff.model_config == GPTConfig(**BASE) and eff.tokenizer == "bytes"
    assert eff.start.path == str(base_ckpt) and eff.context_length == 64


def test_values_that_change_no_shape_are_applied(tmp_path, base_ckpt):
    eff = resolve_run(compose(["finetune=instruct", f"init_from={base_ckpt}", "model.drop_rate=0.1",
                                "model.context_length=48"], tmp_path))
    assert eff.model_config == GPTConfig(**(BASE | {"drop_rate": 0.1, "context_length": 48}))


def test_values_that_change_a_shape_are_refused_in_one_line(tmp_path, base_ckpt):
    with pytest.raises(UserError) as e:
        resolve_run(compose(["finetune=instruct", f"init_from={base_ckpt}", "model.emb_dim=64",
                              "model.context_length=128"], tmp_path))
    assert str(e.value) == (f"model.context_length=128 but init_from={base_ckpt} has 64, model.emb_dim=64 but "
                            f"init_from={base_ckpt} has 32: choose model=checkpoint (its architecture), or drop "
                            f"the model override")
    with pytest.raises(UserError, match=r"model.n_layers=4 but init_from=.* has 2.*model=checkpoint"):
        resolve_run(compose([*TINY, f"init_from={base_ckpt}", "model.n_layers=4"], tmp_path))  # pretraining


def test_a_model_preset_that_matches_the_checkpoint_is_accepted(tmp_path, base_ckpt):
    overrides = [f"model.{k}={v}" for k, v in BASE.items()]
    eff = resolve_run(compose([*overrides, "data.tokenizer=bytes", f"init_from={base_ckpt}"], tmp_path))
    assert eff.model_config == GPTConfig(**BASE)


def test_model_checkpoint_needs_init_from(tmp_path):
    with pytest.raises(UserError, match=r"^model.vocab_size is null: model=checkpoint takes the architecture of "
                                        r"init_from, which is not set.*model=gpt_tiny"):
        resolve_run(compose(["finetune=classify", "data.tokenizer=gpt2"], tmp_path))


def test_a_tokenizer_other_than_the_checkpoints_is_refused(tmp_path, base_ckpt):
    with pytest.raises(UserError, match=r"data.tokenizer=gpt2 but init_from=.* was trained with bytes: set "
                                        r"data.tokenizer=bytes \(or null: the checkpoint's\)"):
        resolve_run(compose(["finetune=classify", f"init_from={base_ckpt}", "data.tokenizer=gpt2"], tmp_path))
    with pytest.raises(UserError, match="data.tokenizer is null, which means init_from's tokenizer"):
        resolve_run(compose(["finetune=classify", "model=gpt_tiny"], tmp_path))


def test_problems_are_reported_together(tmp_path):
    with pytest.raises(UserError) as e:
        resolve_run(compose([*TINY, "model.n_heads=3", "data.batch_size=0", "trainer.max_steps=0",
                              "scheduler.min_lr_ratio=2", "scheduler=wsd", "scheduler.cooldown_fraction=0",
                              "checkpoint_every=0"], tmp_path))
    parts = str(e.value).split("; ")
    assert [p.split(" ")[0].split("=")[0] for p in parts] == [
        "model.emb_dim", "data.batch_size", "trainer.max_steps", "scheduler.min_lr_ratio",
        "scheduler.cooldown_fraction", "checkpoint_every"]


def test_the_eval_keys_are_checked_and_a_classifier_or_fsdp_refuses_eval_tasks(tmp_path):
    assert resolve_run(compose([*TINY, "eval=quick", "eval.every_n_steps=5", "eval.limit=0.5"], tmp_path))
    with pytest.raises(UserError) as e:
        resolve_run(compose(["finetune=classify", "data=classify_embedded", "model=gpt_tiny", "data.tokenizer=gpt2",
                             "trainer.strategy=fsdp", "eval=quick", "eval.every_n_steps=0", "eval.limit=0",
                             "eval.batch_size=0"], tmp_path))
    assert [p.split(" ")[0] for p in str(e.value).split("; ")] == [
        "eval.every_n_steps", "eval.limit", "eval.batch_size", "eval.tasks:", "eval.tasks"]
    assert "classify stage's model predicts classes" in str(e.value) and "FSDP strategy" in str(e.value)
    with pytest.raises(UserError, match=r"^eval.tasks must be a list of lm_eval task names, got 'hellaswag'"):
        resolve_run(compose([*TINY, "eval.tasks=hellaswag"], tmp_path))
    assert resolve_run(compose(["finetune=classify", "data=classify_embedded", "model=gpt_tiny",  # no tasks: fine
                                "data.tokenizer=gpt2", "eval.every_n_steps=3"], tmp_path))


# ---- every refusal the checks can make is a row of docs/errors.md, which tests/test_errors.py runs ----

def refusal_patterns(path) -> list[tuple[int, str]]:
    """(line, regex) of every message a file's checks can refuse with: each f-string given to
    problems.append / refused.append / raise UserError, its placeholders as wildcards."""
    import ast
    import re

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], (ast.JoinedStr,
                                                                                             ast.Constant)):
            continue
        func = node.func
        is_append = (isinstance(func, ast.Attribute) and func.attr == "append" and isinstance(func.value, ast.Name)
                     and func.value.id in ("problems", "refused"))
        is_raise = isinstance(func, ast.Name) and func.id == "UserError"
        if not (is_append or is_raise):
            continue
        arg = node.args[0]
        parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
        regex = "".join(re.escape(p.value) if isinstance(p, ast.Constant) else ".+?" for p in parts)
        found.append((node.lineno, regex))
    return found


def documented_messages() -> list[str]:
    """The messages of docs/errors.md: its table's rows and the GPU-only ones named below it."""
    import re

    from conftest import ROOT

    text = (ROOT / "docs" / "errors.md").read_text()
    rows = re.findall(r"^\| \w+ \| `[^`]*` \| \d+ \| `(.*)` \|$", text, flags=re.M)
    return rows + re.findall(r"→ `(error: [^`]*)`", text)


def test_max_dropped_fraction_is_a_share(tmp_path, base_ckpt):
    for value in (-0.1, 1.5):
        with pytest.raises(UserError, match=f"data.max_dropped_fraction must lie in \\[0, 1\\] .*, got {value}"):
            resolve_run(compose(["finetune=instruct", f"init_from={base_ckpt}", f"data.max_dropped_fraction={value}"],
                                tmp_path))
    resolve_run(compose(["finetune=instruct", f"init_from={base_ckpt}", "data.max_dropped_fraction=1"], tmp_path))


def test_a_resume_whose_init_from_was_replaced_behind_the_same_name_is_one_line(tmp_path, base_ckpt):
    """The checkpoint records init_from by name and by content digest (run_meta); the DPO reference, a LoRA base
    and the record of any stage come from those files: new files under the old name are refused."""
    from llmtrain.interop.checkpoints import ModelInfo
    from llmtrain.interop.digest import weights_digest
    from llmtrain.run.checks import check_resume
    from llmtrain.run.outputs import run_meta
    from llmtrain.stages.pretrain import Pretrain

    stage = Pretrain("all", None, None, None, 0)
    meta = run_meta(compose([f"init_from={base_ckpt}", "model=checkpoint"], tmp_path), "bytes", stage)
    then = meta["init_from_digest"]
    assert then == weights_digest(str(base_ckpt))
    info = ModelInfo(kind="llmtrain", path="run.ckpt", model_config=GPTConfig(**BASE), init_from=str(base_ckpt),
                     init_from_digest=then)
    check_resume(info, GPTConfig(**BASE), stage, "run.ckpt", str(base_ckpt))  # the same files: resumes
    torch.manual_seed(1)
    model = GPT(GPTConfig(**BASE))  # another model of the same shapes, saved under the same name
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "llmtrain": {"model_config": asdict(model.config), "tokenizer": "bytes", "stage": "pretrain"}},
               base_ckpt)
    now = weights_digest(str(base_ckpt))
    with pytest.raises(UserError) as e:
        check_resume(info, GPTConfig(**BASE), stage, "run.ckpt", str(base_ckpt))
    assert str(e.value) == (f"init_from={base_ckpt} holds other weights than when ckpt_path=run.ckpt was written "
                            f"(content digest {now[7:19]}, then {then[7:19]}): put back the weights the run started "
                            "from, or start a new run from these (without ckpt_path)")
    assert run_meta(compose([], tmp_path), "bytes", stage)["init_from_digest"] is None


def test_every_refusal_of_the_checks_has_a_row_in_the_error_catalogue():
    import re

    from conftest import ROOT

    messages = [" ".join(m.split()) for m in documented_messages()]
    assert len(messages) >= 30
    sites = [(f, line, regex) for f in ("llmtrain/run/checks.py", "llmtrain/run/resolve.py", "llmtrain/model/gpt.py",
                                        "llmtrain/run/memory.py")
             for line, regex in refusal_patterns(ROOT / f)]
    assert len(sites) >= 20  # the scan found the checks
    undocumented = [f"{f}:{line}" for f, line, regex in sites if not any(re.search(regex, m) for m in messages)]
    assert not undocumented, f"refusals without a row in docs/errors.md: {undocumented}"


@pytest.mark.parametrize("key, value", [("rope_theta", 5000.0), ("norm_eps", 1e-3)])
def test_rope_theta_and_norm_eps_that_differ_from_the_checkpoints_are_refused(tmp_path, base_ckpt, key, value):
    """They change no weight's shape, but the function the weights were trained to compute: like a shape, a value
    other than the checkpoint's is refused, by the config check and by the resume check."""
    from dataclasses import replace

    from llmtrain.interop.checkpoints import ModelInfo
    from llmtrain.run.checks import check_resume
    from llmtrain.stages.pretrain import Pretrain

    saved = GPTConfig(**BASE)
    assert getattr(saved, key) != value
    with pytest.raises(UserError, match=rf"model.{key}={value} but init_from=.* has {getattr(saved, key)}"):
        resolve_run(compose([*TINY, f"init_from={base_ckpt}", f"model.{key}={value}"], tmp_path))
    info = ModelInfo(kind="llmtrain", path="x.ckpt", model_config=saved, stage="pretrain")
    stage = Pretrain(train_blocks="all", lora=None, loss_chunk=None, sample_prompt=None, sample_tokens=0)
    check_resume(info, saved, stage, "x.ckpt")  # the same config resumes
    with pytest.raises(UserError, match=rf"holds another architecture: model.{key}={getattr(saved, key)} \(this "
                                        rf"run: {value}\)"):
        check_resume(info, replace(saved, **{key: value}), stage, "x.ckpt")


def test_a_resume_lists_what_it_changes_and_refuses_what_would_mix_two_runs(tmp_path):
    """The checkpoint records its run's effective config; a resume compares its own with it, key by key."""
    from llmtrain.run.checks import resume_changes
    from llmtrain.run.outputs import run_meta
    from llmtrain.stages.pretrain import Pretrain

    saved = run_meta(compose([], tmp_path), "gpt2", Pretrain("all", None, None, None, 0))["config"]
    assert "run_dir" not in saved and "ckpt_path" not in saved and "logger" not in saved
    lr, steps = saved["optimizer"]["lr"], saved["trainer"]["max_steps"]

    def changes(*overrides):
        return resume_changes(saved, compose(["ckpt_path=last", *overrides], tmp_path))

    assert changes() == ([], None)  # the same command line: an exact resume, nothing to say
    lines, refusal = changes("checkpoint_every=7", "trainer.devices=1")
    assert lines == ["checkpoint_every: 100 -> 7"] and refusal is None  # listed, harmless
    lines, refusal = changes("optimizer.lr=0.002", "trainer.max_steps=9000")
    assert lines == [f"optimizer.lr: {lr} -> 0.002", f"trainer.max_steps: {steps} -> 9000"]
    assert refusal == ("this run changes optimizer.lr, trainer.max_steps against the checkpoint's run: resume with "
                       "the checkpoint's values, or apply the new ones with "
                       "resume.apply=[optimizer.lr,trainer.max_steps]")
    assert changes("optimizer.lr=0.002", "resume.apply=[optimizer]")[1] is None  # a prefix applies its keys
    assert changes("optimizer.lr=0.002", "resume.apply=[optimizer.lr]")[1] is None
    assert changes("optimizer.lr=0.002", "resume.apply=[optimizer.l]")[1] is not None  # a key, not a string prefix
    for overrides, keys in ((["data.tokenizer=bytes"], "data.tokenizer"), (["optimizer=adamw"], "optimizer._target_"),
                            (["data.path=other.txt", "resume.apply=[data.path]"], "data.path"),
                            (["data.revision=v2"], "data.revision")):  # another version of a Hub dataset
        refusal = changes(*overrides)[1]
        assert refusal.startswith(f"this run changes {keys}") and "resuming would mix two runs" in refusal, refusal


ROPE = BASE | dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=1, bias=False,
                   rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32})


@pytest.mark.parametrize("override, key, value", [
    ("model.rope_scaling={type:linear,factor:8}", "rope_scaling", {"type": "linear", "factor": 8.0}),
    ("model.qk_norm=true", "qk_norm", True),
    ("model.head_dim=32", "head_dim", 32),
    ("model.qkv_bias=true", "qkv_bias", True),
], ids=["rope_scaling", "qk_norm", "head_dim", "qkv_bias"])
def test_the_new_options_must_match_the_checkpoints_under_init_from_and_on_resume(tmp_path, override, key, value):
    """rope_scaling and QK-norm change what the weights compute, head_dim and a q/k/v bias their shapes: a value
    other than the checkpoint's is refused by the config check (init_from) and by the resume check; the same values
    (a mapping written with ints, as on a command line) resume."""
    from dataclasses import replace

    from llmtrain.interop.checkpoints import ModelInfo
    from llmtrain.run.checks import check_resume
    from llmtrain.stages.pretrain import Pretrain

    saved = GPTConfig(**ROPE)
    torch.manual_seed(0)
    path = tmp_path / "rope.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in GPT(saved).state_dict().items()},
                "llmtrain": {"model_config": asdict(saved), "tokenizer": "bytes", "stage": "pretrain"}}, path)
    same = "model.rope_scaling={type:llama3,factor:8,low_freq_factor:1,high_freq_factor:4," \
           "original_max_position_embeddings:32}"
    assert resolve_run(compose(["finetune=instruct", f"init_from={path}", same], tmp_path)).model_config == saved
    with pytest.raises(UserError, match=rf"^model.{key}=.* but init_from={path} has {getattr(saved, key)}"):
        resolve_run(compose(["finetune=instruct", f"init_from={path}", override], tmp_path))
    info = ModelInfo(kind="llmtrain", path=str(path), model_config=saved, stage="pretrain")
    stage = Pretrain(train_blocks="all", lora=None, loss_chunk=None, sample_prompt=None, sample_tokens=0)
    check_resume(info, GPTConfig(**(ROPE | {"rope_scaling": {**ROPE["rope_scaling"], "factor": 8}})), stage, "x")
    with pytest.raises(UserError, match=rf"holds another architecture: model.{key}="):
        check_resume(info, replace(saved, **{key: value}), stage, "x.ckpt")


def test_a_window_as_long_as_the_models_is_accepted_and_a_longer_or_empty_one_refused(tmp_path):
    assert resolve_run(compose([*TINY, "data.context_length=32"], tmp_path)).context_length == 32
    with pytest.raises(UserError) as e:
        resolve_run(compose([*TINY, "data.context_length=33"], tmp_path))
    assert str(e.value) == ("data.context_length=33 is larger than model.context_length=32: lower "
                            "data.context_length or raise model.context_length")
    with pytest.raises(UserError) as e:  # 0 is a value given, not the model's window
        resolve_run(compose([*TINY, "data.context_length=0"], tmp_path))
    assert str(e.value) == "data.context_length must be positive, got 0"


def test_train_blocks_counts_up_to_every_block(tmp_path, base_ckpt):
    classify = ["finetune=classify", f"init_from={base_ckpt}"]
    assert resolve_run(compose([*classify, "finetune.train_blocks=2"], tmp_path)).stage.train_blocks == 2
    with pytest.raises(UserError) as e:
        resolve_run(compose([*classify, "finetune.train_blocks=3"], tmp_path))
    assert str(e.value) == ("finetune.train_blocks=3 is not one of 0..2 or all, last, head, none, or N (the last N "
                            "blocks)")


def test_a_run_resumes_with_another_dropout_rate():
    """Dropout holds no weights: a checkpoint resumes under another drop_rate, as init_from takes one."""
    from llmtrain.interop.checkpoints import ModelInfo
    from llmtrain.run.checks import check_resume
    from llmtrain.stages.pretrain import Pretrain

    info = ModelInfo(kind="llmtrain", path="x.ckpt", model_config=GPTConfig(**BASE), stage="pretrain")
    stage = Pretrain(train_blocks="all", lora=None, loss_chunk=None, sample_prompt=None, sample_tokens=0)
    check_resume(info, GPTConfig(**(BASE | {"drop_rate": 0.1})), stage, "x.ckpt")
