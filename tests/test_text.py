"""Streaming text is final when released: no split UTF-8, no half a stop string, real templates."""
from __future__ import annotations

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers import LlamaConfig

from dflash_cli.detok import StreamDecoder
from dflash_cli.loader import load_tokenizer
from dflash_cli.rope import inv_frequencies

from .tiny import QWEN3_TOKENIZER, STORIES


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    return load_tokenizer(QWEN3_TOKENIZER)


TEXT = "Grüße aus 東京 🙂👍🏽 — naïve café, ok."


def test_stream_equals_decode_and_never_shows_a_broken_character(qwen3_tokenizer):
    ids = qwen3_tokenizer.encode(TEXT)
    assert any("\ufffd" in qwen3_tokenizer.decode([i]) for i in ids)  # the text does split bytes
    for chunk in (1, 2, 3):
        dec = StreamDecoder(qwen3_tokenizer)
        pieces = [dec.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [dec.flush()]
        assert "".join(pieces) == TEXT
        assert not any("\ufffd" in p for p in pieces)


def test_stop_string_across_tokens_is_cut_and_never_leaks(qwen3_tokenizer):
    ids = qwen3_tokenizer.encode("The answer is 42.\nUser: next question")
    dec = StreamDecoder(qwen3_tokenizer, ("\nUser:",))
    pieces = []
    for i in ids:
        pieces.append(dec.push([i]))
        assert "User" not in "".join(pieces)
    assert "".join(pieces) + dec.flush() == "The answer is 42."
    assert dec.stopped


def test_held_back_prefix_is_released_when_it_is_not_a_stop(qwen3_tokenizer):
    dec = StreamDecoder(qwen3_tokenizer, ("STOP!",))
    ids = qwen3_tokenizer.encode("a STO b")
    out = "".join(dec.push([i]) for i in ids) + dec.flush()
    assert out == "a STO b" and not dec.stopped


def test_stop_keeps_only_the_tokens_of_the_text_before_it(qwen3_tokenizer):
    ids = qwen3_tokenizer.encode("The answer is 42.\nUser: next question")
    dec = StreamDecoder(qwen3_tokenizer, ("\nUser:",))
    text = "".join(dec.push([i]) for i in ids)
    kept = dec.tokens_in_text()
    # ".\n" wrote the text's last character and the stop string's first: it is not kept
    assert text == "The answer is 42." and qwen3_tokenizer.decode(ids[:kept]) == "The answer is 42"
    assert not text.startswith(qwen3_tokenizer.decode(ids[:kept + 1]))


def test_first_piece_keeps_its_space_after_the_prompt():
    """SentencePiece (Metaspace) decoding drops the leading space of the first piece it is given."""
    tokenizer = load_tokenizer(STORIES)
    prompt, whole = tokenizer.encode("The cat"), tokenizer.encode("The cat and a boy")
    answer = whole[len(prompt):]  # "▁and", "▁a", "▁b", "o", "y": what the model generates after the prompt
    assert whole[:len(prompt)] == prompt
    alone = StreamDecoder(tokenizer)
    assert alone.push(answer) + alone.flush() == "and a boy"  # the bug the context fixes
    dec = StreamDecoder(tokenizer, context=prompt[-1:])
    out = "".join(dec.push([i]) for i in answer) + dec.flush()
    assert out == " and a boy" and "The cat" + out == tokenizer.decode(prompt + answer, skip_special_tokens=True)


def test_special_tokens_are_not_printed(qwen3_tokenizer):
    dec = StreamDecoder(qwen3_tokenizer)
    assert dec.push(qwen3_tokenizer.encode("hi<|im_end|>")) + dec.flush() == "hi"


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "linear", "factor": 2.0},
])
def test_rope_frequencies_match_transformers(scaling):
    ours, factor = inv_frequencies(128, 500000.0, scaling)
    params = {"rope_type": "default", "rope_theta": 500000.0} | (scaling or {})
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
                      rope_parameters=params)
    theirs, their_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu") if scaling else (
        1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128)), 1.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert factor == pytest.approx(their_factor)
