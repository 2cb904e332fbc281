"""Weights identified by content (llmtrain/interop/digest.py): a file replaced behind the same name is seen, a touch
is not, and a file too large to read whole is sampled where any rewrite shows."""

import os

import pytest
import torch
from conftest import write_checkpoint

from llmtrain.interop import digest
from llmtrain.interop.digest import changed_weights, weights_digest
from llmtrain.interop.hf import export_hf
from llmtrain.interop.pretrained import load_pretrained


def test_a_checkpoint_or_folder_replaced_behind_the_same_name_has_another_digest_and_a_touch_keeps_it(tmp_path):
    ckpt = write_checkpoint(tmp_path / "base.ckpt")
    first = weights_digest(str(ckpt))
    assert first.startswith("sha256:") and weights_digest(str(ckpt)) == first
    os.utime(ckpt, (1, 1))  # read again, copied, restored from a backup: the same bytes
    assert changed_weights(str(ckpt), first) is None
    torch.manual_seed(1)
    write_checkpoint(ckpt)  # another model of the same shapes, under the same name
    assert changed_weights(str(ckpt), first) == weights_digest(str(ckpt)) != first
    assert changed_weights(None, first) is None and changed_weights(str(ckpt), None) is None  # nothing to compare
    hf = export_hf(load_pretrained(str(ckpt))[0], str(tmp_path / "hf"), {"tokenizer": "bytes"})
    before = weights_digest(str(hf))
    assert weights_digest(str(tmp_path)) == before  # a run dir without last.ckpt: its export hf/, the same files
    data = bytearray((hf / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    (hf / "model.safetensors").write_bytes(bytes(data))
    assert weights_digest(str(hf)) != before


def test_a_large_file_is_sampled_at_evenly_spaced_offsets_and_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(digest, "CHUNK", 4)  # 32 samples of 4 bytes: a file over 128 bytes is sampled
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(1000))
    base = digest.sampled(f)
    assert len(base) == len(f"w.bin\0{1000}\0") + 33 * 4
    for offset, seen in ((0, True), (1000 * 5 // 32, True), (996, True), (10, False)):
        data = bytearray(1000)
        data[offset] = 1
        f.write_bytes(bytes(data))
        assert (digest.sampled(f) != base) == seen, offset
    f.write_bytes(bytes(1001))
    assert digest.sampled(f) != base  # the size is part of it


@pytest.mark.parametrize("size", [10, 128])
def test_a_small_file_is_read_whole(tmp_path, monkeypatch, size):
    monkeypatch.setattr(digest, "CHUNK", 4)
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(size)))
    assert digest.sampled(f) == f"w.bin\0{size}\0".encode() + bytes(range(size))
