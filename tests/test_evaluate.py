"""python -m llmtrain.evaluate: the shipped tasks on a tiny checkpoint in a run dir (table printed, lm_eval's JSON
written into the run dir), a user's task folder, one-line errors (a Hub task offline, an unknown task, no place for
the results), and lm_eval kept out of training's imports."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import ROOT
from test_generate import save_checkpoint

from llmtrain.evaluate import main, parse_args
from llmtrain.interop.harness_tasks import shipped_dir
from llmtrain.model.gpt import GPT, GPTConfig

# bytes: the definitions' choices (up to 201 bytes after the headword) fit in a context of 256
TINY = GPTConfig(vocab_size=257, context_length=256, emb_dim=32, n_heads=2, n_layers=2)
HUB_TASK = "task: hub_task\ndataset_path: Rowan/hellaswag\noutput_type: multiple_choice\ntest_split: validation\n" \
           "doc_to_text: '{{ctx}}'\ndoc_to_choice: endings\ndoc_to_target: label\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    save_checkpoint(run / "checkpoints" / "last.ckpt", GPT(TINY))
    return run


def test_the_shipped_tasks_score_a_run_dir_and_write_lm_evals_json_into_it(run_dir, capsys):
    main([f"ckpt_path={run_dir}", "limit=6", "batch_size=4"])
    printed = capsys.readouterr().out
    assert "llmtrain_definitions" in printed and "acc" in printed and "llmtrain_perplexity" in printed
    file = Path(printed.split("results written to ")[1].strip())
    assert file.parent == run_dir / "eval" and file.is_file()
    results = json.loads(file.read_text())
    assert results["n-samples"]["llmtrain_definitions"]["effective"] == 6
    assert 0 <= results["results"]["llmtrain_definitions"]["acc,none"] <= 1
    assert results["results"]["llmtrain_perplexity"]["byte_perplexity,none"] > 1
    assert results["config"]["llmtrain"]["tokenizer"] == "bytes"


def test_a_checkpoint_file_writes_into_its_run_dir_and_a_task_folder_reads_files_beside_its_yamls(
        run_dir, tmp_path, monkeypatch, capsys):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text((shipped_dir() / "llmtrain_perplexity.yaml").read_text()
                                     .replace("task: llmtrain_perplexity", "task: mine")
                                     .replace("../data/classify_test.jsonl.gz", "texts.jsonl"))
    (tasks / "texts.jsonl").write_text('{"text": "An abbot is a man."}\n{"text": "Hackers say foo."}\n')
    monkeypatch.chdir(tmp_path.parent)  # the data file is found beside its YAML, not in the working directory
    main([f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"tasks_dir={tasks}", "tasks=[mine]"])
    file = Path(capsys.readouterr().out.split("results written to ")[1].strip())
    assert file.parent == run_dir / "eval"
    results = json.loads(file.read_text())
    assert results["n-samples"]["mine"]["effective"] == 2 and list(results["results"]) == ["mine"]
    assert parse_args([f"ckpt_path={run_dir}"]).tasks == ["llmtrain_definitions", "llmtrain_perplexity"]


@pytest.mark.parametrize("args, words", [
    (["tasks=[hub_task]"], "task hub_task reads the Hugging Face Hub dataset Rowan/hellaswag, which could not be "
                           "loaded"),
    pytest.param(["tasks=[llmtrain_definitons]"], "llmtrain_definitons is not a task of lm_eval, nor of llmtrain",
                 marks=pytest.mark.slow),  # reads lm_eval's whole task index (~10 s on a quiet machine)
    (["tasks=[]"], "tasks is empty"),
    (["limit=0"], "limit must be positive"),
    (["chat_template=chatml"], "chat_template and system_instruction apply to chat models only: add "
                               "apply_chat_template=true"),
])
def test_mistakes_are_one_line(run_dir, tmp_path, args, words, capsys, monkeypatch):
    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    (tmp_path / "hub_task.yaml").write_text(HUB_TASK)
    with pytest.raises(SystemExit) as stop:
        main([f"ckpt_path={run_dir}", f"tasks_dir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and words in err, err



def test_a_chat_model_is_asked_each_question_as_a_conversation_through_its_template(run_dir, capsys):
    """apply_chat_template=true: lm_eval builds each request as turns (the system instruction, the question) and the
    model's class renders them with the chat template, the answer continuing after the assistant's header; the
    results JSON records the template and the instruction."""
    from llmtrain.data.chat_template import CHATML, ChatTemplate
    from llmtrain.data.tokenizer import build_tokenizer
    from llmtrain.interop.harness import GPTHarnessLM
    from llmtrain.interop.harness_tasks import load_tasks, run_tasks

    tok = build_tokenizer("bytes")
    lm = GPTHarnessLM(GPT(TINY).eval(), tok, batch_size=4, template=ChatTemplate(CHATML, tok))
    results = run_tasks(lm, load_tasks(["llmtrain_definitions"]), limit=2, log_samples=True, bootstrap_iters=0,
                        apply_chat_template=True, system_instruction="Be brief.")
    sample = results["samples"]["llmtrain_definitions"][0]
    context = sample["arguments"][0][0]
    question = sample["doc"]
    assert context.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHeadword: ")
    assert context.endswith("<|im_end|>\n<|im_start|>assistant\n") and question["term"] in context

    main([f"ckpt_path={run_dir}", "tasks=[llmtrain_definitions]", "limit=2", "apply_chat_template=true",
          "chat_template=chatml", "system_instruction=Be brief."])
    file = Path(capsys.readouterr().out.split("results written to ")[1].strip())
    written = json.loads(file.read_text())["config"]["llmtrain"]
    assert written["chat_template"] == CHATML and written["system_instruction"] == "Be brief."


def test_results_need_a_place_outside_a_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    ckpt = save_checkpoint(tmp_path / "loose.ckpt", GPT(TINY))
    with pytest.raises(SystemExit):
        main([f"ckpt_path={ckpt}", "tasks=[llmtrain_definitions]"])
    assert "out_dir is not set and ckpt_path=" in capsys.readouterr().err


def test_lm_eval_stays_out_of_training():
    """Only the harness modules import lm_eval, and only the evaluate command and the training callback import them,
    the callback inside its methods: `python -m llmtrain` pays for lm_eval's imports only with eval.tasks
    (tests/test_imports.py checks that importing llmtrain.evaluate does not either)."""
    package = ROOT / "llmtrain"
    harness = {"llmtrain.interop.harness", "llmtrain.interop.harness_tasks", "llmtrain.interop.harness_sums"}

    def imported(nodes) -> set[str]:
        return {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n]) if (n.module if isinstance(
                    n, ast.ImportFrom) else a.name)}

    importers, at_top = {}, {}
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        importers[path.relative_to(package).as_posix()] = imported(ast.walk(tree))
        at_top[path.relative_to(package).as_posix()] = imported(tree.body)
    assert {p for p, names in importers.items() if any(n.split(".")[0] == "lm_eval" for n in names)} == {
        "interop/harness.py", "interop/harness_tasks.py", "interop/harness_sums.py"}
    outside = {p for p, names in importers.items() if names & harness and not p.startswith("interop/harness")}
    assert outside == {"evaluate.py", "training/evaluation.py"}
    assert not at_top["training/evaluation.py"] & harness  # imported when a run evaluates, not when training starts


def test_the_definitions_task_asks_about_held_out_headwords_with_four_distinct_choices_of_their_book():
    import gzip

    from llmtrain.assets.tasks.definitions import REQUEST, shorten
    from llmtrain.interop.harness_tasks import load_tasks

    (task,), _ = load_tasks(["llmtrain_definitions"])
    docs = list(task.test_docs())
    held_out = [json.loads(line) for line in gzip.open(ROOT / "llmtrain/assets/data/instruct_test.jsonl.gz", "rt")]
    assert len(docs) == len(held_out) == 314
    own = {REQUEST.fullmatch(r["instruction"]).group(1): shorten(r["output"]) for r in held_out}
    book_of = {shorten(r["output"]): r["instruction"].startswith("Define") for r in held_out}
    for doc in docs:
        assert len(set(doc["choices"])) == 4 and doc["choices"][doc["answer"]] == own[doc["term"]]
        assert {book_of[c] for c in doc["choices"]} == {doc["book"] == "devil"}  # the same book: no style cue
    assert all(sum(d["answer"] == i for d in docs) > 50 for i in range(4))  # chance is 25%
    corpus = [json.loads(line) for line in gzip.open(ROOT / "llmtrain/assets/data/entries.jsonl.gz", "rt")]
    pretrained = {(e["source"], e["term"]) for e in corpus}  # (the split goes by book and headword: jargon's "frog"
    assert not {(d["book"], d["term"]) for d in docs} & pretrained  # is pretrained on, the Devil's is held out)
