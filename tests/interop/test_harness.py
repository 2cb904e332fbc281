"""llmtrain's lm_eval model against lm_eval's own Hugging Face backend on the same random GPT-2 weights, offline: the
same per-request log-likelihoods (multiple choice and rolling), accuracies and greedy generations; and the model
class alone on a tiny in-memory GPT (batching, the window's left crop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmtrain.data.tokenizer import build_tokenizer, continuation_text
from llmtrain.interop.harness import GPTHarnessLM
from llmtrain.interop.harness_tasks import load_tasks, run_tasks
from llmtrain.interop.hf import export_hf
from llmtrain.interop.pretrained import load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig

META = {"tokenizer": "gpt2", "stage": "pretrain", "label_names": None, "prompt_template": None, "init_from": None,
        "step": 1}
# a context of 64 tokens: the definitions task's longer choices lose the left of their context, and the held-out
# texts are read in several windows
CONFIG = dict(vocab_size=50304, context_length=64, emb_dim=32, n_heads=2, n_layers=2)
GENERATE_TASK = """task: tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: prompts.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["e", "\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""
LIMIT = 8  # documents of each shipped task
PROMPTS = ["The devil is", "A lawyer, n.", "Hackers call it", "Once upon a time", "Define \"kiss\":"]


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**(CONFIG | overrides))).eval()
    with torch.no_grad():  # GPT-2's init gives near-uniform logits: spread them so that greedy choices are clear
        model.tok_emb.weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(a random tiny GPT exported in GPT-2's layout with GPT-2's tokenizer, a task folder with a generation task)."""
    tmp = tmp_path_factory.mktemp("harness")
    out = export_hf(tiny(), tmp / "hf", META)
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "tiny_generate.yaml").write_text(GENERATE_TASK)
    (tasks / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in PROMPTS))
    return out, tasks


def evaluate_with(lm, tasks_dir: Path) -> dict:
    loaded = load_tasks(["llmtrain_definitions", "llmtrain_perplexity", "tiny_generate"], str(tasks_dir))
    return run_tasks(lm, loaded, limit=LIMIT, log_samples=True)


@pytest.mark.slow  # lm_eval's HF backend: transformers' model and tokenizer loaded, both tasks run twice
def test_scores_equal_lm_evals_own_hugging_face_backend(folders):
    from lm_eval.models.huggingface import HFLM

    out, tasks_dir = folders
    model, info = load_pretrained(str(out))
    ours = evaluate_with(GPTHarnessLM(model, build_tokenizer(info.tokenizer), batch_size=5), tasks_dir)
    theirs = evaluate_with(HFLM(pretrained=str(out), device="cpu", batch_size=1, dtype="float32"), tasks_dir)

    for task in ("llmtrain_definitions", "llmtrain_perplexity", "tiny_generate"):
        a, b = ours["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and len(a) == (LIMIT if task != "tiny_generate"
                                                                                   else len(PROMPTS))
        for x, y in zip(a, b):
            assert len(x["resps"]) == len(y["resps"])
            for (r,), (s,) in zip(x["resps"], y["resps"]):
                if task == "tiny_generate":
                    assert r == s
                elif task == "llmtrain_definitions":  # (log-likelihood, greedy)
                    assert r[0] == pytest.approx(s[0], abs=1e-4) and r[1] == s[1]
                else:
                    assert r == pytest.approx(s, abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["llmtrain_definitions"][metric] == theirs["results"]["llmtrain_definitions"][metric]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["llmtrain_perplexity"][metric] == pytest.approx(
            theirs["results"]["llmtrain_perplexity"][metric], rel=1e-5)
    # the comparison means something: the texts span several windows, generations differ from one another
    gpt2, context = build_tokenizer("gpt2"), CONFIG["context_length"]
    assert sum(len(gpt2.encode(s["doc"]["text"])) > context for s in ours["samples"]["llmtrain_perplexity"]) >= 2
    assert any(len(gpt2.encode("".join(pair))) > context + 1  # a context cropped on the left
               for s in ours["samples"]["llmtrain_definitions"] for pair in s["arguments"])
    assert len({s["resps"][0][0] for s in ours["samples"]["tiny_generate"]}) > 2


@pytest.mark.slow  # lm_eval's HF backend: transformers' model and tokenizer loaded, both tasks run twice
def test_a_tokenizer_that_starts_texts_with_bos_scores_as_lm_evals_backend_does(tmp_path):
    """A Llama-3-style tokenizer puts <|begin_of_text|> before every text: llmtrain trains so, and HFLM encodes so
    (its tokenizer's own add_bos_token); the log-likelihoods agree on a Llama-layout export."""
    from conftest import write_llama3_tokenizer
    from lm_eval.models.huggingface import HFLM

    from llmtrain.interop.llama import export_llama

    tokenizer = str(write_llama3_tokenizer(tmp_path) / "tokenizer.json")
    tok = build_tokenizer(tokenizer)
    assert tok.add_bos
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, context_length=1024, emb_dim=32, n_heads=2, n_layers=2,
                          pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_weights=True)).eval()
    out = export_llama(model, tokenizer, tmp_path / "hf")
    names = ["llmtrain_definitions", "llmtrain_perplexity"]
    ours = run_tasks(GPTHarnessLM(model, tok, batch_size=3), load_tasks(names), limit=4, log_samples=True)
    theirs = run_tasks(HFLM(pretrained=str(out), device="cpu", batch_size=1, dtype="float32"), load_tasks(names),
                       limit=4, log_samples=True)
    for task in names:
        for x, y in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            for (r,), (s,) in zip(x["resps"], y["resps"], strict=True):
                assert (r[0] if isinstance(r, (list, tuple)) else r) == pytest.approx(
                    s[0] if isinstance(s, (list, tuple)) else s, abs=1e-4)
    assert GPTHarnessLM(model, tok).tok_encode("the")[:1] == [tok.bos_token]
    assert GPTHarnessLM(model, tok).tok_encode("the", add_special_tokens=False)[:1] != [tok.bos_token]


