"""Task-vector patching, greedy decoding and per-head outputs on tiny random models (chapter 6)."""

import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode
from lmbook.experiments.taskvectors import (
    function_vector,
    head_patch_effects,
    task_vectors,
    top_heads,
)
from lmbook.mechanisms.interventions import hidden_states
from lmbook.mechanisms.readout import next_token
from lmbook.mechanisms.sublayers import head_contributions, out_projection

from conftest import PROMPTS

TARGETS = torch.tensor([5, 6, 7])








def test_task_vector_is_the_mean_state(llama):
    b = encode(llama, PROMPTS)
    torch.testing.assert_close(task_vectors(llama, b, [0, 2]), hidden_states(llama, b, [0, 2]).mean(1))








def test_head_patch_effects(llama):
    b = encode(llama, PROMPTS)
    z = head_contributions(llama, b)["z"]  # [L, B, H, hd]
    one = b.select([0])
    # patching each head with its own value changes nothing
    eff = head_patch_effects(llama, one, z[:, 0], TARGETS[:1])
    assert eff.shape == (llama.num_layers, llama.num_heads)
    torch.testing.assert_close(eff, torch.zeros_like(eff), atol=1e-6, rtol=0)
    # a different prompt's head outputs: the batched effect equals a one-head forward
    mean_z = z[:, 1:].mean(1)
    eff = head_patch_effects(llama, b, mean_z, TARGETS, max_rows=7)
    assert eff.abs().sum() > 0
    name, _, _ = out_projection(llama, 1)
    hd = mean_z.shape[-1]
    base = next_token(llama, b, TARGETS).target_logprob[0].exp()
    with torch.no_grad(), llama.trace(b.inputs()):
        x = getattr(llama.attentions[1], name).input
        x[b.rows(), b.last, 2 * hd:3 * hd] = mean_z[1, 2]
        p = llama.logits[b.rows(), b.last].softmax(-1)[b.rows(), TARGETS].save()
    torch.testing.assert_close(eff[1, 2], (p - base).mean(), atol=1e-6, rtol=1e-5)


def test_top_heads_and_function_vector():
    eff = torch.tensor([[0.1, 0.5], [0.3, -1.0], [0.7, 0.0]])
    assert top_heads(eff, 2) == [(2, 0), (0, 1)]
    assert top_heads(eff, 2, layers=[4, 5, 6]) == [(6, 0), (4, 1)]
    heads = torch.arange(3 * 2 * 4, dtype=torch.float).view(3, 2, 4)
    torch.testing.assert_close(function_vector(heads, [(2, 0), (0, 1)]), heads[2, 0] + heads[0, 1])
    with pytest.raises(ParameterError):
        top_heads(eff, 7)


def test_protocols_run_end_to_end(llama, tmp_path):
    from lmbook.data.tasks import Task, split_task
    from lmbook.experiments.taskvectors import run_function_vector, run_task_vectors

    from tiny import WORDS

    words = [w for w in WORDS if w not in ("the", "a")]
    task = Task("shift", tuple((a, b) for a, b in zip(words[:30], words[1:31])), "test")
    split = split_task(task, n_val=4, n_test=5, min_demos=8, seed=0)
    r = run_task_vectors(llama, split, k=3, n_dummy=2, seed=0)
    assert r.val_curve.shape == (llama.num_layers,)
    assert r.layer == int(r.val_curve.argmax())
    assert set(r.greedy) == set(r.first_token) == {"baseline", "task vector", "ICL"}
    assert all(len(v) == 5 for v in r.first_token.values())
    fv = run_function_vector(llama, split, k=3, n_clean=4, n_corrupted=3, n_heads_grid=[1, 2], seed=0, max_rows=5)
    assert fv.effects.shape == (llama.num_layers, llama.num_heads)
    assert fv.val_grid.shape == (2, llama.num_layers)
    assert fv.n_heads in (1, 2) and 0 <= fv.layer < llama.num_layers
    assert float(fv.val_grid.max()) == float(fv.val_grid[[1, 2].index(fv.n_heads), fv.layer])
    assert len(fv.heads) == llama.num_layers * llama.num_heads






