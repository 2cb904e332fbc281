"""Direct Preference Optimization (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model"): the stage, its loss, the implicit rewards and the reference model.

A batch of B preference pairs holds 2B sequences (data/preferences.py): rows [0, B) are prompt + chosen response,
rows [B, 2B) the same prompts + rejected response, with labels IGNORE_INDEX on the prompt and the padding (the
prompt in the instruct template, or a conversation in a chat template whose final assistant turn is the response). The
log-probability of a response, log π(y|x), is the sum over its tokens (the sequence likelihood of eq. 7, not a
mean). The loss of a pair is eq. 7 of the paper,

    -log σ(β · ((log π(c) − log π(r)) − (log π_ref(c) − log π_ref(r)))),

and β · (log π(y|x) − log π_ref(y|x)) is the implicit reward of a response (section 5), which DPO raises for the
chosen response above the rejected one. β (finetune.beta) sets how far the policy may move from the reference.

The reference π_ref is the policy's starting weights, frozen: a copy of them (`frozen_copy`) or, for a LoRA policy,
the very same base with its adapters switched off (peft's `disable_adapter()`), so that no second copy is held in
memory. It lives in the stage (a submodule of the LightningModule, kept out of its checkpoints: it is init_from's
weights, loaded again on resume). Its log-probabilities are computed for each batch under no_grad and in eval
mode: no dropout, so no random numbers are drawn and an exact resume stays exact.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.data.prompts import format_prompt
from llmtrain.model.gpt import GPT
from llmtrain.model.losses import IGNORE_INDEX
from llmtrain.stages.base import Stage, evaluating

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
    mode is left as the model's: the DPO stage runs it in eval mode whatever that is."""
    return copy.deepcopy(model).requires_grad_(False)


def reference_for(policy: nn.Module) -> nn.Module | None:
    """The reference a policy is compared with: None for a peft model (its base with the adapters disabled is the
    reference, nothing to copy), else a frozen copy of its weights as they are now, before training."""
    return None if hasattr(policy, "disable_adapter") else frozen_copy(policy)


class DPO(Stage):
    """The DPO loss of the policy against its frozen reference on batches of pairs; rewards and log-probabilities
    logged. The loss is averaged over every pair of the optimizer step (as the language-modelling stages average
    over tokens)."""

    name = "dpo"
    data_module = "PreferenceDataModule"
    data_presets = "data=preference_embedded or data=truthy_dpo"
    prompt_template = "alpaca"
    metrics = PAIR_STATS
    compared = ("loss", "rewards/accuracy", "rewards/margin")
    progress_metric = "rewards/accuracy"
    sequences_per_item = 2  # a chosen and a rejected sequence per pair

    def __init__(self, train_blocks: str | int, lora: dict | None, beta: float, num_samples: int,
                 sample_tokens: int) -> None:
        super().__init__(train_blocks, lora, sample_tokens=sample_tokens)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"finetune.beta must be positive (how far the policy may move from the reference; 0.1 "
                             f"is usual), got {beta}")
        self.beta, self.num_samples = float(beta), num_samples
        self.reference: nn.Module | None = None
        self.chat_template: str | None = None  # the Jinja source conversation records were rendered with (setup)
        self.end_of_turn: int | None = None

    def setup(self, datamodule) -> None:
        if datamodule.conversational:  # no samples: they are written in the instruct template
            template = datamodule.template
            self.chat_template, self.end_of_turn = template.source, template.end_of_turn()
            return
        self.sample_prompts = [format_prompt(r["prompt"], template=self.prompt_template)
                               for r in datamodule.records["val"][: self.num_samples]]

    def record(self) -> dict:
        """A DPO run on conversations records its chat template and end-of-turn id as a chat run does (exports,
        python -m llmtrain.chat); one on text its prompt template."""
        if self.chat_template is None:
            return super().record()
        return super().record() | {"prompt_template": None, "chat_template": self.chat_template,
                                   "end_of_turn": self.end_of_turn}

    def build_model(self, gpt: GPT) -> nn.Module:
        policy = super().build_model(gpt)
        self.reference = reference_for(policy)  # the starting weights, before any step
        return policy

    @torch.no_grad()
    def reference_logps(self, policy: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(2B,) summed response log-probabilities under the reference: the frozen copy, or the policy's base with
        its adapters disabled."""
        if self.reference is not None:
            model, adapters_off = self.reference, nullcontext()
        elif hasattr(policy, "disable_adapter"):
            model, adapters_off = policy, policy.disable_adapter()
        else:
            raise ValueError("DPO without a reference model needs a peft policy (its base is the reference)")
        with evaluating(model), adapters_off:
            return sequence_logps(model(input_ids), labels)

    def pair_stats(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The PAIR_STATS of each pair of the batch (input_ids and labels (2B, T): chosen rows, then rejected)."""
        logps = sequence_logps(policy(batch["input_ids"]), batch["labels"])  # (2B,)
        reference = self.reference_logps(policy, batch["input_ids"], batch["labels"])
        (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), reference.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return {"loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                "rewards/margin": chosen_rewards - rejected_rewards,
                "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),  # a tie (step 0: all 0) counts 0
                "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        stats = self.pair_stats(model, batch)
        pairs = torch.tensor(stats["loss"].numel(), device=stats["loss"].device)
        return stats["loss"].sum(), pairs, {name: stats[name].mean() for name in PAIR_STATS[1:]}

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stats = self.pair_stats(model, batch)
        sums = {name: value.sum().double() for name, value in stats.items()}
        return sums | {"count": torch.tensor(stats["loss"].numel(), device=stats["loss"].device, dtype=torch.float64)}

    def eval_metrics(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: (totals[name] / totals["count"].clamp(min=1)).float() for name in PAIR_STATS}

    def summary(self, metrics: dict[str, float], datamodule) -> str:
        return (f"val/loss {metrics['val/loss']:.4f}, val/rewards/accuracy {metrics['val/rewards/accuracy']:.4f}, "
                f"val/rewards/margin {metrics['val/rewards/margin']:.4f}")

    def resume_problems(self, saved: dict, init_from: str | None, ckpt_path: str) -> list[str]:
        if saved.get("init_from") == init_from:
            return []
        return [f"ckpt_path={ckpt_path} was trained against the reference init_from={saved.get('init_from')}, this "
                f"run has init_from={init_from}: resume with init_from={saved.get('init_from')} (DPO's reference is "
                f"the starting weights)"]
