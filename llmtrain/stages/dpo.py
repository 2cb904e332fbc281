"""Direct Preference Optimization (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model"): the loss, its implicit rewards and the reference model. Torch only.

A batch of B preference pairs holds 2B sequences (data/preferences.py): rows [0, B) are prompt + chosen response,
rows [B, 2B) the same prompts + rejected response, with labels IGNORE_INDEX on the prompt and the padding. The
log-probability of a response, log π(y|x), is the sum over its tokens (the sequence likelihood of eq. 7, not a
mean). The loss of a pair is eq. 7 of the paper,

    -log σ(β · ((log π(c) − log π(r)) − (log π_ref(c) − log π_ref(r)))),

and β · (log π(y|x) − log π_ref(y|x)) is the implicit reward of a response (section 5), which DPO raises for the
chosen response above the rejected one. β (finetune.beta) sets how far the policy may move from the reference.

The reference π_ref is the policy's starting weights, frozen: a copy of them (`frozen_copy`) or, for a LoRA policy,
the very same base with its adapters switched off (peft's `disable_adapter()`), so that no second copy is held in
memory. Its log-probabilities are computed for each batch under no_grad and in eval mode: no dropout, so no random
numbers are drawn and an exact resume stays exact.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.model.losses import IGNORE_INDEX

# what each pair contributes to the logs; `loss` carries the gradient, the rest are detached
PAIR_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
              "logps/rejected")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (N, T, V), labels (N, T) -> (N,) the summed log-probability of each sequence's labelled tokens, fp32."""
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none")  # 0 where the label is IGNORE_INDEX
    return token_logps.view(labels.shape).sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probabilities, each (B,) -> (loss per pair, chosen reward, rejected reward), each (B,).

    The rewards are detached: they are what the logs show, the loss is what trains."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` that never trains: no gradients (tied weights stay tied within the copy). Its train/eval
    mode is left as the model's: DPOLoss runs it in eval mode whatever that is."""
    return copy.deepcopy(model).requires_grad_(False)


def reference_for(policy: nn.Module) -> nn.Module | None:
    """The reference a policy is compared with: None for a peft model (its base with the adapters disabled is the
    reference, nothing to copy), else a frozen copy of its weights as they are now, before training."""
    return None if hasattr(policy, "disable_adapter") else frozen_copy(policy)


@contextmanager
def evaluating(module: nn.Module):
    """`module` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class DPOLoss(nn.Module):
    """The DPO loss of a policy on a batch of pairs, with its reference model.

    A frozen copy is a submodule, so that it follows the policy's device and precision; the LightningModule leaves
    it out of checkpoints (it is init_from's weights, which the recipe loads again on resume).
    """

    def __init__(self, beta: float, reference: nn.Module | None) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = beta
        self.reference = reference

    @torch.no_grad()
    def reference_logps(self, policy: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(2B,) summed response log-probabilities under the reference: the frozen copy, or the policy's base with
        its adapters disabled."""
        if self.reference is not None:
            model, adapters_off = self.reference, nullcontext()
        elif hasattr(policy, "disable_adapter"):
            model, adapters_off = policy, policy.disable_adapter()
        else:
            raise ValueError("DPOLoss without a reference model needs a peft policy (its base is the reference)")
        with evaluating(model), adapters_off:
            return sequence_logps(model(input_ids), labels)

    def forward(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The PAIR_STATS of each pair of the batch (input_ids and labels (2B, T): chosen rows, then rejected)."""
        logps = sequence_logps(policy(batch["input_ids"]), batch["labels"])  # (2B,)
        reference = self.reference_logps(policy, batch["input_ids"], batch["labels"])
        (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), reference.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return {"loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                "rewards/margin": chosen_rewards - rejected_rewards,
                "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),  # a tie (step 0: all 0) counts 0
                "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
