"""The remote path, offline: every chapter's library entry points through nnsight's local simulation
of an NDIF request (``remote="local"``), the early checks of ``remote=True``, and the refusals.

nnsight 0.7's ``remote="local"`` serialises the trace as it would for NDIF, then deserialises it with
every module that NDIF lacks (lmbook, the tests) removed from ``sys.modules``, and runs it. A model
loaded with ``load_model(..., remote="local")`` is loaded as a remote one is (config only, no weights:
``model.dispatched`` is False) and its weights are read only when the first request runs. Each test
below loads a fresh one, so a library function that reads the weights outside a trace (which NDIF
could not serve) fails here, and compares what it returns with the same call on the local model.
"""

import numpy as np
import pytest
import torch

from lmbook import ParameterError
from lmbook.core import models
from lmbook.core.models import RemoteNotAvailableError, check_ndif, load_model
from lmbook.core.tokens import encode

from conftest import PROMPTS
from tiny import FAMILIES

SUBJECTS = ["eiffel tower", "michael jordan", "italy"]


@pytest.fixture
def sim(tiny_dirs, test_device):
    """A fresh tiny llama loaded as NDIF would serve it, its requests simulated locally."""
    return load_model(str(tiny_dirs["llama"]), device=test_device, dtype=torch.float32, remote="local")


def close(a, b, tol=1e-4):
    a, b = (torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in (a, b))
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=tol, atol=tol, equal_nan=True)


# ---------------------------------------------------------------- loading stays remote


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_loading_reads_no_weights(family, tiny_dirs):
    """No local dispatch: nnterp's attention-probability check runs as a scan, not a trace."""
    m = load_model(str(tiny_dirs[family]), device="cpu", remote="local")
    assert m.dispatched is False and m.lmbook_remote == "local"
    assert all(p.device.type == "meta" for p in m._model.parameters())
    assert m.num_layers == 3 and m.attn_probs_available


def test_a_request_without_the_library_registered_fails(sim, monkeypatch):
    """What registration fixes: NDIF has no lmbook, so helpers called in a trace must travel by value."""
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES

    from lmbook.mechanisms.sublayers import sublayer_updates

    monkeypatch.setattr(models, "_register_library", lambda: None)
    monkeypatch.setattr("cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES", _PICKLE_BY_VALUE_MODULES - {"lmbook"})
    b = encode(sim, PROMPTS[:1])
    with pytest.raises(Exception, match="lmbook"):
        with torch.no_grad(), models.trace(sim, b):
            a, _ = sublayer_updates(sim, 1)
            a.save()


@pytest.mark.parametrize("value, expected", [("1", True), ("local", "local"), ("0", False), ("", False)])
def test_remote_default_comes_from_the_environment(value, expected, monkeypatch):
    monkeypatch.setenv(models.REMOTE_ENV, value)
    assert models._remote_value(None) == expected
    assert models._remote_value(False) is False  # an explicit value wins


def test_bad_remote_values_are_refused(monkeypatch, tiny_dirs):
    with pytest.raises(ParameterError, match="remote must be"):
        load_model(str(tiny_dirs["llama"]), remote="yes")
    monkeypatch.setenv(models.REMOTE_ENV, "maybe")
    with pytest.raises(ParameterError, match=models.REMOTE_ENV):
        load_model(str(tiny_dirs["llama"]))
    with pytest.raises(ParameterError, match="hub id"):
        load_model(str(tiny_dirs["llama"]), remote=True)


# ---------------------------------------------------------------- the early check of remote=True


def test_no_api_key_is_named(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteNotAvailableError, match="NDIF_API_KEY") as e:
        load_model("org/name", remote=True)
    assert "\n" not in str(e.value)


def test_no_network_is_named(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "k")
    monkeypatch.setattr(models, "_get_json", lambda url, timeout: (None, "URLError: Name or service not known"))
    with pytest.raises(RemoteNotAvailableError, match="cannot be reached.*Name or service") as e:
        check_ndif("org/name")
    assert "\n" not in str(e.value)


def test_a_model_ndif_does_not_serve_is_named(monkeypatch):
    key = 'nnsight.modeling.language.LanguageModel:{"repo_id": "openai-community/gpt2"}'
    status = {"deployments": {"a": {"repo_id": "meta-llama/Llama-3.1-8B"}, "b": {"model_key": key}}}
    monkeypatch.setenv("NDIF_API_KEY", "k")
    monkeypatch.setattr(models, "_get_json", lambda url, timeout: (status, None))
    with pytest.raises(RemoteNotAvailableError, match="does not serve 'org/name'.*openai-community/gpt2"):
        check_ndif("org/name")
    check_ndif("Meta-Llama/Llama-3.1-8B")  # served (hub ids are not case-sensitive)


def test_training_is_refused_remote(sim):
    from lmbook.mechanisms.training import finetune, prefix_states, reply_loss, train_top_layers

    with pytest.raises(ParameterError, match="fine-tuning.*remote"):
        finetune(sim, [("the city", "paris")], steps=1)
    with pytest.raises(ParameterError, match="remote"):
        reply_loss(sim, [("the city", "paris")])
    with pytest.raises(ParameterError, match="remote"):
        prefix_states(sim, encode(sim, PROMPTS), n_frozen=1)
    with pytest.raises(ParameterError, match="remote"):
        train_top_layers(sim, None, None, n_train_layers=1, lr=1e-3, epochs=1)
    assert sim.dispatched is False


# ---------------------------------------------------------------- each chapter's entry points


