"""llmtrain's GPT as a model of EleutherAI's lm-evaluation-harness (`lm_eval`): the three kinds of request its tasks
make, answered as its own Hugging Face backend (`lm_eval.models.huggingface.HFLM`) answers them, so that a score
equals `lm_eval --model hf` on the same weights (tests/interop/test_harness.py holds them to 1e-4).

- loglikelihood: (context, continuation) -> (log p(continuation | context), whether greedy decoding gives it).
  Batched, longest first, right-padded (a causal model never looks at the padding after a row); a pair longer than
  the context window loses tokens from the left of the context. Only the continuation's positions go through the
  head, so a batch never holds logits for every position of a 50k-token vocabulary.
- loglikelihood_rolling: a whole text's log-likelihood (perplexity tasks) in windows of context_length tokens
  (lm_eval.utils.get_rolling_token_windows): the first conditioned on the prefix token, each later one on as much
  of the text before it as fits, every token predicted once.
- generate_until: greedy decoding with the KV cache, one request at a time, stopped at the first stop string or
  the end-of-text id; the context keeps its last context_length - max_gen_toks tokens.

Text is encoded as llmtrain trains on it: a BOS first where the tokenizer starts every text with one (Llama's, as
Hugging Face's tokenizer does for HFLM), special tokens written in the text read as such (as Hugging Face's tokenizers
read them). An empty context is the tokenizer's BOS if it has one, else its end-of-text id
(HFLM's rule). Only evaluation imports this module: training never loads lm_eval.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmtrain.data.tokenizer import continuation_text, with_bos
from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT, KVCache

Pair = tuple[tuple[str, str] | None, list[int], list[int]]  # (the request's strings, context ids, continuation ids)


class GPTHarnessLM(TemplateLM):
    """An lm_eval model over a GPT in memory and its tokenizer (anything llmtrain.data.tokenizer builds)."""

    def __init__(self, model: GPT, tokenizer, batch_size: int = 16, max_gen_toks: int = 256,
                 name: str = "llmtrain", template=None) -> None:
        super().__init__()
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.template = template  # a data.chat_template.ChatTemplate: what apply_chat_template renders with
        self._max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_token

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token", None)
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self.model.config.context_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", "tokenizer")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template.source if chat_template and self.template is not None else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """A request as a conversation (lm_eval builds the turns: system, few-shot examples, the question), rendered
        as the model was trained on it; the answer continues after the assistant's header."""
        if self.template is None:
            raise UserError("this model was given no chat template to render requests with")
        return self.template.render(chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, allowed_special="all")
        return ids if add_special_tokens is False else with_bos(self.tokenizer, ids)  # HFLM: the tokenizer's own

    # --- scoring ----------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[Pair], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        with _evaluating(self.model):
            for chunk in order.get_batched(n=self.batch_size):
                results += self._score_batch(chunk)
        return order.get_original(results)

    @torch.no_grad()
    def _score_batch(self, chunk: list[Pair]) -> list[tuple[float, bool]]:
        # the window a pair is read in: its last max_length + 1 tokens, less the last one (predicted, not read)
        rows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in chunk]
        batch = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # (B, T), right-padded
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
        hidden = self.model.hidden(batch.to(self._device))  # (B, T, C)
        lengths = [len(continuation) for _, _, continuation in chunk]
        if max(lengths) > self.max_length:
            raise UserError(f"a task's continuation of {max(lengths)} tokens is longer than the model's context of "
                            f"{self.max_length}: it cannot be scored in one window (lm_eval's HF backend refuses it "
                            "too); shorten the task's choices or use a model with a longer context")
        scored = torch.cat([h[len(row) - n: len(row)] for h, row, n in zip(hidden, rows, lengths)])  # (sum n, C)
        logprobs = self.model.head(scored).float().log_softmax(dim=-1).split(lengths)  # each (n, V)
        out = []
        for (strings, _, continuation), lp in zip(chunk, logprobs):
            target = torch.tensor(continuation, device=lp.device)
            answer = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
            out.append(answer)
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[Pair] = []
        owners: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (value, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += value
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation -------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id])
        out = []
        with _evaluating(self.model):
            for context, gen_kwargs in (req.args for req in requests):
                kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
                if kwargs.get("do_sample"):
                    raise UserError(f"a task asks for sampled generation ({gen_kwargs}): llmtrain's lm_eval model "
                                    "decodes greedily; give the task do_sample: false (or temperature: 0)")
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = kwargs["max_gen_toks"]
                if max_new >= self.max_length:  # HFLM refuses; keep half the window for the context instead
                    max_new = self.max_length // 2
                ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
                text = postprocess_generated_text(self._greedy(ids, max_new, until), until, None)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
        return out

    @torch.inference_mode()
    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        """The greedy continuation of ids, up to max_new tokens, stopped once it holds a stop string."""
        cache = KVCache(self.model.config, 1, len(ids) + max_new, self._device, self.model.tok_emb.weight.dtype)
        step = torch.tensor([ids], device=self._device)  # (1, T): the context once, then one token a step
        new: list[int] = []
        for _ in range(max_new):
            token = int(self.model.head(self.model.hidden(step, cache)[:, -1]).argmax(dim=-1))
            if token == self.eot_token_id:
                break
            new.append(token)
            if any(stop and stop in continuation_text(self.tokenizer, new) for stop in until):
                break
            step = torch.tensor([[token]], device=self._device)
        return continuation_text(self.tokenizer, new)


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
