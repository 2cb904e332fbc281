"""Every row of docs/errors.md, run through the real command line: the exact message and exit status."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

ROW = re.compile(r"^\| (\w+) \| `([^`]*)` \| (\d+) \| `(.*)` \|$")
ROWS = [m.groups() for line in (ROOT / "docs" / "errors.md").read_text().splitlines() if (m := ROW.match(line))]


def test_the_catalogue_has_at_least_twenty_rows():
    assert len(ROWS) >= 20


@pytest.fixture
def files(tmp_path) -> Path:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("A few words.")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n\nd\xe9j\xe0 vu\n")
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(20)))
    (tmp_path / "broken.jsonl").write_text('{"body": 1\n')
    other = {"vocab_size": 50257, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 2,
             "drop_rate": 0.0, "qkv_bias": False, "tie_weights": False}
    torch.save({"state_dict": {"model.tok_emb.weight": torch.zeros(2, 2)}, "llmtrain": {"model_config": other}},
               tmp_path / "other.ckpt")
    pretrain = other | {"n_layers": 4, "tie_weights": True}  # conf/model/gpt_tiny.yaml
    torch.save({"state_dict": {}, "llmtrain": {"model_config": pretrain, "stage": "pretrain", "task": "lm"}},
               tmp_path / "pretrain.ckpt")
    data = (tmp_path / "other.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "outputs" / "earlier").mkdir(parents=True)
    (tmp_path / "outputs" / "earlier" / "keep.txt").write_text("mine")
    return tmp_path


@pytest.mark.parametrize("kind,args,status,message", ROWS, ids=[r[1] for r in ROWS])
def test_documented_error(files, kind, args, status, message):
    result = run_cli(args.format(tmp=files).split(), cwd=files)
    assert result.returncode == int(status), result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == message.format(tmp=files)
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (files / "outputs").rglob("*")) == ["earlier", "keep.txt"]