def test_ch01_tour(sim, llama):
    from lmbook.mechanisms.interventions import patch_sweep
    from lmbook.mechanisms.readout import logit_lens
    from lmbook.mechanisms.sublayers import sublayer_norms

    b = encode(llama, PROMPTS)
    a, r = logit_lens(sim, b, k=3), logit_lens(llama, b, k=3)
    assert torch.equal(a.top_ids, r.top_ids)
    close(patch_sweep(sim, b.select([0]), b.select([0])), patch_sweep(llama, b.select([0]), b.select([0])))
    for k, v in sublayer_norms(sim, b).items():
        close(v, sublayer_norms(llama, b)[k])


def test_ch02_factual_recall(sim, llama):
    from lmbook.data.facts import Fact
    from lmbook.experiments.causal_tracing import run_causal_tracing
    from lmbook.experiments.recall import run_enrichment, run_knockout, run_sublayer_knockout
    from lmbook.mechanisms.knockout import group_facts, knockout_sweep_looped

    facts = [Fact(str(i), "r", s, p.replace(s, "{}"), p, a)
             for i, (s, p, a) in enumerate(zip(SUBJECTS, PROMPTS, ["paris", "basketball", "rome"]))]
    desc = {s: "paris france basketball rome italy" for s in SUBJECTS}
    # the knockout sweep runs whole prompts remote (no local cache): it equals the cached local sweep
    ko, ref = run_knockout(sim, facts, window=2, progress=False), run_knockout(llama, facts, window=2, progress=False)
    close(ko.clean, ref.clean)
    for kind in ko.changes:
        close(ko.changes[kind], ref.changes[kind], tol=1e-3)
    g = group_facts(sim, PROMPTS[:1], SUBJECTS[:1], torch.tensor([10]))[0]
    close(knockout_sweep_looped(sim, g, window=2), knockout_sweep_looped(llama, g, window=2))
    close(run_enrichment(sim, facts, desc, top_k=5).rates, run_enrichment(llama, facts, desc, top_k=5).rates)
    close(run_sublayer_knockout(sim, facts, desc, depth=1.0, window=1, top_k=4).mlp,
          run_sublayer_knockout(llama, facts, desc, depth=1.0, window=1, top_k=4).mlp)
    kw = dict(noise_factor=3.0, samples=2, window=1, seed=0, progress=False)
    close(run_causal_tracing(sim, facts[:1], **kw).effects["hidden"],
          run_causal_tracing(llama, facts[:1], **kw).effects["hidden"])


def test_ch03_perplexity(sim, llama):
    from lmbook.mechanisms.likelihood import encode_texts, token_nll

    scored = encode_texts(llama, PROMPTS)
    close(token_nll(sim, scored), token_nll(llama, scored))
    # the chapter's adaptation section trains the model's top blocks: refused remote (test above)


def test_ch04_activation_addition(sim, llama):
    from lmbook.experiments.steering import contrast_vector, steered_generate, steered_target_logprobs

    sv, ref = contrast_vector(sim, "paris france", "rome italy", layers=[1]), contrast_vector(llama, "paris france",
                                                                                           "rome italy", layers=[1])
    close(sv.vectors, ref.vectors)
    close(steered_target_logprobs(sim, PROMPTS, sv, [(1, 2.0)], torch.arange(10)),
          steered_target_logprobs(llama, PROMPTS, ref, [(1, 2.0)], torch.arange(10)))
    configs = [(None, 0.0), (1, 50.0)]
    assert (steered_generate(sim, PROMPTS[0], sv, configs, max_new_tokens=4, sample=False)
            == steered_generate(llama, PROMPTS[0], ref, configs, max_new_tokens=4, sample=False))


def test_ch05_refusal_direction(sim, llama):
    from lmbook.experiments.refusal import encode_prompts, generate, last_logprobs, mean_diff_directions

    hb, sb = encode_prompts(llama, PROMPTS, "plain"), encode_prompts(llama, ["the colosseum is in rome"] * 3, "plain")
    cand = mean_diff_directions(sim, hb, sb, n_positions=1)
    close(cand, mean_diff_directions(llama, hb, sb, n_positions=1))
    d = cand[0, 1]
    close(last_logprobs(sim, hb, ablate=d), last_logprobs(llama, hb, ablate=d))
    assert generate(sim, PROMPTS[:2], "plain", ablate=d, max_new_tokens=4) == generate(llama, PROMPTS[:2], "plain",
                                                                                       ablate=d, max_new_tokens=4)


def test_ch06_task_vectors(sim, llama):
    from lmbook.data.tasks import Task, split_task
    from lmbook.experiments.taskvectors import run_task_vectors

    from tiny import WORDS

    words = [w for w in WORDS if w not in ("the", "a")]
    split = split_task(Task("shift", tuple(zip(words[:30], words[1:31])), "test"), n_val=4, n_test=5, min_demos=8,
                       seed=0)
    a, r = run_task_vectors(sim, split, k=3, n_dummy=2, seed=0), run_task_vectors(llama, split, k=3, n_dummy=2, seed=0)
    close(a.val_curve, r.val_curve)
    for k in r.greedy:  # greedy_tokens: a generation with a patched prompt pass
        assert np.array_equal(a.greedy[k], r.greedy[k]) and np.array_equal(a.first_token[k], r.first_token[k])
    assert a.generations == r.generations


def test_ch07_vector_arithmetic(sim, llama):
    from lmbook.experiments.arithmetic import lens_pair

    b = encode(llama, PROMPTS)
    arg, ans = torch.tensor([10, 11, 12]), torch.tensor([13, 14, 15])
    a, r = lens_pair(sim, b, arg, ans), lens_pair(llama, b, arg, ans)
    close(a.mlp, r.mlp)

