import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import (
    adds_bos,
    decode_tokens,
    encode,
    first_token_ids,
    pad_ids,
    pad_token_id,
    start_token_id,
    token_span,
)

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


def test_encode_with_start_puts_a_start_token_first_once(llama):
    b = encode(llama, ["the city", "paris"], start=True)  # the tiny tokenizer adds <bos> itself
    assert b.input_ids[:, 0].tolist() == [llama.tokenizer.bos_token_id] * 2
    assert b.last.tolist() == [2, 1]
    assert torch.equal(b.input_ids[0, :3], encode(llama, "the city").input_ids[0])


def _tokenizer_with(pad: str | None, bos_first: bool = True, extra=()):
    """The tiny word-level tokenizer with ``pad`` as its pad token (id 0 when it is the first
    special token) and, with ``bos_first=False``, no BOS added to texts (as SmolLM2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from tiny import WORDS

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", *extra]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_first:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token=pad, bos_token="<bos>",
                                   eos_token="<eos>")


def test_a_pad_id_of_zero_is_used_not_replaced_by_eos():
    tok = _tokenizer_with("<pad>")
    assert tok.pad_token_id == 0
    assert pad_token_id(tok) == 0
    b = encode(tok, ["the city of", "paris"])
    assert b.input_ids[1, 2:].tolist() == [0, 0]


def test_without_a_pad_token_eos_pads():
    tok = _tokenizer_with(None)
    assert pad_token_id(tok) == tok.eos_token_id == 3
    assert encode(tok, ["the city of", "paris"]).input_ids[1, -1] == 3


def test_start_token_where_the_tokenizer_adds_no_bos():
    with_bos = _tokenizer_with("<pad>")
    assert adds_bos(with_bos) and start_token_id(with_bos) is None
    no_bos = _tokenizer_with("<pad>", bos_first=False)
    assert not adds_bos(no_bos) and start_token_id(no_bos) == no_bos.bos_token_id
    # a GPT-2-style document separator wins over BOS, as SmolLM2's <|endoftext|> (id 0 there)
    sep = _tokenizer_with("<pad>", bos_first=False, extra=("<|endoftext|>",))
    assert start_token_id(sep) == sep.convert_tokens_to_ids("<|endoftext|>")
    b = encode(no_bos, ["the city of", "paris"], start=True)
    assert b.input_ids[:, 0].tolist() == [no_bos.bos_token_id] * 2
    assert b.offsets[0][0] == (0, 0) and token_span(b, 0, "city") == (2, 3)
    assert encode(no_bos, ["the city of"]).input_ids[0, 0] != no_bos.bos_token_id


def test_the_text_prefix_of_chapters_6_and_7_follows_the_start_token_rule():
    from lmbook.data.tasks import prompt_prefix

    with_bos, no_bos = _tokenizer_with("<pad>"), _tokenizer_with("<pad>", bos_first=False)
    assert start_token_id(with_bos) is None and prompt_prefix(with_bos) == ""
    assert start_token_id(no_bos) is not None and prompt_prefix(no_bos) == "\n"
