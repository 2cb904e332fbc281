"""The fine-tuning tables: records whose response truncation removes are dropped (or the split refused), and
data.max_length never exceeds the model's context."""

import json

import pytest
from conftest import make_datamodule

from llmtrain.data.sources import SPLITS
from llmtrain.errors import UserError


def write_records(path, n: int, long_every: int | None) -> str:
    """Instruction records; every long_every-th has an instruction that alone fills 256 byte tokens."""
    rows = [{"instruction": "a long question " * 40 if long_every and i % long_every == 0 else f"Add {i} and 1.",
             "input": "", "output": str(i + 1)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def make_instruct(path: str, **keys):
    return make_datamodule("instruct_embedded", source="json", path=path, tokenizer="bytes", **keys)


def test_records_left_without_a_response_token_are_dropped_and_counted(tmp_path, capsys):
    dm = make_instruct(write_records(tmp_path / "some.jsonl", 60, long_every=3), context_length=512,
                       max_dropped_fraction=0.5)  # a third of each split: allowed
    dm.setup()
    out = capsys.readouterr().out
    for s in SPLITS:
        lost = sum(len(r["instruction"]) >= 100 for r in dm.records[s])
        line = (f"data: {lost} of {len(dm.records[s])} {s} records lose their whole response to truncation at "
                f"data.max_length=256 and are left out (raise data.max_length to keep them)")
        assert (line in out) == (lost > 0), out  # the validation and test sets do not shrink unseen
    assert dm.max_length == 256  # the preset's
    for s in SPLITS:
        kept = [r for r in dm.records[s] if len(r["instruction"]) < 100]
        assert len(dm.sets[s]) == len(kept)
        assert all(any(t != -100 for t in labels) for _, labels in dm.sets[s].items)
    assert len(dm.sets["train"]) < len(dm.records["train"])


def test_more_records_dropped_than_data_max_dropped_fraction_is_one_line_naming_the_split_and_the_count(tmp_path):
    path = write_records(tmp_path / "some.jsonl", 60, long_every=3)
    with pytest.raises(UserError) as e:
        make_instruct(path, context_length=512).setup()  # the preset's 0.1
    assert str(e.value) == ("15 of 48 train records (31%) lose their whole response to truncation at "
                            "data.max_length=256, more than data.max_dropped_fraction=0.1: raise data.max_length, or "
                            "data.max_dropped_fraction to train and evaluate without them")
    make_instruct(path, context_length=512, max_dropped_fraction=0.5).setup()  # the largest share (test: 3 of 6)


def test_a_split_left_without_any_response_token_is_refused(tmp_path):
    dm = make_instruct(write_records(tmp_path / "all.jsonl", 60, long_every=1), context_length=512)
    with pytest.raises(UserError, match="no train record keeps a response token after truncation to "
                                        "data.max_length=256: raise data.max_length"):
        dm.setup()


def test_max_length_is_capped_by_the_context_and_null_means_the_context(tmp_path):
    path = write_records(tmp_path / "r.jsonl", 30, long_every=None)
    assert make_instruct(path, context_length=512, max_length=1024).max_length == 512
    assert make_instruct(path, context_length=512, max_length=None).max_length == 512
    assert make_instruct(path, context_length=512, max_length=300).max_length == 300
    long = [{"instruction": f"Add {i} and 1.", "input": "", "output": "so " * 400} for i in range(30)]
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(r) for r in long))
    dm = make_instruct(str(tmp_path / "long.jsonl"), context_length=512, max_length=1024)
    dm.setup()
    assert max(len(ids) for ids, _ in dm.sets["train"].items) == 512
