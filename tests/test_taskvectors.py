"""Task-vector patching, greedy decoding and per-head outputs on tiny random models (chapter 6)."""

import dataclasses

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








@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gptj", "qwen2"])
def test_head_patch_effects_every_family(tiny_models, family):
    """The cached-prefix rows (one token each) give what one whole forward per head gives, on ragged prompts."""
    m = tiny_models[family]
    b = encode(m, PROMPTS)
    z = head_contributions(m, b)["z"]
    mean_z = z[:, 1:].mean(1)
    eff = head_patch_effects(m, b, mean_z, TARGETS, max_rows=4)
    name, _, _ = out_projection(m, m.num_layers - 1)
    hd, layer, head = mean_z.shape[-1], m.num_layers - 1, m.num_heads - 1
    base = next_token(m, b, TARGETS).target_logprob[0].exp()
    with torch.no_grad(), m.trace(b.inputs()):
        x = getattr(m.attentions[layer], name).input
        x[b.rows(), b.last, head * hd:(head + 1) * hd] = mean_z[layer, head]
        p = m.logits[b.rows(), b.last].softmax(-1)[b.rows(), TARGETS].save()
    torch.testing.assert_close(eff[layer, head], (p - base).mean(), atol=1e-6, rtol=1e-5)


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
    from lmbook.experiments.taskvectors import run_function_vectors, run_task_vectors

    from tiny import WORDS

    words = [w for w in WORDS if w not in ("the", "a")]
    task = Task("shift", tuple((a, b) for a, b in zip(words[:30], words[1:31])), "test")
    split = split_task(task, n_val=4, n_test=5, min_demos=8, seed=0)
    r = run_task_vectors(llama, split, k=3, n_dummy=2, seed=0)
    assert r.val_curve.shape == (llama.num_layers,)
    assert r.layer == int(r.val_curve.argmax())
    assert set(r.greedy) == set(r.first_token) == {"baseline", "task vector", "ICL"}
    assert all(len(v) == 5 for v in r.first_token.values())
    back = Task("back", tuple((b, a) for a, b in zip(words[:30], words[1:31])), "test")
    splits = {"shift": split, "back": split_task(back, n_val=4, n_test=5, min_demos=8, seed=0)}
    fvs = run_function_vectors(llama, splits, k=3, n_clean=4, n_corrupted=3, n_heads_grid=[1, 2], seed=0,
                               max_rows=5)
    assert list(fvs) == ["shift", "back"]
    # the heads are ranked once, by the effect averaged over the tasks; each task keeps its own ranking
    mean = torch.stack([fv.effects for fv in fvs.values()]).mean(0)
    for name, fv in fvs.items():
        assert fv.effects.shape == (llama.num_layers, llama.num_heads)
        assert fv.heads == top_heads(mean, mean.numel()) and fv.ranked_over == ["shift", "back"]
        assert fv.task_heads == top_heads(fv.effects, fv.effects.numel())
        assert fv.val_grid.shape == (2, llama.num_layers)
        assert fv.n_heads in (1, 2) and 0 <= fv.layer < llama.num_layers
        assert float(fv.val_grid.max()) == float(fv.val_grid[[1, 2].index(fv.n_heads), fv.layer])
        assert len(fv.heads) == llama.num_layers * llama.num_heads and len(fv.correct) == 5
    # a task run alone is ranked by its own effects, and gets the same effects as in company
    alone = run_function_vectors(llama, {"shift": split}, k=3, n_clean=4, n_corrupted=3, n_heads_grid=[1], seed=0)
    torch.testing.assert_close(alone["shift"].effects, fvs["shift"].effects, atol=1e-6, rtol=0)
    assert alone["shift"].heads == alone["shift"].task_heads
    with pytest.raises(ParameterError, match="at least one task"):
        run_function_vectors(llama, {}, k=3, n_clean=4, n_corrupted=3, n_heads_grid=[1])


def test_head_patch_effects_without_a_cache(llama, monkeypatch):
    """Where no cache can be kept (a model traced remotely), whole left-padded rows give the same effects."""
    import lmbook.experiments.taskvectors as tv

    b = encode(llama, PROMPTS)
    mean_z = head_contributions(llama, b)["z"][:, 1:].mean(1)
    cached = head_patch_effects(llama, b, mean_z, TARGETS, max_rows=7)
    real = tv.prefix_cache
    monkeypatch.setattr(tv, "prefix_cache", lambda m, batch: (real(m, batch)[0], None))
    torch.testing.assert_close(head_patch_effects(llama, b, mean_z, TARGETS, max_rows=7), cached, atol=1e-6, rtol=1e-5)


