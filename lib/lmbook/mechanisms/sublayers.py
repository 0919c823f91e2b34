"""What each sublayer writes into the residual stream.

For most families the attention and MLP blocks' outputs (nnterp's ``attentions_output`` and
``mlps_output``) are added to the residual stream as they are. Gemma 2 and 3 normalise each
sublayer's output again before adding it (``post_attention_layernorm``,
``post_feedforward_layernorm``); there the write is that norm's output, which nnterp does not name.
This module is the one place that knows the difference; chapter 2 projects the writes to the
vocabulary (attribute extraction), chapter 6 splits the attention write into heads, chapter 7
reads the MLP write as a relation vector.
"""

from __future__ import annotations

__all__ = ["sublayer_updates"]


def sublayer_updates(model, layer: int):
    """Inside a trace: what the attention and the MLP sublayer of ``layer`` add to the residual
    stream, as ``(attention_update, mlp_update)``, each ``[batch, seq, d]``.

    For most families these are nnterp's ``attentions_output`` and ``mlps_output``. Gemma 2/3
    normalise each sublayer's output again before adding it (``post_attention_layernorm``,
    ``post_feedforward_layernorm``); there the update is that norm's output, which nnterp does not
    name. Chapter 2 projects these updates to the vocabulary (attribute extraction).
    """
    block = model.layers[layer]
    if hasattr(block, "post_feedforward_layernorm") and hasattr(block, "post_attention_layernorm"):
        return block.post_attention_layernorm.output, block.post_feedforward_layernorm.output
    return model.attentions_output[layer], model.mlps_output[layer]
