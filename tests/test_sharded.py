"""A model split over several devices: ``device="auto"`` shards over every GPU (``device_map="auto"``),
and the library's functions take each tensor's device from the layer it touches.

The split runs need two devices, so they run only where there is a GPU: two GPUs, or one GPU and
the CPU (``bench/gpu_check.py --sharded`` runs this file with ``--device auto`` on a lent GPU). The
device-map choice is checked everywhere with a stub for the GPUs.
"""

from __future__ import annotations

import pytest
import torch

from lmbook.core import models
from lmbook.core.models import load_model, model_device
from lmbook.core.tokens import encode

from conftest import PROMPTS


@pytest.mark.parametrize("n_gpus, device, expected", [(2, "auto", "auto"), (4, "auto", "auto"), (1, "auto", "cuda"),
                                                       (2, "cuda", "cuda"), (2, "cpu", "cpu")])
def test_auto_shards_only_over_several_gpus(n_gpus, device, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    assert models._device_map(device) == expected


def test_load_model_passes_the_device_map(monkeypatch, tiny_dirs):
    """``device="auto"`` on a two-GPU machine asks transformers for ``device_map="auto"`` (bf16)."""
    import nnterp

    seen = {}

    class Stop(Exception):
        pass

    def stub(source, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(nnterp, "StandardizedTransformer", stub)
    with pytest.raises(models.ModelLoadError):
        load_model(str(tiny_dirs["llama"]), device="auto")
    assert seen["device_map"] == "auto" and seen["dtype"] == torch.bfloat16
    split = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    with pytest.raises(models.ModelLoadError):
        load_model(str(tiny_dirs["llama"]), device_map=split)
    assert seen["device_map"] == split and seen["dtype"] == torch.float32


def _two_devices() -> tuple[str, str] | None:
    if torch.cuda.device_count() >= 2:
        return "cuda:0", "cuda:1"
    if torch.cuda.is_available():
        return "cpu", "cuda:0"
    return None


def split_map(first: str, second: str) -> dict:
    """The tiny llama's embedding and first layer on ``first``; the rest, the unembedding included, on ``second``."""
    return {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
            "model.layers.1": second, "model.layers.2": second, "model.norm": second, "lm_head": second}


@pytest.fixture(scope="module")
def split(tiny_dirs):
    devices = _two_devices()
    if devices is None:
        pytest.skip("a split over two devices needs a GPU (two GPUs, or one GPU and the CPU)")
    m = load_model(str(tiny_dirs["llama"]), device_map=split_map(*devices), dtype=torch.float32)
    layer_devs = [next(m._model.model.layers[i].parameters()).device for i in range(m.num_layers)]
    assert len(set(layer_devs)) == 2, layer_devs
    assert model_device(m) == torch.device(devices[0]) or str(model_device(m)).startswith(devices[0])
    return m


@pytest.fixture(scope="module")
def whole(tiny_dirs):
    return load_model(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32)


def close(a, b, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(a).float().cpu(), torch.as_tensor(b).float().cpu(), rtol=tol, atol=tol,
                               equal_nan=True)


def test_mechanisms_on_a_split_model(split, whole):
    from lmbook.mechanisms.generation import greedy_tokens
    from lmbook.mechanisms.interventions import hidden_states, patch_sweep
    from lmbook.mechanisms.knockout import group_facts, knockout_sweep, knockout_sweep_looped
    from lmbook.mechanisms.readout import logit_lens
    from lmbook.mechanisms.sublayers import sublayer_norms

    b = encode(whole, PROMPTS)
    close(logit_lens(split, b, k=3).top_probs, logit_lens(whole, b, k=3).top_probs)
    close(hidden_states(split, b, [0, 2]), hidden_states(whole, b, [0, 2]))
    close(patch_sweep(split, b.select([0]), b.select([0])), patch_sweep(whole, b.select([0]), b.select([0])))
    close(sublayer_norms(split, b)["mlp"], sublayer_norms(whole, b)["mlp"])
    g = group_facts(whole, PROMPTS[:1], ["eiffel tower"], torch.tensor([10]))[0]
    close(knockout_sweep(split, g, window=2), knockout_sweep(whole, g, window=2))
    close(knockout_sweep_looped(split, g, window=2), knockout_sweep(whole, g, window=2))
    v = torch.randn(whole.hidden_size)
    assert greedy_tokens(split, b, 3, layer=2, vectors=v) == greedy_tokens(whole, b, 3, layer=2, vectors=v)


@pytest.mark.parametrize("chapter", ["recall", "steering", "refusal", "taskvectors"])
def test_experiments_on_a_split_model(chapter, split, whole):
    """Each chapter protocol that moves tensors itself, on the split model."""
    if chapter == "recall":
        from lmbook.experiments.recall import sublayer_knockout_topk

        b = encode(whole, PROMPTS)
        spans = torch.tensor([[1, 3], [1, 3], [3, 4]])
        close(sublayer_knockout_topk(split, b, spans, read_layer=2, window=1, k=4)[0],
              sublayer_knockout_topk(whole, b, spans, read_layer=2, window=1, k=4)[0])
    elif chapter == "steering":
        from lmbook.experiments.steering import contrast_vector, steered_target_logprobs

        sv = contrast_vector(whole, "paris france", "rome italy", layers=[0, 2])
        close(steered_target_logprobs(split, PROMPTS, sv, [(0, 2.0), (2, 2.0)], torch.arange(10)),
              steered_target_logprobs(whole, PROMPTS, sv, [(0, 2.0), (2, 2.0)], torch.arange(10)))
    elif chapter == "refusal":
        from lmbook.experiments.refusal import generate

        d = torch.randn(whole.hidden_size)
        assert (generate(split, PROMPTS[:2], "plain", ablate=d, max_new_tokens=4)
                == generate(whole, PROMPTS[:2], "plain", ablate=d, max_new_tokens=4))
    else:
        from lmbook.experiments.taskvectors import head_patch_effects
        from lmbook.mechanisms.sublayers import head_contributions

        b = encode(whole, PROMPTS)
        z = head_contributions(whole, b)["z"]
        t = torch.tensor([5, 6, 7])
        close(head_patch_effects(split, b, z.mean(1), t), head_patch_effects(whole, b, z.mean(1), t))
