import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import decode_tokens, encode, first_token_ids, pad_ids, token_span
from tiny import make_tokenizer

TOK = make_tokenizer()


def test_right_padding_and_last_index():
    b = encode(TOK, ["the city of", "the capital of italy is"])
    assert b.input_ids.shape == (2, 6)
    assert b.last.tolist() == [3, 5]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert (b.input_ids[0, 4:] == TOK.pad_token_id).all()
    assert b.input_ids[:, 0].tolist() == [TOK.bos_token_id] * 2


def test_select_trims_padding():
    b = encode(TOK, ["the city of", "the capital of italy is", "a"])
    s = b.select([0, 2])
    assert s.prompts == ["the city of", "a"] and s.input_ids.shape == (2, 4)
    assert s.last.tolist() == [3, 1]


def test_token_span_finds_subject_tokens():
    b = encode(TOK, ["the eiffel tower is located in the city of"])
    assert token_span(b, 0, "eiffel tower") == (2, 4)
    assert token_span(b, 0, "the", occurrence="first") == (1, 2)
    assert token_span(b, 0, "the", occurrence="last") == (7, 8)
    assert decode_tokens(TOK, b.input_ids[0, 2:4]) == ["eiffel", "tower"]


def test_token_span_absent_substring():
    b = encode(TOK, ["the city of"])
    with pytest.raises(ParameterError, match="does not occur"):
        token_span(b, 0, "rome")


def test_bad_prompts():
    for bad in [[], [""], [3], None]:
        with pytest.raises(ParameterError):
            encode(TOK, bad)


def test_first_token_ids():
    ids = first_token_ids(TOK, ["paris", "rome"])
    assert ids.tolist() == [TOK.convert_tokens_to_ids("paris"), TOK.convert_tokens_to_ids("rome")]
    assert ids.dtype == torch.long


def test_pad_ids_on_either_side():
    right = pad_ids(TOK, ["a", "b"], [[5, 6, 7], [8]])
    assert right.input_ids.tolist() == [[5, 6, 7], [8, TOK.pad_token_id, TOK.pad_token_id]]
    assert right.last.tolist() == [2, 0] and right.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    left = pad_ids(TOK, ["a", "b"], [[5, 6, 7], [8]], side="left")
    assert left.input_ids.tolist() == [[5, 6, 7], [TOK.pad_token_id, TOK.pad_token_id, 8]]
    assert left.last.tolist() == [2, 2] and left.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ParameterError, match="side"):
        pad_ids(TOK, ["a"], [[5]], side="middle")
