"""Hugging Face folders on disk: sharded weights, llmtrain.json against config.json, the tokenizer it records, and
folders written whole (what a killed writer leaves is cleaned up)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from llmtrain.data.tokenizer_json import tokenizer_json
from llmtrain.errors import UserError
from llmtrain.interop.folders import INDEX, read_labels, read_safetensors, record_text, write_folder
from llmtrain.interop.hf import export_hf
from llmtrain.interop.pretrained import load_pretrained
from llmtrain.model.gpt import GPT, GPTConfig

TINY = dict(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)


def sharded(path, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """A save_pretrained-style sharded folder: shard file -> its tensors, and the index that maps names to shards."""
    path.mkdir()
    for shard, part in tensors.items():
        save_file(part, path / shard, metadata={"format": "pt"})
    weight_map = {name: shard for shard, part in tensors.items() for name in part}
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_every_shard_that_the_index_names_is_read(tmp_path):
    a, b = torch.arange(4.0), torch.ones(2, 3)
    sharded(tmp_path / "hf", {"model-00001-of-00002.safetensors": {"a": a},
                              "model-00002-of-00002.safetensors": {"b": b}})
    tensors = read_safetensors(tmp_path / "hf", "init_from=hf")
    assert sorted(tensors) == ["a", "b"] and torch.equal(tensors["a"], a) and torch.equal(tensors["b"], b)


def test_a_missing_shard_is_named_in_one_line(tmp_path):
    sharded(tmp_path / "hf", {"model-00001-of-00002.safetensors": {"a": torch.zeros(1)},
                              "model-00002-of-00002.safetensors": {"b": torch.zeros(1)}})
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match=r"^init_from=hf: the shard model-00002-of-00002\.safetensors named in "
                                        r"model\.safetensors\.index\.json is missing$"):
        read_safetensors(tmp_path / "hf", "init_from=hf")


@pytest.mark.parametrize("index", ['{"metadata": {}}', '{"weight_map": ["a"]}', '[1]', '{"weight_map": {"a": 1}}',
                                   '{"weight_map": {"a": "model-0'])
def test_an_index_without_a_weight_map_of_shard_names_is_one_line_naming_it(tmp_path, index):
    sharded(tmp_path / "hf", {"model-00001-of-00001.safetensors": {"a": torch.zeros(1)}})
    (tmp_path / "hf" / INDEX).write_text(index)
    with pytest.raises(UserError, match=f"init_from=hf: {tmp_path / 'hf' / INDEX} (has no \"weight_map\"|is not "
                                        "readable JSON)") as info:
        read_safetensors(tmp_path / "hf", "init_from=hf")
    assert "\n" not in str(info.value)


def test_id2label_gives_the_class_names_in_class_order_and_other_keys_are_one_line():
    assert read_labels({"id2label": {"1": "spam", "0": "ham"}}, "x") == ["ham", "spam"]
    assert read_labels({"id2label": {str(i): str(i) for i in range(12)}}, "x") == [str(i) for i in range(12)]
    assert read_labels({"num_labels": 3}, "x") == ["LABEL_0", "LABEL_1", "LABEL_2"]
    for id2label in ({"ham": 0, "spam": 1}, {"0": "a", "2": "b"}, {"1": "a"}, ["a", "b"], {"00": "a"}):
        with pytest.raises(UserError, match="^init_from=hf: config.json's id2label has keys .*, not the class "
                                            "numbers 0 to 1: key it by class number"):
            read_labels({"id2label": id2label}, "init_from=hf")


def test_llmtrain_json_and_config_json_must_agree_on_the_classes(tmp_path):
    """A classifier's export whose config.json was replaced by a language model's: its llmtrain.json does not win."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    model.replace_head(3)
    out = export_hf(model, tmp_path / "hf", {"tokenizer": "bytes", "num_classes": 3, "label_names": ["a", "b", "c"]})
    config = json.loads((out / "config.json").read_text())
    for key in ("id2label", "label2id", "pad_token_id"):
        config.pop(key)
    (out / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match=r"llmtrain\.json and config\.json disagree \(classes 3 vs None\): restore"):
        load_pretrained(str(out))


def test_llmtrain_json_names_the_tokenizer_copy_in_the_folder(tmp_path):
    """A tokenizer.json is copied into the export: the record names the copy, so that the folder can move."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "my-tokenizer.json").write_text(tokenizer_json("bytes"))
    model = GPT(GPTConfig(**TINY))
    record = json.loads(record_text(model, {"stage": "pretrain"}, str(tmp_path / "data" / "my-tokenizer.json"), None))
    assert record["tokenizer"] == "tokenizer.json"
    assert json.loads(record_text(model, {}, "bytes", None))["tokenizer"] == "bytes"  # a built-in one by its name


def test_what_killed_writers_left_is_removed(tmp_path):
    """A writer killed writing a new folder leaves .hf.llmtrain-tmp-* beside it; one killed writing into an existing
    folder leaves .llmtrain-tmp-* inside it. The next write removes both, and nothing of another folder's."""
    (tmp_path / ".hf.llmtrain-tmp-1" / "x").mkdir(parents=True)
    (tmp_path / ".other.llmtrain-tmp-3").mkdir()  # another folder's: not ours to remove
    out = write_folder(tmp_path / "hf", lambda tmp: (tmp / "a.txt").write_text("new"), lambda p: True, "llmtrain")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.llmtrain-tmp-3", "hf"]
    (out / ".llmtrain-tmp-2").mkdir()
    write_folder(out, lambda tmp: (tmp / "a.txt").write_text("newer"), lambda p: True, "llmtrain")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"] and (out / "a.txt").read_text() == "newer"


def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path):
    save_file({"w": torch.zeros(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])  # a copy or a download cut short
    with pytest.raises(UserError, match=rf"^init_from=x: {tmp_path / 'model.safetensors'} cannot be read: it is "
                                        r"truncated or not safetensors \(SafetensorError: .*\); write it again"):
        read_safetensors(tmp_path, "init_from=x")


def test_a_full_disk_while_exporting_is_one_line_naming_the_folder_and_the_previous_export_stays(tmp_path):
    import errno

    out = export_hf(GPT(GPTConfig(**TINY)), str(tmp_path / "hf"), {"tokenizer": "bytes"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=f"^could not write {out}: No space left on device; the previous file"):
        write_folder(out, full_disk, lambda folder: True, "llmtrain")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
