"""Tiny random models of several architecture families, built from a config (no download).

Used by the unit tests: each family is saved with a small word-level tokenizer to a folder and
loaded through ``lmbook.core.models.load_model`` like any local checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a of in is city capital tower located eiffel paris rome france italy colosseum plays sport "
    "basketball michael jordan music piano language french speaks born was and to on at by for with "
    "an it he she they this that from which new old big small red blue green one two three"
).split()

FAMILIES = ["llama", "gemma3", "gpt2", "gptj", "qwen2"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def make_config(family: str, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                   sliding_window=16, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_embd=32, n_layer=3, n_head=4, n_positions=64, rotary_dim=4, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, **common)
    raise ValueError(family)


def build(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model and its tokenizer to ``folder``; return the folder."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, len(tok)))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
