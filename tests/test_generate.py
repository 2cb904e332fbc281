"""llmtrain.generate: the command line on a tiny checkpoint, sampling determinism, the KV cache, error messages."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import ROOT, subprocess_env

from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.generate import build_prompt, generate_text, parse_args, top_candidates
from llmtrain.model.gpt import GPT, GPTConfig

TINY = GPTConfig(vocab_size=257, context_length=64, emb_dim=32, n_heads=2, n_layers=2)


def save_checkpoint(path: Path, model: GPT | None = None, **meta) -> Path:
    torch.manual_seed(0)
    model = model or GPT(TINY)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "llmtrain": {"model_config": asdict(model.config), "tokenizer": "bytes", **meta}}, path)
    return path


def run_generate(*args: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.pop("LLMTRAIN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llmtrain.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("gen") / "tiny.ckpt")


@pytest.fixture(scope="module")
def model(ckpt) -> GPT:
    from llmtrain.interop.pretrained import load_pretrained

    return load_pretrained(str(ckpt))[0]


TOK = build_tokenizer("bytes")


@pytest.mark.slow  # two processes of the command line
def test_command_line_greedy_is_deterministic_and_matches_generate_text(ckpt, model):
    """fp32 gives the trained weights' own tokens; the default (int8 weight-only on a CPU) those of the
    quantized weights."""
    import copy

    from llmtrain.run.decoding import quantize_int8

    args = [f"ckpt_path={ckpt}", "prompt=Hello", "max_new_tokens=5", "temperature=0", "device=cpu"]
    first, second = run_generate(*args, "precision=fp32"), run_generate(*args, "precision=fp32")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    expected = generate_text(model, TOK, "Hello", max_new_tokens=5, temperature=0, top_k=50, top_p=None, seed=1)
    assert first.stdout == expected + "\n"
    import llmtrain.generate as gen

    assert gen.run(parse_args([*args, "precision=fp32", "echo=true"])) == "Hello" + expected
    quantized = quantize_int8(copy.deepcopy(model))
    assert gen.run(parse_args(args)) == generate_text(quantized, TOK, "Hello", max_new_tokens=5, temperature=0)


@pytest.mark.slow
def test_show_top_prints_k_sorted_candidates(ckpt, model):
    result = run_generate(f"ckpt_path={ckpt}", "prompt=Hello", "show_top=7", "device=cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 7
    percents = [float(line.split("%")[0].split()[-1]) for line in lines]
    assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.0
    candidates = top_candidates(model, TOK, "Hello", 7)
    assert [c[0] for c in candidates] == [int(line.split()[1]) for line in lines]
    assert all(0 <= p <= 1 for _, _, p in candidates)


def test_top_candidates_are_the_distribution_after_the_last_prompt_token(model):
    """show_top lists what the model predicts next: softmax of the logits at the prompt's last position."""
    ids = torch.tensor([TOK.encode("Hello")])  # (1, 5): one byte a token
    with torch.no_grad():
        probs = model(ids)[0, -1].softmax(dim=-1)  # (257,)
    want = torch.topk(probs, 7)
    candidates = top_candidates(model, TOK, "Hello", 7)
    assert [i for i, _, _ in candidates] == want.indices.tolist()
    assert [p for _, _, p in candidates] == pytest.approx(want.values.tolist(), abs=1e-6)
    # a byte that is part of a UTF-8 character shows as \xNN
    assert [s for _, s, _ in candidates] == [
        TOK.decode_single_token_bytes(i).decode("utf-8", errors="backslashreplace") for i in want.indices.tolist()]


def test_same_seed_same_sample_and_other_seed_differs(model):
    sample = lambda seed: generate_text(model, TOK, "Once", max_new_tokens=20, temperature=1.0, top_k=None,
                                        top_p=None, seed=seed)
    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1  # an untrained byte model is close to uniform over 257 ids


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate_text(model, TOK, "abc", max_new_tokens=10, temperature=0, top_k=None, top_p=None, seed=0)
    assert generate_text(model, TOK, "abc", 10, temperature=1.5, top_k=1, top_p=None, seed=3) == greedy
    assert generate_text(model, TOK, "abc", 10, temperature=1.5, top_k=None, top_p=1e-6, seed=3) == greedy


