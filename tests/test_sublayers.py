"""What each sublayer writes (lmbook.mechanisms.sublayers) on tiny random models."""


import pytest
import torch

from lmbook.core.tokens import encode
from lmbook.mechanisms.sublayers import head_contributions, sublayer_norms, sublayer_writes

from conftest import PROMPTS


def test_sublayer_norms_match_a_plain_forward(llama):
    b = encode(llama, PROMPTS)
    norms = sublayer_norms(llama, b, row=1)
    n = int(b.last[1]) + 1
    with torch.no_grad():
        ref = llama._model(**b.inputs(), output_hidden_states=True)
    assert norms["residual"].shape == (llama.num_layers, n)
    for layer in range(llama.num_layers - 1):
        torch.testing.assert_close(norms["residual"][layer], ref.hidden_states[layer + 1][1, :n].norm(dim=-1))
    assert (norms["attention"] > 0).all() and (norms["mlp"] > 0).all()


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2"])
def test_heads_add_up_to_the_attention_write(family, tiny_models):
    model = tiny_models[family]
    b = encode(model, PROMPTS)
    c = head_contributions(model, b)
    L, B = model.num_layers, len(PROMPTS)
    assert c["heads"].shape == (L, B, model.num_heads, model.hidden_size)
    torch.testing.assert_close(c["heads"].sum(2) + c["bias"], c["attn"], atol=1e-5, rtol=1e-4)
    # the attention write, independently: what the layer adds before its MLP
    with torch.no_grad():
        out = model._model(**b.inputs(), output_hidden_states=True)
    # attention write + MLP write + residual before = residual after, at the last token
    with torch.no_grad(), model.trace(b.inputs()):
        mw = list().save()
        for layer in range(L):
            if getattr(model.layers[layer]._module, "post_feedforward_layernorm", None) is not None:
                mw.append(model.layers[layer].post_feedforward_layernorm.output[b.rows(), b.last])
            else:
                mw.append(model.mlps_output[layer][b.rows(), b.last])
    for layer in range(L - 1):  # the last hidden state HF returns is after the final norm
        before = out.hidden_states[layer][b.rows(), b.last]
        after = out.hidden_states[layer + 1][b.rows(), b.last]
        torch.testing.assert_close(before + c["attn"][layer] + mw[layer], after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_sublayer_writes_add_up_to_the_residual_stream(family, tiny_models):
    model = tiny_models[family]
    b = encode(model, PROMPTS)
    w = sublayer_writes(model, b)
    with torch.no_grad():
        hs = model._model(**b.inputs(), output_hidden_states=True).hidden_states
    for layer in range(model.num_layers):
        before = hs[layer][b.rows(), b.last]
        torch.testing.assert_close(before + w["attn"][layer] + w["mlp"][layer], w["resid"][layer], atol=1e-4, rtol=1e-4)
