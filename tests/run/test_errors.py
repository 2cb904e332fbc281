"""Every row of docs/errors.md, run through the real command line: the exact message and exit status; and
errors.one_line_errors, which turns a UserError into that one line."""

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, subprocess_env

from llmtrain.errors import UserError, one_line_errors
from llmtrain.interop.gpt2 import CLASSIFIER

ROW = re.compile(r"^\| (\w+) \| `([^`]*)` \| (\d+) \| `(.*)` \|$")
ROWS = [m.groups() for line in (ROOT / "docs" / "errors.md").read_text().splitlines() if (m := ROW.match(line))]


def test_the_catalogue_has_at_least_twenty_rows():
    assert len(ROWS) >= 20


def make_files(tmp_path: Path) -> Path:
    """The files the table's rows name, and an earlier run's output that no row may touch."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("A few words.")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n\nd\xe9j\xe0 vu\n")
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(20)))
    (tmp_path / "broken.jsonl").write_text('{"body": 1\n')
    (tmp_path / "nulls.jsonl").write_text('{"text": "A few words."}\n{"text": null}\n')
    other = {"vocab_size": 50257, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 2,
             "drop_rate": 0.0, "qkv_bias": False, "tie_weights": True}
    torch.save({"state_dict": {"model.tok_emb.weight": torch.zeros(2, 2)}, "llmtrain": {"model_config": other}},
               tmp_path / "other.ckpt")
    pretrain = other | {"n_layers": 4, "tie_weights": False}  # conf/model/gpt_tiny_untied.yaml, the default
    torch.save({"state_dict": {}, "llmtrain": {"model_config": pretrain, "stage": "pretrain",
                                               "tokenizer": "gpt2"}},
               tmp_path / "pretrain.ckpt")
    (tmp_path / "llama").mkdir()  # what init_from= reads first of a Hugging Face folder: its config.json
    (tmp_path / "llama" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": 257, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}))
    llama = json.loads((tmp_path / "llama" / "config.json").read_text())
    for name, change in (("mistral", {"model_type": "mistral"}), ("phi3", {"model_type": "phi3"}),
                         ("yarn", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(llama | change))
    dpo = {"model_config": pretrain, "stage": "dpo", "tokenizer": "gpt2", "init_from": "runs/instruct"}
    torch.save({"state_dict": {}, "llmtrain": dpo}, tmp_path / "dpo.ckpt")
    pairs = [{"prompt": f"q{i}", "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no"}]} for i in range(20)]
    pairs[5]["chosen"].append({"role": "user", "content": "and?"})  # the answer is not the last message
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    for name, bad in (("role", {"messages": [user, {"role": "bot", "content": "a"}]}),
                      ("empty", {"messages": [user, {"role": "assistant", "content": ""}]}),
                      ("unanswered", {"conversations": [{"from": "system", "value": "s"},
                                                        {"from": "human", "value": "q"}]}),
                      ("order", {"messages": [answer, user]})):  # row 5 of 20 answered conversations
        rows = [{"messages": [user, answer]}] * 5 + [bad] + [{"messages": [user, answer]}] * 14
        (tmp_path / f"chat_{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = (tmp_path / "other.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": 128,
            "n_embd": 32, "n_head": 2, "n_layer": 2}
    for name, files in (("badrecord", {"llmtrain.json": '{"format": "llmtrain", "model_con'}),
                        ("badindex", {"model.safetensors.index.json": '{"metadata": {}}'}),
                        ("labels", {"config.json": json.dumps(gpt2 | {"id2label": {"ham": 0, "spam": 1},
                                                                      "architectures": [CLASSIFIER]})})):
        (tmp_path / name).mkdir()  # Hugging Face GPT-2 folders, each with one file gone wrong
        for file, text in ({"config.json": json.dumps(gpt2)} | files).items():
            (tmp_path / name / file).write_text(text)
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(  # every other prompt fills data.max_length=256
        {"instruction": "a long question " * 40 if i % 2 else f"Add {i} and 1.", "output": str(i + 1)})
        for i in range(40)))
    (tmp_path / "emptytok").mkdir()
    (tmp_path / "emptytok" / "tokenizer.json").write_text(json.dumps(
        {"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    (tmp_path / "outputs" / "earlier").mkdir(parents=True)
    (tmp_path / "outputs" / "earlier" / "keep.txt").write_text("mine")
    (tmp_path / "job").mkdir()  # a SLURM job's folder, its log beside the run it asks for
    (tmp_path / "job" / "slurm-9.log").write_text("the log that holds the error")
    (tmp_path / "done" / ".hydra").mkdir(parents=True)  # another run, finished
    (tmp_path / "done" / ".hydra" / "config.yaml").write_text("seed: 1\n")
    return tmp_path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list:
    """Every row's command, each in its own folder with its own files, through the real entry point: two processes
    (the 2-core CI machine runs two at once), each running its half of the rows in turn (tests/run/error_rows.py).
    A fresh process per row spent four seconds a row starting up: most of the suite's budget."""
    folders = [make_files(tmp_path_factory.mktemp("row")) for _ in ROWS]
    work = tmp_path_factory.mktemp("rows")

    def run(part: int) -> list:
        mine = [[str(folders[i]), ROWS[i][1].replace("{tmp}", str(folders[i])).split()]
                for i in range(part, len(ROWS), 2)]
        (work / f"rows{part}.json").write_text(json.dumps(mine))
        runner = [sys.executable, str(ROOT / "tests" / "run" / "error_rows.py")]
        done = subprocess.run([*runner, str(work / f"rows{part}.json"), str(work / f"out{part}.json")],
                              env=subprocess_env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((work / f"out{part}.json").read_text())

    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(run, (0, 1)))
    return [(folders[i], SimpleNamespace(returncode=parts[i % 2][i // 2][0], stderr=parts[i % 2][i // 2][1]))
            for i in range(len(ROWS))]


@pytest.mark.slow  # one process per row
@pytest.mark.parametrize("i", range(len(ROWS)), ids=[r[1] for r in ROWS])
def test_documented_error(results, i):
    kind, args, status, message = ROWS[i]
    folder, result = results[i]
    assert result.returncode == int(status), result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == message.replace("{tmp}", str(folder))
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (folder / "outputs").rglob("*")) == ["earlier", "keep.txt"]
    assert [p.name for p in (folder / "job").rglob("*")] == ["slurm-9.log"]  # the folder as it was
    assert [p.name for p in (folder / "done").rglob("*")] == [".hydra", "config.yaml"]
    assert (folder / "done" / ".hydra" / "config.yaml").read_text() == "seed: 1\n"


def test_a_user_error_is_one_line_on_stderr_and_exit_status_2(capsys, monkeypatch):
    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        raise UserError("data.path='x.txt' matches no file")
    assert exit_info.value.code == 2
    assert capsys.readouterr() == ("", "error: data.path='x.txt' matches no file\n")


def test_a_bug_keeps_its_traceback_and_llmtrain_debug_keeps_a_user_errors(monkeypatch):
    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    with pytest.raises(KeyError), one_line_errors():
        raise KeyError("a bug")
    monkeypatch.setenv("LLMTRAIN_DEBUG", "1")
    with pytest.raises(UserError, match="a mistake"), one_line_errors():
        raise UserError("a mistake")
