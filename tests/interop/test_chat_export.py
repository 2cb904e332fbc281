"""A chat model's export: transformers' apply_chat_template on the exported folder gives llmtrain's ids (ChatML on
GPT-2 with the tokens llmtrain added; a Llama-3-style template with BOS on a tokenizer.json), and transformers'
generate stops at the end-of-turn token."""

import pytest
import torch
from conftest import CONVERSATIONS, write_llama3_tokenizer

from llmtrain.data.chat_template import ChatTemplate, chat_tokenizer, template_source
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.interop.hf import export_hf
from llmtrain.model.gpt import GPT, GPTConfig

LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}


def export_chat(folder, tokenizer: str, template: ChatTemplate, **options) -> GPT:
    """A tiny GPT of the tokenizer's vocabulary whose next token is always the end-of-turn token, exported."""
    torch.manual_seed(0)
    n_vocab = build_tokenizer(tokenizer).n_vocab
    gpt = GPT(GPTConfig(vocab_size=n_vocab, context_length=128, emb_dim=16, n_heads=2, n_layers=1,
                        tie_weights=False, **options)).eval()
    end = template.end_of_turn()
    with torch.no_grad():  # blocks that add nothing to equal inputs: the final norm gives its shift or its gain
        for p in gpt.blocks.parameters():
            p.zero_()
        gpt.tok_emb.weight.fill_(1.0)
        if gpt.pos_emb is not None:  # GPT-2: a LayerNorm of a constant is its shift
            gpt.pos_emb.weight.zero_()
            gpt.ln_f.bias.fill_(1.0)
        gpt.head.weight[end] = 5.0
    meta = {"tokenizer": tokenizer, "stage": "chat", "chat_template": template.source, "end_of_turn": end}
    export_hf(gpt, folder, meta)
    return gpt


def same_ids_as_transformers(folder, template: ChatTemplate) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    for messages in CONVERSATIONS:
        for generation in (False, True):
            theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
            theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
            assert list(theirs) == template.encode(template.render(messages, generation)), (messages, generation)


def generation_stops_at_the_end_of_turn(folder, template: ChatTemplate) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    prompt = template.encode(template.render(CONVERSATIONS[1][:2], add_generation_prompt=True))
    out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    assert out[0, len(prompt):].tolist() == [template.end_of_turn()]  # one token, then stopped


@pytest.mark.parametrize("base", [  # GPT-2's tokenizer written and read by transformers, a 50,259-row model: ~15 s
    pytest.param("gpt2", marks=pytest.mark.slow), "bytes"])
def test_a_chatml_export_carries_the_added_tokens_templates_and_stops_as_llmtrain_does(tmp_path, base):
    name = chat_tokenizer(base, "chatml")
    template = ChatTemplate(template_source("chatml", name), build_tokenizer(name))
    export_chat(tmp_path / "hf", name, template)
    same_ids_as_transformers(tmp_path / "hf", template)
    generation_stops_at_the_end_of_turn(tmp_path / "hf", template)


def test_a_llama3_export_keeps_its_template_and_one_bos(tmp_path):
    own = str(write_llama3_tokenizer(tmp_path) / "tokenizer.json")
    template = ChatTemplate(template_source(None, own), build_tokenizer(own))
    export_chat(tmp_path / "hf", own, template, **LLAMA)
    same_ids_as_transformers(tmp_path / "hf", template)
    generation_stops_at_the_end_of_turn(tmp_path / "hf", template)
    assert template.encode(template.render(CONVERSATIONS[1])).count(259) == 1