def test_cached_and_uncached_greedy_agree(model):
    kwargs = dict(max_new_tokens=30, temperature=0, top_k=None, top_p=None, seed=0)
    assert generate_text(model, TOK, "The cat", use_cache=True, **kwargs) == \
        generate_text(model, TOK, "The cat", use_cache=False, **kwargs)
    # past the context (64) the cache is dropped and the window slides: still a full-length answer
    prompt = torch.tensor([TOK.encode_ordinary("x" * 60)])
    out = model.generate(prompt, 20, temperature=0)
    assert out.shape == (1, 80) and torch.equal(out[:, :60], prompt)
    assert torch.equal(out, model.generate(prompt, 20, temperature=0, use_cache=False))


@pytest.mark.slow
def test_classifier_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    classifier = GPT(TINY)
    classifier.replace_head(2)  # one row per label, as the classify stage makes
    path = save_checkpoint(tmp_path / "clf.ckpt", classifier, num_classes=2, label_names=["neg", "pos"])
    result = run_generate(f"ckpt_path={path}", "prompt=great film")
    assert result.returncode == 2
    assert result.stderr == (f"error: ckpt_path={path} is a classifier (labels: neg, pos): it predicts "
                             "labels, it does not generate text\n")


@pytest.mark.parametrize("args, words", [
    (["prompt=hi"], "ckpt_path is not set"),
    (["CKPT"], "prompt is not set"),
    (["CKPT", "prompt=hi", "tempreature=0"], "unknown key 'tempreature' (did you mean temperature?); the keys are "
                                             "ckpt_path, base, prompt"),
    (["CKPT", "prompt=hi", "temperature=-1", "top_p=1.5"], "temperature must be a number >= 0"),
    (["CKPT", "prompt=hi", "temperature=nan"], "temperature must be a number >= 0 (0 = greedy), got nan"),
    (["CKPT", "prompt=hi", "max_new_tokens=1000000000000"], "max_new_tokens must lie in [1, 1,000,000] (the tokens "
                                                           "of one call, held in memory with the prompt), got "
                                                           "1,000,000,000,000"),
    (["CKPT", "prompt=hi", "max_new_tokens=many"], "max_new_tokens=many: expected an integer"),
])
def test_bad_command_lines_exit_2_with_one_line(ckpt, args, words, capsys, monkeypatch):
    from llmtrain.generate import main

    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:  # main() in this process: what the command runs, without its start-up
        main([f"ckpt_path={ckpt}" if a == "CKPT" else a for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


@pytest.mark.slow
def test_missing_prompt_through_the_real_command(ckpt):
    result = run_generate(f"ckpt_path={ckpt}")
    assert result.returncode == 2
    assert result.stderr.startswith("error: prompt is not set") and "Traceback" not in result.stderr


def test_bad_values_are_reported_together():
    with pytest.raises(Exception, match=r"temperature must be a number >= 0.*top_p must lie in \(0, 1\]"):
        parse_args(["ckpt_path=x", "prompt=hi", "temperature=-0.5", "top_p=0"])
    assert parse_args(["ckpt_path=x", "prompt=", "top_p=null"]).prompt == ""  # an empty prompt is a prompt


def test_instruction_template_wrapping(monkeypatch, tmp_path):
    from llmtrain.data.prompts import format_prompt

    assert build_prompt("alpaca", "Name a colour", None, "", False) == format_prompt("Name a colour")
    assert build_prompt("alpaca", "Add them", None, "2 and 3", False) == format_prompt("Add them", "2 and 3")
    assert build_prompt("alpaca", "Name a colour", None, "", True) == "Name a colour"  # raw=true
    assert build_prompt(None, "Name a colour", None, "", False) == "Name a colour"
    assert build_prompt(None, None, "Add them", "2 and 3", False) == format_prompt("Add them", "2 and 3")

    # end to end: the checkpoint's prompt_template reaches build_prompt, and generate_text gets the wrapped prompt
    import llmtrain.generate as gen

    path = save_checkpoint(tmp_path / "instruct.ckpt", prompt_template="alpaca")
    seen = []
    monkeypatch.setattr(gen, "generate_text", lambda model, tok, prompt, *a, **k: seen.append(prompt) or "ok")
    assert gen.run(parse_args([f"ckpt_path={path}", "prompt=Name a colour", "device=cpu"])) == "ok"
    assert gen.run(parse_args([f"ckpt_path={path}", "prompt=Name a colour", "raw=true", "device=cpu"])) == "ok"
    assert seen == [format_prompt("Name a colour"), "Name a colour"]


def test_lora_adapter_dir_is_merged_into_its_base(ckpt, model, tmp_path):
    import copy
    import json

    from llmtrain.generate import load_model
    from llmtrain.interop.lora import apply_lora, merge, save_adapter

    peft_model = apply_lora(copy.deepcopy(model), r=4, dropout=0.0)
    with torch.no_grad():  # B starts at zero (the adapter would change nothing): give it a visible update
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    adapter = save_adapter(peft_model, tmp_path / "adapter")
    (adapter / "llmtrain_adapter.json").write_text(json.dumps({"base": str(ckpt)}))
    expected = generate_text(merge(peft_model).eval(), TOK, "Hello", 10, temperature=0, top_k=None, top_p=None,
                             seed=0)
    loaded, info = load_model(str(adapter))
    assert info.extra["adapter"] == str(adapter) and info.extra["base"] == str(ckpt)
    assert generate_text(loaded, TOK, "Hello", 10, temperature=0, top_k=None, top_p=None, seed=0) == expected
    assert expected != generate_text(model, TOK, "Hello", 10, temperature=0, top_k=None, top_p=None, seed=0)

    from llmtrain.errors import UserError
    from llmtrain.interop.digest import weights_digest

    other = save_checkpoint(tmp_path / "other.ckpt", GPT(TINY))  # another base, of the same shapes
    for base, digest in ((ckpt, weights_digest(str(ckpt))), (other, weights_digest(str(ckpt)))):
        (adapter / "llmtrain_adapter.json").write_text(json.dumps({"base": str(base), "init_from_digest": digest}))
        if base == ckpt:  # the base it was trained on: merged
            assert load_model(str(adapter))[1].extra["base"] == str(ckpt)
            continue
        with pytest.raises(UserError, match=f"^ckpt_path={adapter} is a LoRA adapter trained on other weights than "
                                            f"{other} holds now \\(content digest .*\\): give base=<the weights it"):
            load_model(str(adapter))


@pytest.mark.parametrize("args, message", [
    (["max_new_tokens=0"], "max_new_tokens must lie in [1, 1,000,000] (the tokens of one call, held in memory with "
                           "the prompt), got 0"),
    (["instruction=Add them"], "prompt and instruction are both set: give one (instruction= wraps it in the Alpaca "
                               "template)"),
    (["show_top=0"], "show_top must be at least 1, got 0"),
    (["device=tpu"], "device='tpu' is not known: choose auto, cpu, cuda or cuda:N"),
])
def test_each_rule_of_the_values_is_one_line(args, message):
    from llmtrain.errors import UserError

    with pytest.raises(UserError) as e:
        parse_args(["ckpt_path=x", "prompt=hi", *args])
    assert str(e.value) == message


def test_a_classifier_is_refused_before_its_weights_are_read(tmp_path):
    """The unit of test_classifier_checkpoint_is_refused (the real command); up to ten labels are named."""
    from llmtrain.errors import UserError
    from llmtrain.generate import load_model

    for n, shown in ((2, "neg, pos"), (10, "l0, l1, l2, l3, l4, l5, l6, l7, l8, l9"),
                     (12, "l0, l1, l2, l3, l4, l5, l6, l7, l8, l9 and 2 more")):
        torch.manual_seed(0)
        classifier = GPT(TINY)
        classifier.replace_head(n)
        labels = ["neg", "pos"] if n == 2 else [f"l{i}" for i in range(n)]
        path = save_checkpoint(tmp_path / f"clf{n}.ckpt", classifier, num_classes=n, label_names=labels)
        with pytest.raises(UserError) as e:
            load_model(str(path))
        assert str(e.value) == (f"ckpt_path={path} is a classifier (labels: {shown}): it predicts labels, it does not "
                                "generate text")


def test_ids_beyond_the_tokenizer_are_shown_as_such():
    """A head wider than the tokenizer (a vocabulary rounded up): show_top names the ids that decode to nothing."""
    torch.manual_seed(0)
    wide = GPT(GPTConfig(vocab_size=259, context_length=64, emb_dim=32, n_heads=2, n_layers=2)).eval()
    shown = {i: s for i, s, _ in top_candidates(wide, TOK, "Hello", 259)}
    assert (shown[256], shown[257], shown[258]) == ("<|endoftext|>", "<id 257 beyond the tokenizer>",
                                                    "<id 258 beyond the tokenizer>")
    assert shown[0xe2] == "\\xe2" and shown[ord("a")] == "a"


def test_base_on_the_command_line_wins_over_the_adapters_record(ckpt, model, tmp_path):
    """An adapter whose recorded base has moved away: base= names where it is now."""
    import copy
    import json

    from llmtrain.generate import load_model
    from llmtrain.interop.lora import apply_lora, save_adapter

    adapter = save_adapter(apply_lora(copy.deepcopy(model), r=4, dropout=0.0), tmp_path / "adapter")
    (adapter / "llmtrain_adapter.json").write_text(json.dumps({"base": str(tmp_path / "moved.ckpt")}))
    loaded, info = load_model(str(adapter), base=str(ckpt))
    assert info.extra["base"] == str(ckpt)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())  # B is zero: the base


def test_a_hostile_config_json_is_refused_before_anything_is_allocated(tmp_path, capsys, monkeypatch):
    """A billion-entry vocabulary and a million blocks (GPT-2's count: V*E + P*E + L*(12*E*E + 13*E) + 2*E): the
    pre-flight counts them on the meta device and stops in one line; max_new_tokens counts too (a model that fits
    with 10 new tokens does not with a million)."""
    from conftest import write_hostile_folder

    from llmtrain.generate import main
    from llmtrain.run import memory

    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    monkeypatch.setattr(memory, "available_ram", lambda: 64 * 2**30)
    hostile = write_hostile_folder(tmp_path / "hostile")
    with pytest.raises(SystemExit) as e:
        main([f"ckpt_path={hostile}", "prompt=hi"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: ckpt_path={hostile} describes a model of 113,984,065,664 parameters (n_layers=1000000, emb_dim=64, "
        "vocab_size=1000000000) that needs about 5,152.7 GiB to load and generate (weights 849.25, decoding "
        "4,302.98), but this machine has 64.0 GiB of available RAM: check the sizes in its config, or use a machine "
        "with more memory\n")
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt")
    monkeypatch.setattr(memory, "available_ram", lambda: memory.RUNTIME["cpu"] + 4 * 2**20)
    main([f"ckpt_path={ckpt}", "prompt=hi", "max_new_tokens=10"])
    with pytest.raises(SystemExit):
        main([f"ckpt_path={ckpt}", "prompt=hi", "max_new_tokens=1000000"])
    assert "to load and generate" in capsys.readouterr().err


def test_the_command_says_on_stderr_how_it_decodes(ckpt, capsys):
    """What precision=auto chose, and how to get the fp32 model's exact tokens, on stderr, never in the text."""
    import llmtrain.generate as gen

    args = [f"ckpt_path={ckpt}", "prompt=Hello", "max_new_tokens=2", "temperature=0", "device=cpu"]
    text = gen.run(parse_args(args))
    err = capsys.readouterr().err
    assert "decoding with int8 weight-only weights (precision=auto on this CPU" in err
    assert "precision=fp32 gives its exact tokens" in err and "decoding" not in text
    gen.run(parse_args([*args, "precision=fp32"]))
    assert capsys.readouterr().err.startswith("decoding in fp32 (precision=fp32)")
