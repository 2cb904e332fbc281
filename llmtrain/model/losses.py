"""The losses of the stages, outside the model: next-token cross-entropy summed over the tokens that carry
loss, and a classifier's logits read at the last real token of each sequence. Torch only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a label that carries no loss: masked prompts, padding (F.cross_entropy's default)
PAD = 64  # the chunked loss pads the vocabulary to a multiple of this for its matmuls


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), labels (B, T) -> (summed cross-entropy over labelled tokens, their count), in fp32."""
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()


def last_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """logits (B, T, C) of right-padded sequences -> (B, C) at each one's last real token, which has seen the
    whole text and no padding."""
    return logits[torch.arange(logits.size(0), device=logits.device), lengths - 1].float()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of (hidden @ weight.T) against labels, computed `chunk` tokens at a time, so that
    the (N, V) logits and their gradient never exist at once: for a 50,257-token vocabulary they are the
    largest tensors of a small model's step.

    The gradients are computed in the forward pass, chunk by chunk, from each chunk's softmax (what the plain
    path's backward computes from the stored logits): d loss / d logits = softmax - onehot. The backward pass
    scales them by the incoming gradient. The same three matmuls as the plain path, none recomputed.

    Under autocast the matmuls run in its dtype (bf16): the weight, the hidden states and each chunk's gradient
    of the logits are cast once, not once per matmul that reads them (autocast would cast the logits' gradient
    twice). The softmax is one exp per logit, in place. The matmuls see the vocabulary padded to a multiple of
    64 with zero rows whose logits are set to -inf (no probability, no gradient): GPT-2's 50,257 rows make CPU
    matmul kernels take a slow path (nanoGPT pads its vocabulary to 50,304 for the same reason).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # hidden (N, C), weight (V, C), labels (N,)
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        V = weight.size(0)
        h_all = hidden.to(dtype)  # what the matmuls read: (N, C) and the weight padded to (V_pad, C)
        w = torch.empty(-(-V // PAD) * PAD, weight.size(1), dtype=dtype, device=weight.device)
        w[:V].copy_(weight)
        w[V:].zero_()
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = None  # (V, C) in fp32, summed over the chunks
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            h, y = h_all[start : start + chunk], labels[start : start + chunk]  # (n, C), (n,)
            logits = (h @ w.t()).float()  # (n, V_pad)
            logits[:, V:] = float("-inf")
            valid = y != IGNORE_INDEX
            target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]  # (n,)
            peak = logits.amax(dim=-1)  # (n,)
            probs = logits.sub_(peak[:, None]).exp_()  # unnormalised, in place of the logits
            norm = probs.sum(dim=-1)  # (n,)
            total += torch.where(valid, peak + norm.log() - target, 0.0).sum()  # log-sum-exp minus the target
            if needs_hidden or needs_weight:
                # the softmax, with no gradient from unlabelled rows, minus the one-hot target: without nonzero()
                # or boolean indexing, which would wait for the device to learn how many rows there are
                probs.mul_((valid / norm)[:, None])
                probs.scatter_add_(1, y.clamp(min=0)[:, None], -valid[:, None].to(probs.dtype))
                dlogits = probs.to(dtype)
                if needs_hidden:
                    grad_hidden[start : start + chunk] = dlogits @ w
                if needs_weight:
                    part = dlogits.t() @ h  # (V_pad, C)
                    grad_weight = part.float() if grad_weight is None else grad_weight.add_(part)
        ctx.save_for_backward(grad_hidden, grad_weight[:V] if grad_weight is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total if grad_hidden is not None else None,
                (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None, None, None)


def chunked_lm_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As lm_loss_sum of (hidden @ weight.T), without the full logits: hidden (B, T, C), weight (V, C)."""
    loss_sum = ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), weight, labels.flatten(), chunk)
    return loss_sum, (labels != IGNORE_INDEX).sum()
