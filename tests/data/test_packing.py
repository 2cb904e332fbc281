"""Packed instruction records: whole records per row, best fit; each attends only to itself with positions from 0, so
that the loss and the gradients of a packed batch equal those of the same records unpacked (fp32)."""

import random

import pytest
import torch
from conftest import make_datamodule

from llmtrain.data.packing import pack, packed_batch
from llmtrain.data.tables import pad_batch
from llmtrain.model.gpt import GPT, GPTConfig
from llmtrain.model.losses import IGNORE_INDEX
from llmtrain.stages.pretrain import lm_loss


def records(n: int, seed: int = 0, longest: int = 20) -> list[tuple[list[int], list[int]]]:
    """Instruction-shaped records: random ids, the first part of the targets masked as a prompt's are."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(2, longest)
        x = [rng.randrange(60) for _ in range(length)]
        masked = rng.randint(0, length - 1)
        out.append((x, [IGNORE_INDEX] * masked + [rng.randrange(60) for _ in range(length - masked)]))
    return out


def test_rows_hold_every_record_once_whole_and_within_the_capacity():
    items = records(200)
    rows = pack(items, capacity=32)
    flat = [r for row in rows for r in row]
    assert sorted(map(repr, flat)) == sorted(map(repr, items))  # each record once, none split
    assert all(sum(len(x) for x, _ in row) <= 32 for row in rows)
    lower = -(-sum(len(x) for x, _ in items) // 32)
    assert len(rows) <= lower + 3  # best fit decreasing: within a few rows of the fewest possible
    assert pack(items, 32) == rows  # the same records give the same rows
    assert [len(row) for row in pack([([1] * 5, [1] * 5), ([1] * 3, [1] * 3), ([1] * 2, [1] * 2)], 5)] == [1, 2]


def test_a_packed_batch_marks_records_and_padding():
    rows = [[([1, 2], [2, 3]), ([4], [5])], [([6, 7, 8], [7, 8, 9])]]
    batch = packed_batch(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 4], [6, 7, 8]]
    assert batch["segments"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["lengths"].tolist() == [3, 3]
    short = packed_batch([[([1], [2])], rows[1]], pad_id=0)
    assert short["segments"].tolist()[0] == [0, -1, -1] and short["labels"].tolist()[0] == [2, -100, -100]


CONFIGS = {
    "gpt2": dict(),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=1),
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, head_dim=12),
}


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("chunk", [None, 7])
def test_packed_loss_and_gradients_equal_unpacked(family, chunk):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=60, context_length=48, emb_dim=24, n_heads=2, n_layers=2, **CONFIGS[family]))
    items = records(12)
    sums = []
    for batch in (pad_batch([x for x, _ in items], 0, [y for _, y in items]), packed_batch(pack(items, 48), 0)):
        model.zero_grad()
        total, count = lm_loss(model, batch, chunk)
        total.backward()
        sums.append((total.detach(), count, [p.grad.clone() for p in model.parameters()]))
    (unpacked, n1, g1), (packed, n2, g2) = sums
    assert packed_batch(pack(items, 48), 0)["input_ids"].shape[0] < len(items)  # it did pack
    assert n1 == n2
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_instruct_data_packs_when_asked(tmp_path):
    args = dict(tokenizer="gpt2", context_length=256, max_length=128, max_train_samples=40, batch_size=4)
    plain, packed = make_datamodule("instruct_embedded", **args), make_datamodule("instruct_embedded", packing=True,
                                                                                  **args)
    for dm in (plain, packed):
        dm.setup()
    assert len(packed.sets["train"]) < len(plain.sets["train"]) == 40
    assert sorted(map(repr, (r for row in packed.sets["train"].items for r in row))) == sorted(
        map(repr, plain.sets["train"].items))
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 256 and batch["segments"].max() >= 1
    assert "segments" not in next(iter(plain.train_dataloader()))