class Request:  # what the model class reads of an lm_eval Instance
    def __init__(self, *args) -> None:
        self.args = args


def direct_loglikelihood(model: GPT, ids: list[int], n: int) -> float:
    """log p(the last n of ids | the ones before), from the full logits of one forward pass."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)  # (T-1, V)
    return float(logprobs[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum())


def test_loglikelihood_is_the_same_in_any_batch_and_crops_the_context_from_the_left():
    model = tiny(vocab_size=257, context_length=16)
    tok = build_tokenizer("bytes")
    prompt = torch.tensor([tok.encode("abc")])
    greedy = tok.decode(model.generate(prompt, 3, temperature=0)[0, prompt.size(1):].tolist())
    assert greedy.isascii()  # (this seed's greedy bytes after "abc" are text, so they encode back to themselves)
    pairs = [("abc", greedy), ("A", " lawyer"), ("x" * 40 + "long context", " ends"), ("Hi", " there, you"),
             ("abc", greedy[0] + "~~")]  # the last: its first token is the greedy one, the others are not
    results = {bs: GPTHarnessLM(model, tok, batch_size=bs).loglikelihood([Request(*p) for p in pairs])
               for bs in (1, 3)}
    assert [v for v, _ in results[1]] == pytest.approx([v for v, _ in results[3]], abs=1e-5)
    assert [g for _, g in results[1]] == [g for _, g in results[3]] == [True, False, False, False, False]
    for (context, continuation), (value, _) in zip(pairs, results[1]):
        ids = tok.encode(context + continuation)[-17:]  # the window: context_length + 1 tokens, cut on the left
        assert value == pytest.approx(direct_loglikelihood(model, ids, len(continuation)), abs=1e-5)


def test_rolling_log_likelihood_predicts_every_token_once():
    model = tiny(vocab_size=257, context_length=16)
    tok = build_tokenizer("bytes")
    lm = GPTHarnessLM(model, tok, batch_size=2)
    short = "Hello world"  # one window: the prefix token then the text
    (value,) = lm.loglikelihood_rolling([Request(short)])
    assert value == pytest.approx(direct_loglikelihood(model, [tok.eot_token, *tok.encode(short)], len(short)),
                                  abs=1e-5)
    long_text = "The devil's dictionary defines every word wrongly."  # 50 tokens: four windows
    (whole,) = lm.loglikelihood_rolling([Request(long_text)])
    ids = [tok.eot_token, *tok.encode(long_text)]
    # tokens [a, b) are predicted in one window, which reads the 16 tokens before b (the first: the prefix token on)
    by_hand = sum(direct_loglikelihood(model, ids[max(0, b - 17): b], b - a)
                  for a in range(1, len(ids), 16) for b in [min(a + 16, len(ids))])
    assert len(ids) > 3 * 16 and whole == pytest.approx(by_hand, abs=1e-4)


def test_an_empty_context_is_the_tokenizers_bos_else_its_end_of_text():
    model = tiny(vocab_size=257, context_length=16)
    tok = build_tokenizer("bytes")
    lm = GPTHarnessLM(model, tok)
    assert lm.prefix_token_id == tok.eot_token == 256
    (without_bos,) = lm.loglikelihood([Request("", "ab")])
    assert without_bos[0] == pytest.approx(direct_loglikelihood(model, [256, *tok.encode("ab")], 2), abs=1e-5)

    class WithBos:  # a tokenizer.json's tokenizer names its BOS (e.g. Llama's <|begin_of_text|>)
        bos_token, eot_token = 7, 256
        encode = staticmethod(tok.encode)

    lm = GPTHarnessLM(model, WithBos())
    (with_bos,) = lm.loglikelihood([Request("", "ab")])
    assert with_bos[0] == pytest.approx(direct_loglikelihood(model, [7, *tok.encode("ab")], 2), abs=1e-5)
    assert with_bos[0] != pytest.approx(without_bos[0], abs=1e-3)


def test_generation_keeps_the_end_of_a_long_prompt_and_stops_at_a_stop_string():
    model = tiny(vocab_size=257, context_length=16)
    tok = build_tokenizer("bytes")
    lm = GPTHarnessLM(model, tok)
    prompt = "x" * 30 + "abc"  # 33 tokens: the last 16 - 4 stay, room for 4 new ones
    ids = tok.encode(prompt)[-12:]
    greedy = continuation_text(tok, model.generate(torch.tensor([ids]), 4, temperature=0)[0, 12:].tolist())
    (text,) = lm.generate_until([Request(prompt, {"until": [], "max_gen_toks": 4, "do_sample": False})])
    assert text == greedy and len(greedy) >= 2
    (cut,) = lm.generate_until([Request(prompt, {"until": [greedy[1]], "max_gen_toks": 4, "do_sample": False})])
    assert cut == greedy[: greedy.index(greedy[1])]
