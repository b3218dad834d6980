import pytest
import torch

from afm.errors import ConfigError
from afm.generate import GenerationSettings, generate_tokens, stream_text
from afm.model import build_model

from .conftest import tiny_config


def test_greedy_generation_equals_argmax_loop(tiny_model):
    prompt = [3, 14, 15, 92, 6]
    got = list(generate_tokens(tiny_model, prompt, GenerationSettings(max_tokens=12, temperature=0.0,
                                                                      repetition_penalty=1.0)))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(tiny_model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_seeded_sampling_reproduces(tiny_model):
    s = GenerationSettings(max_tokens=16, temperature=1.0, top_k=-1, top_p=1.0, seed=123)
    assert list(generate_tokens(tiny_model, [1, 2, 3], s)) == list(generate_tokens(tiny_model, [1, 2, 3], s))


def test_stop_token_ends_generation(tiny_model):
    settings = GenerationSettings(max_tokens=20, temperature=0.0, repetition_penalty=1.0)
    first = next(iter(generate_tokens(tiny_model, [7, 8], settings)))
    assert list(generate_tokens(tiny_model, [7, 8], settings, stop_token_ids=[first])) == [first]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GenerationSettings(**kwargs)


def test_prompt_longer_than_context():
    model = build_model(tiny_config(max_position_embeddings=16), seed=0)
    with pytest.raises(ConfigError, match="exceeds the model's context of 16"):
        list(generate_tokens(model, list(range(10)), GenerationSettings(max_tokens=10)))


def test_stream_text_holds_back_split_characters():
    class ByteTok:  # decodes ids as UTF-8 bytes
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    pieces = list(stream_text(ByteTok(), iter(list("é🦙a".encode()))))
    assert "".join(pieces) == "é🦙a" and all("\ufffd" not in p for p in pieces)
