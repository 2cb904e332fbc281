"""Chat templates: rendered as transformers renders them, the special tokens they need added to any tokenizer, and
the assistant's tokens (every turn, end-of-turn token included) read off the rendering."""

import pickle

import pytest
from conftest import CONVERSATIONS, LLAMA3, conversation, write_llama3_tokenizer

from llmtrain.data.chat_template import ALPACA, CHATML, ChatTemplate, chat_tokenizer, template_source
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError

# block tags on lines of their own (trim_blocks, lstrip_blocks), tojson, loop controls and strftime_now
LAYOUT = """{% for message in messages %}
  {% if message['role'] == 'system' and not message['content'] %}{% continue %}{% endif %}
  {{ message['role'] }}: {{ message['content'] | tojson }}
{% endfor %}
{% if add_generation_prompt %}
  assistant ({{ strftime_now('%Y') }}):
{% endif %}"""


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_llama3_tokenizer(tmp_path_factory.mktemp("llama3"))


def test_templates_render_as_transformers_renders_them():
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = build_tokenizer(chat_tokenizer("gpt2", "chatml"))
    for source in (CHATML, ALPACA, LLAMA3, LAYOUT):
        template = ChatTemplate(source, tok)
        for messages in CONVERSATIONS:
            for generation in (False, True):
                theirs, _ = render_jinja_template([messages], chat_template=source, add_generation_prompt=generation,
                                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>")
                assert template.render(messages, generation) == theirs[0]


@pytest.mark.parametrize(("base", "first"), [("gpt2", 50257), ("bytes", 257)])
def test_chatml_tokens_are_added_after_the_vocabulary(base, first):
    name = chat_tokenizer(base, "chatml")
    assert name == base + ' + ["<|im_start|>", "<|im_end|>"]'
    tok = build_tokenizer(name)
    assert tok.n_vocab == first + 2
    ids = tok.encode("<|im_start|>user<|im_end|>", allowed_special="all")
    assert [ids[0], ids[-1]] == [first, first + 1] and max(ids[1:-1]) < first
    assert first not in tok.encode_ordinary("<|im_start|>")  # written in data, they stay text
    assert chat_tokenizer(base, "alpaca") == base  # nothing to add
    assert chat_tokenizer(name, "chatml") == name  # nothing more to add


def test_a_tokenizer_json_gains_what_it_lacks_and_keeps_what_it_has(llama_dir, tmp_path):
    own = str(llama_dir / "tokenizer.json")
    assert chat_tokenizer(own, None) == own  # its own template: every token it writes is in the vocabulary
    name = chat_tokenizer(own, "chatml")
    tok = build_tokenizer(name)
    assert tok.n_vocab == 264 + 2
    assert tok.encode("<|im_start|><|im_end|><|eot_id|>", allowed_special="all") == [264, 265, 263]
    assert pickle.loads(pickle.dumps(tok)).encode("<|im_end|>", allowed_special="all") == [265]
    assert 265 not in tok.encode_ordinary("<|im_end|>")  # written in data, it stays text


def test_a_name_with_added_tokens_keeps_them_wherever_its_file_is_found(llama_dir, tmp_path):
    import shutil

    from llmtrain.data.tokenizer import find_tokenizer, is_file_tokenizer, tokenizer_key, with_added

    name = with_added(str(llama_dir / "tokenizer.json"), ["<|im_start|>"])
    assert is_file_tokenizer(name) and tokenizer_key(name) != tokenizer_key(str(llama_dir / "tokenizer.json"))
    assert tokenizer_key(name).endswith(' + ["<|im_start|>"]')
    shutil.copy(llama_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    moved = with_added("/gone/tokenizer.json", ["<|im_start|>"])
    assert find_tokenizer(moved, tmp_path) == with_added(str(tmp_path / "tokenizer.json"), ["<|im_start|>"])
    assert not is_file_tokenizer(with_added("gpt2", ["<|im_start|>"]))


def assistant_text(template: ChatTemplate, messages: list[dict]) -> list[str]:
    """The runs of consecutive assistant-marked targets, decoded."""
    ids, labels, assistant = template.encode_conversation(messages, 10_000)
    assert labels[:-1] == ids[1:]
    runs, current = [], []
    for target, marked in zip(labels, assistant):
        if marked:
            current.append(target)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return [template.tok.decode(run) for run in runs]


@pytest.mark.parametrize("choice", ["chatml", "alpaca"])
@pytest.mark.parametrize("base", ["gpt2", "bytes"])
def test_every_assistant_turn_and_its_end_of_turn_token_and_nothing_else_is_marked(choice, base):
    tok = build_tokenizer(chat_tokenizer(base, choice))
    template = ChatTemplate(template_source(choice, base), tok)
    end = "<|im_end|>" if choice == "chatml" else "<|endoftext|>"
    for messages in CONVERSATIONS:
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert assistant_text(template, messages) == [a + end for a in answers]


def test_llama3_turns_are_marked_with_their_eot_id_and_never_the_bos(llama_dir):
    own = str(llama_dir / "tokenizer.json")
    template = ChatTemplate(template_source(None, own), build_tokenizer(own))
    messages = conversation("Hi", "  the answer ", "More?", "the rest", system="Be brief.")
    assert assistant_text(template, messages) == ["the answer<|eot_id|>", "the rest<|eot_id|>"]
    ids, _, _ = template.encode_conversation(messages, 10_000)
    assert ids[0] == 259 and ids.count(259) == 1  # the template's BOS, once
    assert template.end_of_turn() == 263


def test_truncation_keeps_the_first_tokens():
    tok = build_tokenizer(chat_tokenizer("bytes", "chatml"))
    template = ChatTemplate(CHATML, tok)
    ids, labels, assistant = template.encode_conversation(CONVERSATIONS[2], 20)
    full, _, _ = template.encode_conversation(CONVERSATIONS[2], 10_000)
    assert len(ids) == len(labels) == len(assistant) == 20 and ids == full[:20]


def test_the_template_comes_from_the_choice_the_tokenizer_config_or_a_file(llama_dir, tmp_path):
    own = str(llama_dir / "tokenizer.json")
    assert template_source(None, own) == LLAMA3
    assert template_source(None, "gpt2") == CHATML
    assert template_source("alpaca", own) == ALPACA
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert template_source(str(tmp_path / "t.jinja"), "gpt2") == "{{ messages[0]['content'] }}"
    assert template_source(str(llama_dir / "tokenizer_config.json"), "gpt2") == LLAMA3
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(UserError, match="has no \"chat_template\" string"):
        template_source(str(tmp_path / "c.json"), "gpt2")
    with pytest.raises(UserError, match="data.chat_template='chatlm' is neither chatml, alpaca, null, nor a file"):
        template_source("chatlm", "gpt2")


def test_a_template_whose_turns_are_not_prefixes_is_refused():
    numbered = "{% for m in messages %}{{ m['content'] }}({{ messages | length }}){% endfor %}"
    with pytest.raises(UserError, match="its turns are not prefixes"):
        ChatTemplate(numbered, build_tokenizer("bytes")).encode_conversation(CONVERSATIONS[0], 100)