def _shift_split(n_val: int = 5):
    from lmbook.data.tasks import Task, split_task

    from tiny import WORDS

    words = [w for w in WORDS if w not in ("the", "a")]
    task = Task("shift", tuple((a, b) for a, b in zip(words[:30], words[1:31])), "test")
    return split_task(task, n_val=n_val, n_test=4, min_demos=8, seed=0)


def test_validation_sweep_is_the_curve_and_its_first_queries(llama):
    """run_task_vectors' validation curve is the sweep's accuracy; the first n queries get the same prompts,
    and so the same readings, as in a sweep over all of them (what sweep_precision relies on)."""
    from lmbook.core.tokens import answer_token_ids
    from lmbook.data.tasks import first_token_correct
    from lmbook.experiments.taskvectors import run_task_vectors, validation_sweep

    split = _shift_split()
    full = validation_sweep(llama, split, k=3, n_dummy=2, seed=0)
    assert full.top1.shape == full.target_logprob.shape == (llama.num_layers, 5)
    tg = answer_token_ids(llama, [y for _, y in split.val])
    r = run_task_vectors(llama, split, k=3, n_dummy=2, seed=0)
    torch.testing.assert_close(r.val_curve, first_token_correct(full.top1, tg).float().mean(1))
    head = validation_sweep(llama, dataclasses.replace(split, val=split.val[:2]), k=3, n_dummy=2, seed=0)
    assert torch.equal(head.top1, full.top1[:, :2])
    torch.testing.assert_close(head.target_logprob, full.target_logprob[:, :2], atol=1e-5, rtol=1e-5)


def test_sweep_precision(llama):
    """The model against itself agrees exactly; against a bfloat16 copy the summary is that of the two sweeps."""
    from lmbook.core.models import load_copy
    from lmbook.core.tokens import answer_token_ids
    from lmbook.data.tasks import first_token_correct
    from lmbook.experiments.taskvectors import sweep_precision, validation_sweep

    split = _shift_split()
    same = sweep_precision(llama, llama, {"shift": split}, k=3, n_dummy=2, n=3)
    assert same["n_queries"] == 3 and same["agreement"] == 1.0
    assert same["max_difference"] == same["prob_difference"] == 0.0
    assert same["layer_exact"] == same["layer_fast"] and same["curve_exact"] == same["curve_fast"]
    fast = load_copy(llama, "bfloat16")
    pc = sweep_precision(llama, fast, {"shift": split, "again": split}, k=3, n_dummy=2, n=2)
    sub = dataclasses.replace(split, val=split.val[:2])
    a, b = (validation_sweep(m, sub, k=3, n_dummy=2) for m in (llama, fast))
    assert pc["n_queries"] == 4 and pc["agreement"] == pytest.approx(float((a.top1 == b.top1).float().mean()))
    tg = answer_token_ids(llama, [y for _, y in sub.val])
    curve = first_token_correct(b.top1, tg).float().mean(1)
    assert pc["curve_fast"] == pytest.approx(curve.tolist())
    diff = (b.target_logprob.exp().mean(1) - a.target_logprob.exp().mean(1)).abs().max()
    assert pc["prob_difference"] == pytest.approx(float(diff), abs=1e-6)
    # run_task_vectors with a copy: the validation curve is the copy's sweep, the test scores the model's
    from lmbook.experiments.taskvectors import run_task_vectors

    r = run_task_vectors(llama, split, k=3, n_dummy=2, seed=0, fast=fast)
    ref = run_task_vectors(llama, split, k=3, n_dummy=2, seed=0)
    full = validation_sweep(fast, split, k=3, n_dummy=2)
    tg = answer_token_ids(llama, [y for _, y in split.val])
    torch.testing.assert_close(r.val_curve, first_token_correct(full.top1, tg).float().mean(1))
    if r.layer == ref.layer:
        assert r.generations == ref.generations
    with pytest.raises(ParameterError, match="n=0"):
        sweep_precision(llama, fast, {"shift": split}, k=3, n_dummy=2, n=0)
