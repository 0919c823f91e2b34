"""load_model: names, the packaged-model cache, and nnterp's standard names on tiny models."""

import json
import os

import pytest
import torch

from conftest import PROMPTS
from lmbook import ParameterError
from lmbook.core.models import (
    PACKAGED_MODELS,
    ModelNotAvailableError,
    check_model_name,
    load_model,
    packaged_checkpoint,
    prepare_packaged,
)
from lmbook.core.tokens import encode
from tiny import FAMILIES


def test_check_model_name_kinds(tmp_path):
    assert check_model_name("gemma-3-270m") == "packaged"
    assert check_model_name("smollm2-135m-instruct") == "packaged"
    assert check_model_name("google/gemma-3-270m") == "hub"
    (tmp_path / "config.json").write_text("{}")
    assert check_model_name(str(tmp_path)) == "local"


@pytest.mark.parametrize("bad", ["no-such-model", "gpt 2", "", "a/b/c"])
def test_unknown_model_names_list_the_packaged_models(bad):
    with pytest.raises(ModelNotAvailableError) as e:
        load_model(bad)
    for name in PACKAGED_MODELS:
        assert name in str(e.value)
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize("bad", [3, None, ["gemma-3-270m"]])
def test_model_name_of_wrong_type(bad):
    with pytest.raises(ParameterError, match="MODEL must be a string"):
        load_model(bad)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        check_model_name(str(tmp_path))


def test_unreachable_hub_id_names_packaged_models(monkeypatch):
    import huggingface_hub.constants

    # Offline mode gives the same failure as an unreachable hub, without waiting on the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError) as e:
        load_model("nobody-here/not-a-model-xyz", device="cpu")
    assert "gemma-3-270m" in str(e.value) and "smollm2-135m-instruct" in str(e.value)


def test_bad_device_and_remote_flags():
    with pytest.raises(ParameterError, match="DEVICE"):
        load_model("gemma-3-270m", device="tpu")
    with pytest.raises(ParameterError, match="remote"):
        load_model("gemma-3-270m", remote=True)


# --- the packaged-model cache is written atomically ---------------------------------------


def _fake_converter(calls):
    def convert(gguf, out):
        calls.append(gguf)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"from": str(gguf)}))

    return convert


def test_prepare_packaged_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(tmp_path))
    calls = []
    path = prepare_packaged("smollm2-135m-instruct", converter=_fake_converter(calls))
    assert path == packaged_checkpoint("smollm2-135m-instruct") == tmp_path / "smollm2-135m-instruct"
    assert (path / "config.json").is_file() and (path / "lmbook.json").is_file()
    assert calls and calls[0].name.endswith(".gguf") and calls[0].is_file()
    prepare_packaged("smollm2-135m-instruct", converter=_fake_converter(calls))
    assert len(calls) == 1, "a valid cache must be reused, not converted again"
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"], "no temporary folders left behind"


def test_killed_conversion_leaves_no_trusted_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(tmp_path))

    def dies_halfway(gguf, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_packaged("smollm2-135m-instruct", converter=dies_halfway)
    assert list(tmp_path.iterdir()) == [], "a killed conversion must leave nothing behind"


def test_unstamped_or_stale_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(tmp_path))
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"left by a crash before stamps existed")
    calls = []
    prepare_packaged("smollm2-135m-instruct", converter=_fake_converter(calls))
    assert len(calls) == 1 and not (target / "model.safetensors").exists()
    stamp = json.loads((target / "lmbook.json").read_text())
    stamp["version"] = "0.0.0"
    (target / "lmbook.json").write_text(json.dumps(stamp))
    prepare_packaged("smollm2-135m-instruct", converter=_fake_converter(calls))
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]


# --- nnterp's standard names agree with each family's own forward pass --------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_standard_names_match_the_models_own_forward(family, tiny_models):
    model = tiny_models[family]
    batch = encode(model, PROMPTS)
    hf = model._model
    with torch.no_grad():
        ref = hf(**batch.inputs(), output_hidden_states=True, output_attentions=True)
    n = model.num_layers
    assert n == hf.config.num_hidden_layers
    with torch.no_grad(), model.trace(batch.inputs()):
        probs = list().save()
        layers = list().save()
        for layer in range(n):
            probs.append(model.attention_probabilities[layer])
            layers.append(model.layers_output[layer])
        lens_last = model.project_on_vocab(model.layers_output[n - 1]).save()
        logits = model.logits.save()
    mask = batch.attention_mask.bool()
    # The logit lens at the last layer is the model's own output.
    torch.testing.assert_close(lens_last[mask], ref.logits[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[mask], ref.logits[mask], atol=1e-5, rtol=1e-5)
    # Hidden states after layers 0..n-2 are transformers' hidden_states[1..n-1] (the last one is normed).
    for layer in range(n - 1):
        torch.testing.assert_close(layers[layer][mask], ref.hidden_states[layer + 1][mask], atol=1e-5, rtol=1e-5)
    # Attention probabilities: the model's own, rows summing to one over real tokens.
    for layer in range(n):
        torch.testing.assert_close(probs[layer], ref.attentions[layer], atol=1e-5, rtol=1e-5)
        rows = probs[layer].sum(-1)[mask[:, None, :].expand_as(probs[layer].sum(-1))]
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=1e-5)


def test_parameters_are_frozen(llama):
    assert not any(p.requires_grad for p in llama._model.parameters())
    assert llama.lmbook_remote is False


@pytest.mark.skipif(not os.environ.get("LMBOOK_TEST_PACKAGED", "1") == "1", reason="packaged models disabled")
@pytest.mark.parametrize("name,n_layers,d", [("gemma-3-270m", 18, 640), ("smollm2-135m-instruct", 30, 576)])
def test_packaged_models_load_offline(name, n_layers, d):
    model = load_model(name, device="cpu")
    assert (model.num_layers, model.hidden_size) == (n_layers, d)
    assert model.attn_probs_available
