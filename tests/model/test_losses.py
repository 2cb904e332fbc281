"""The losses: the chunked LM head + cross-entropy equals the plain one, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmtrain.model.losses import IGNORE_INDEX, chunked_lm_loss_sum, last_token_logits, lm_loss_sum


def inputs(B=3, T=7, C=16, V=101, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    weight = (torch.randn(V, C, generator=g) * 0.3).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    if masked:
        labels[0, :3] = IGNORE_INDEX  # a masked prompt
        labels[2, -2:] = IGNORE_INDEX  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 5, 21, 64])  # 21 = all tokens at once, 5 does not divide 21
def test_chunked_loss_equals_the_plain_one_with_its_gradients(chunk):
    hidden, weight, labels = inputs()
    plain, n = lm_loss_sum(hidden @ weight.t(), labels)
    plain.backward()
    expected = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    chunked, n2 = chunked_lm_loss_sum(hidden, weight, labels, chunk)
    (chunked * 1.0).backward()
    assert n2 == n == 16
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, expected[1], atol=1e-5, rtol=1e-5)


def test_the_incoming_gradient_scales_both_gradients_and_a_tied_weight_accumulates():
    """A scaled loss (gradient accumulation divides it) scales the gradients; a weight also used as the
    embedding (GPT-2's tied head) gets both contributions."""
    hidden, weight, labels = inputs(masked=False)
    ids = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(1))

    def step(loss_fn):
        weight.grad = None
        h = hidden.detach() + F.embedding(ids, weight)  # the embedding use of the same weight
        loss_fn(h) .mul(0.25).backward()
        return weight.grad.clone()

    plain = step(lambda h: lm_loss_sum(h @ weight.t(), labels)[0])
    chunked = step(lambda h: chunked_lm_loss_sum(h, weight, labels, 4)[0])
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, labels = inputs()
    with torch.no_grad():
        chunked, _ = chunked_lm_loss_sum(hidden, weight, labels, 4)
        plain, _ = lm_loss_sum(hidden @ weight.t(), labels)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    assert not chunked.requires_grad


def test_bf16_autocast_stays_close_to_fp32():
    hidden, weight, labels = inputs(C=64, V=300)
    plain, _ = lm_loss_sum(hidden @ weight.t(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, _ = chunked_lm_loss_sum(hidden, weight, labels, 8)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=2e-2, atol=0)


def test_last_token_logits_reads_each_sequence_at_its_last_real_token():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    out = last_token_logits(logits, torch.tensor([2, 4]))
    assert torch.equal(out, torch.stack([logits[0, 1], logits[1, 3]]))


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_chunked_gradients_when_one_input_is_frozen(frozen):
    """A LoRA run's head is frozen (its weight takes no gradient) while the hidden states must get theirs, so that
    the adapters below train; and the other way round. Each gradient that is asked for equals the plain path's."""
    hidden, weight, labels = inputs()
    (weight if frozen == "weight" else hidden).requires_grad_(False)
    plain, _ = lm_loss_sum(hidden @ weight.t(), labels)
    trained = hidden if frozen == "weight" else weight
    expected = torch.autograd.grad(plain, trained)[0]
    chunked, _ = chunked_lm_loss_sum(hidden, weight, labels, 5)
    got = torch.autograd.grad(chunked, trained)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert got.abs().sum() > 0


class _Ops(TorchDispatchMode):
    """Records, below autocast, every conversion to another dtype (aten::_to_copy, or copy_ between dtypes) as
    (shape, to dtype), and the shapes of every matmul."""

    def __init__(self):
        super().__init__()
        self.casts, self.matmuls = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") not in (None, args[0].dtype):
            self.casts.append((tuple(args[0].shape), kwargs["dtype"]))
        if func is torch.ops.aten.copy_.default and args[0].dtype != args[1].dtype:
            self.casts.append((tuple(args[1].shape), args[0].dtype))
        if func is torch.ops.aten.mm.default:
            self.matmuls.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **kwargs)


def test_under_bf16_autocast_the_weight_is_cast_once_and_each_chunks_logit_gradient_once():
    """The head's weight is the step's largest cast (50,257 x width): once per step, not once per chunk and matmul;
    each chunk's (n, V) gradient of the logits goes to bf16 once for the two matmuls that read it. Every matmul
    sees the vocabulary padded to a multiple of 64 (300 -> 320), the loss and gradients staying those of 300."""
    V, C, N, chunk = 300, 16, 24, 8
    hidden, weight, labels = inputs(B=1, T=N, C=C, V=V, masked=False)
    with _Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_lm_loss_sum(hidden, weight, labels, chunk)
    to_bf16 = [shape for shape, dst in ops.casts if dst == torch.bfloat16]
    assert sorted(s for s in to_bf16 if V in s or 320 in s) == [(chunk, 320)] * (N // chunk) + [(V, C)]
    assert len(ops.matmuls) == 3 * N // chunk and all(320 in a + b and V not in a + b for a, b in ops.matmuls)
    loss.backward()
    assert weight.grad.shape == (V, C) and weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
