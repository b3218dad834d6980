import json

import pytest

from afm.errors import TokenizerError
from afm.tokenizer import CHATML_TEMPLATE, Tokenizer, render_chat, train_bpe
from afm.tokenizer.train import python_stdlib_texts

from .conftest import extract_member, fetch_pypi_sdist

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Grüße aus München! Ça va? 東京は晴れです。 Привет, мир. " * 10,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 20,
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS + list(python_stdlib_texts(400_000)), 1024)


def test_trained_vocabulary_layout(tokenizer):
    assert tokenizer.vocab_size == 1024
    # special tokens sit at the end of the vocabulary, as in AFM-4.5B
    assert [tokenizer.id_to_token(i) for i in range(1020, 1024)] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
    ]
    assert tokenizer.bos_token_id == 1020 and tokenizer.eos_token_id == 1021 and tokenizer.pad_token_id == 1021
    assert tokenizer.stop_token_ids == [1021, 1023]


@pytest.mark.parametrize("text", ["hello world", "  leading spaces\n\n\ttabs", "Ünïcödé 🦙 東京", "", "x" * 300])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]


def test_special_tokens_are_single_ids(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") and ids[-1] == tokenizer.token_to_id("<|im_end|>")


def test_training_is_deterministic():
    a = train_bpe(CORPUS, 300).backend.to_str()
    b = train_bpe(CORPUS, 300).backend.to_str()
    assert a == b


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML_TEMPLATE and config["eos_token"] == "<|end_of_text|>"
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.encode("some text 123") == tokenizer.encode("some text 123")
    assert loaded.special_tokens == tokenizer.special_tokens


def test_bad_input(tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json: not found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be loaded"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([5, 99999])
    with pytest.raises(TokenizerError, match="vocab_size must be at least"):
        train_bpe(CORPUS, 100)
    with pytest.raises(TokenizerError, match="no 'role'"):
        tokenizer.apply_chat_template([{"content": "hi"}])
    with pytest.raises(TokenizerError, match="syntax error"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")


# ---- chat templates against transformers ------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="transformers is the chat-template reference")

LLAMA3_STYLE = (
    "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
    "{{- \"<|im_start|>system\\n\" + system_message + \"<|im_end|>\" }}\n"
    "{%- for message in messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' }}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
TOOLS_AND_NAMESPACE = (
    "{% set ns = namespace(count=0) %}{% for m in messages %}{% set ns.count = ns.count + 1 %}"
    "{% if m.role == 'tool' %}{{ m.content | tojson }}{% continue %}{% endif %}"
    "{{ m.role }}: {{ m.content }}\n{% endfor %}{{ ns.count }} {{ tools | tojson(indent=1) }}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are AFM.  "}, {"role": "user", "content": "Hi"}],
    "multi-turn": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "Of Italy? <script>\"é\"</script>"},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3_STYLE, TOOLS_AND_NAMESPACE], ids=["chatml", "llama3", "tools"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_as_transformers(tokenizer, hf_tokenizer, template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int"}}}]
    kwargs = dict(add_generation_prompt=add_generation_prompt, chat_template=template, tools=tools)
    ours = tokenizer.apply_chat_template(messages, **kwargs)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours == theirs
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    hf_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ids == list(hf_ids)


def test_raise_exception_in_template(tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TokenizerError, match="must alternate"):
        tokenizer.apply_chat_template(bad, chat_template=LLAMA3_STYLE)


def test_generation_spans_match_transformers_assistant_mask(tokenizer, hf_tokenizer):
    messages = CONVERSATIONS["multi-turn"] + [{"role": "assistant", "content": "Rome"}]
    text, spans = render_chat(CHATML_TEMPLATE, messages, special_tokens=tokenizer.special_tokens,
                              return_generation_spans=True)
    assert [text[a:b] for a, b in spans] == ["Paris<|im_end|>", "Rome<|im_end|>"]
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ours = [int(any(a <= s < b for a, b in spans)) for s, _ in enc.offsets]
    assert ours == out["assistant_masks"]


def test_unsafe_template_is_refused(tokenizer):
    evil = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(TokenizerError):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=evil)


@pytest.mark.parametrize("template", [
    "{{ messages[0]['content'] + 1 }}",  # str + int
    "{{ messages[5]['content'] }}{{ 1 / 0 }}",
    "{{ enable_thinking['x']['y'] + 2 }}",
])
def test_a_template_failing_on_its_values_raises_a_tokenizer_error(tokenizer, template):
    """A chat template is a program: values of types it does not expect fail inside it, as a
    TokenizerError that says so, never as a bare TypeError."""
    with pytest.raises(TokenizerError, match="chat template failed"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template,
                                      enable_thinking={"x": {"y": "z"}})


def test_template_variables_are_what_the_template_reads():
    from afm.tokenizer.chat import template_variables

    assert template_variables(CHATML_TEMPLATE) == {"messages", "bos_token", "add_generation_prompt"}
    source = ("{% set y = 3 %}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ y }}"
              "{% if enable_thinking %}<think>{% endif %}{{ raise_exception('x') if tools is none else '' }}")
    assert template_variables(source) == {"messages", "enable_thinking", "tools"}


@pytest.mark.parametrize("text", ["hello world", "日本語 🙂 " * 50, "<|begin_of_text|>" * 20, "\n\t  " * 40,
                                  "".join(chr(c) for c in range(32, 3000))])
def test_max_text_bytes_bounds_the_bytes_of_any_encoding(tokenizer, text):
    """Text longer than `max_text_bytes(n)` cannot be n tokens or fewer: servers refuse it untokenized."""
    ids = tokenizer.encode(text)
    assert len(text.encode("utf-8")) <= tokenizer.max_text_bytes(len(ids))
    assert tokenizer.encode(text) == tokenizer.backend.encode(text).ids  # the GIL-free call, the same ids


# ---- a real published tokenizer --------------------------------------------------------------

LLAMA_CPP_PYTHON = ("llama-cpp-python", "0.3.36")


@pytest.mark.network
@pytest.mark.slow
def test_real_llama3_tokenizer_matches_llama_cpp_expectations():
    """Llama 3's BPE vocabulary, shipped as a vocab-only GGUF in llama-cpp-python's source distribution,
    with llama.cpp's own test inputs and the token ids the reference tokenizer produces for them."""
    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (pip install afm[test])")
    from afm.tokenizer.gguf_vocab import tokenizer_from_gguf

    sdist = fetch_pypi_sdist(*LLAMA_CPP_PYTHON)
    vocab = extract_member(sdist, "models/ggml-vocab-llama-bpe.gguf")
    inputs = extract_member(sdist, "models/ggml-vocab-llama-bpe.gguf.inp").read_text(encoding="utf-8")
    expected = extract_member(sdist, "models/ggml-vocab-llama-bpe.gguf.out").read_text(encoding="utf-8")
    texts = inputs.split("\n__ggml_vocab_test__\n")
    ids = expected.split("\n")
    assert len(texts) == len(ids) > 40
    tok = tokenizer_from_gguf(vocab)
    assert tok.vocab_size == 128256 and tok.bos_token_id == 128000
    for text, line in zip(texts, ids, strict=True):
        got = tok.encode(text, add_special_tokens=False)
        assert got == [int(x) for x in line.split()], text
        assert tok.decode(got) == text
    assert tok.encode("Hello")[0] == 128000
