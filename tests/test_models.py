"""load_model: names, the packaged-model cache, and nnterp's standard names on tiny models."""

import json
import os

import pytest
import torch

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

from conftest import PROMPTS
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
        from safetensors.torch import save_file

        calls.append(gguf)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"from": str(gguf)}))
        save_file({"w": torch.zeros(4)}, str(out / "model.safetensors"))

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
    left = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert left == ["smollm2-135m-instruct"], "no temporary folders left behind"


def test_killed_conversion_leaves_no_trusted_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(tmp_path))

    def dies_halfway(gguf, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_packaged("smollm2-135m-instruct", converter=dies_halfway)
    left = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert left == [], "a killed conversion must leave nothing behind"


def test_unstamped_or_stale_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(tmp_path))
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"left by a crash before stamps existed")
    calls = []
    prepare_packaged("smollm2-135m-instruct", converter=_fake_converter(calls))
    assert len(calls) == 1 and (target / "model.safetensors").read_bytes() != b"left by a crash before stamps existed"
    stamp = json.loads((target / "lmbook.json").read_text())
    stamp["version"] = "0.0.0"
    (target / "lmbook.json").write_text(json.dumps(stamp))
    prepare_packaged("smollm2-135m-instruct", converter=_fake_converter(calls))
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["smollm2-135m-instruct"]


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


# --- faults: a damaged cache, concurrent and killed conversions, load failures, the hub (issue 17) ---

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from lmbook.core.models import ModelLoadError, check_cache, model_depth  # noqa: E402
from lmbook.core.params import LmbookError  # noqa: E402

SMOL = "smollm2-135m-instruct"  # its GGUF file is located in place, without assembling parts


def _safetensors_converter(calls):
    """A stand-in for the real conversion: a config and a small but valid safetensors file."""

    def convert(gguf, out):
        from safetensors.torch import save_file

        calls.append(gguf)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
        save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(out / "model.safetensors"))

    return convert


def test_truncated_weights_are_reported_and_converted_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(tmp_path))
    calls = []
    target = prepare_packaged(SMOL, converter=_safetensors_converter(calls))
    assert check_cache(SMOL) is None and "files" in json.loads((target / "lmbook.json").read_text())
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, the stamp left as it was
    problem = check_cache(SMOL)
    assert problem and "model.safetensors" in problem and "truncated" in problem
    prepare_packaged(SMOL, converter=_safetensors_converter(calls))
    assert len(calls) == 2 and check_cache(SMOL) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and "converting" in err[0] and "truncated" in err[0]


def test_damaged_header_is_caught_even_with_an_old_stamp(tmp_path, monkeypatch):
    """A stamp from before sizes were recorded: the safetensors header check still finds the damage."""
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(tmp_path))
    calls = []
    target = prepare_packaged(SMOL, converter=_safetensors_converter(calls))
    stamp = json.loads((target / "lmbook.json").read_text())
    del stamp["files"]
    (target / "lmbook.json").write_text(json.dumps(stamp))
    assert check_cache(SMOL) is None  # intact weights: accepted, and the sizes are recorded now
    assert "files" in json.loads((target / "lmbook.json").read_text())
    (target / "lmbook.json").write_text(json.dumps(stamp))  # the old stamp again
    w = target / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-8])
    assert "header describes" in check_cache(SMOL)
    w.write_bytes(b"\x00" * 3)
    assert "less than a header" in check_cache(SMOL)
    prepare_packaged(SMOL, converter=_safetensors_converter(calls))
    assert len(calls) == 2 and check_cache(SMOL) is None


def test_deleted_stamp_means_a_new_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(tmp_path))
    calls = []
    target = prepare_packaged(SMOL, converter=_safetensors_converter(calls))
    (target / "lmbook.json").unlink()
    assert "no lmbook.json stamp" in check_cache(SMOL)
    prepare_packaged(SMOL, converter=_safetensors_converter(calls))
    assert len(calls) == 2 and check_cache(SMOL) is None


_WORKER = r"""
import json, os, sys, time
from pathlib import Path
from lmbook.core.models import prepare_packaged

log = Path(sys.argv[1])

def convert(gguf, out):
    from safetensors.torch import save_file
    import torch
    with open(log, "a") as f:
        f.write(f"start {os.getpid()}\n")
    out.mkdir(parents=True)
    save_file({"w": torch.zeros(10)}, str(out / "model.safetensors"))
    (out / "config.json").write_text("{}")
    time.sleep(float(sys.argv[2]))  # a slow conversion: the other process must wait, not convert again
    with open(log, "a") as f:
        f.write(f"end {os.getpid()}\n")

print(prepare_packaged("smollm2-135m-instruct", converter=convert))
"""


def _worker(tmp_path, sleep, env_cache):
    env = {**os.environ, "LMBOOK_MODEL_CACHE": str(env_cache), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "log.txt"), str(sleep)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_conversions_convert_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [_worker(tmp_path, 2.0, cache) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0].strip() == outs[1][0].strip() == str(cache / SMOL)
    log = (tmp_path / "log.txt").read_text().split()
    assert log.count("start") == 1 and log.count("end") == 1, "the second process must wait and reuse"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [SMOL]
    assert (cache / SMOL / "lmbook.json").is_file()


def test_killed_conversion_leftover_is_removed_next_time(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    p = _worker(tmp_path, 600, cache)
    deadline = time.time() + 60
    while not ((tmp_path / "log.txt").is_file() and "start" in (tmp_path / "log.txt").read_text()):
        assert time.time() < deadline and p.poll() is None, p.communicate()[1][-2000:]
        time.sleep(0.1)
    p.kill()  # SIGKILL: no finally block runs
    p.wait()
    leftovers = [q for q in cache.iterdir() if q.is_dir() and q.name.startswith(f".{SMOL}.")]
    assert leftovers, "the killed conversion's temporary folder is left behind"
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(cache))
    calls = []
    prepare_packaged(SMOL, converter=_safetensors_converter(calls))
    assert len(calls) == 1
    assert sorted(q.name for q in cache.iterdir() if not q.name.endswith(".lock")) == [SMOL]


def test_converter_failure_is_one_lmbook_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LMBOOK_MODEL_CACHE", str(tmp_path))

    def fails(gguf, out):
        raise OSError(28, "No space left on device")

    with pytest.raises(ModelLoadError, match="converting 'smollm2-135m-instruct' .* failed: OSError: .*No space left"):
        prepare_packaged(SMOL, converter=fails)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_damaged_local_checkpoint_fails_with_one_line_naming_the_cause(tmp_path):
    import tiny

    folder = tiny.build("llama", tmp_path / "llama")
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and "could not load the local model" in msg
    assert isinstance(e.value, LmbookError) and e.value.__cause__ is not None


@pytest.mark.parametrize("device,match", [
    ("cuda:x", "unknown DEVICE 'cuda:x'"),
    ("cuda:99", "DEVICE='cuda:99'"),
    ("gpu", "unknown DEVICE 'gpu'"),
])
def test_devices_are_checked_before_loading(device, match):
    with pytest.raises(ParameterError, match=match):
        load_model("gemma-3-270m", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ParameterError, match="no usable CUDA GPU"):
        load_model("gemma-3-270m", device="cuda")


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_unreachable_hub_fails_fast_in_one_line(kind, monkeypatch):
    """A hub that refuses connections, and one that accepts them but never answers: both fail
    within the probe's timeout, in one line that names the packaged models."""
    import socket

    import huggingface_hub.constants

    import lmbook.core.models as models

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if kind == "silent":
        server.listen(4)  # accepts into the backlog, never reads or answers
    else:
        server.close()  # nothing listens: the connection is refused
    endpoint = f"http://127.0.0.1:{port}"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(models, "HUB_TIMEOUT_S", 1.0)
    from transformers import AutoConfig  # noqa: F401 - imported before timing, as a chapter has
    t = time.time()
    try:
        with pytest.raises(ModelNotAvailableError) as e:
            load_model("nobody-here/not-a-model-xyz", device="cpu")
    finally:
        server.close()
    assert time.time() - t < 4.0
    msg = str(e.value)
    assert "\n" not in msg and f"the model hub {endpoint} cannot be reached" in msg and "gemma-3-270m" in msg
    assert ("timed out" in msg or "no answer within" in msg) if kind == "silent" else "refused" in msg


def test_model_depth_from_the_config(tmp_path):
    assert model_depth("gemma-3-270m") == 18 and model_depth(SMOL) == 30
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 7}}))
    assert model_depth(str(tmp_path)) == 7
    assert model_depth("nobody-here/not-a-model-xyz") is None  # not in the local hub cache: checked after loading


def test_empty_model_name_is_not_the_current_folder():
    with pytest.raises(ModelNotAvailableError, match="MODEL='' is empty"):
        check_model_name("")
    with pytest.raises(ModelNotAvailableError, match=r"LENS_MODELS\[1\]"):
        check_model_name("nope", "LENS_MODELS[1]")


def test_load_copy_is_a_dispatched_lower_precision_twin(llama):
    """``load_copy``: the same checkpoint in bfloat16 (weights loaded, not left on the meta device),
    close to the float32 model's output, with the model's own tokenizer; the model itself when the
    dtype already matches."""
    from lmbook.core.models import load_copy, model_dtype

    assert load_copy(llama, "float32") is llama
    fast = load_copy(llama, "bfloat16")
    assert fast is not llama and model_dtype(fast) == torch.bfloat16 and model_dtype(llama) == torch.float32
    assert fast.tokenizer is llama.tokenizer  # shared, not read again
    ids = encode(llama, PROMPTS[:1], start=True).input_ids
    with torch.no_grad():
        emb = fast._model.get_input_embeddings()(ids)  # a module called directly: needs real weights
        a = llama._model(ids).logits.float().log_softmax(-1)
        b = fast._model(ids).logits.float().log_softmax(-1)
    assert emb.dtype == torch.bfloat16 and not emb.is_meta
    assert (a - b).abs().max() < 0.1 and not torch.equal(a, b)
    # the copy takes the model's current weights, not the checkpoint's: a changed model is copied changed
    w = llama._model.get_input_embeddings().weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(2.0)
        twice = load_copy(llama, "bfloat16")._model.get_input_embeddings().weight
        torch.testing.assert_close(twice.float(), (2.0 * saved).to(torch.bfloat16).float())
    finally:
        with torch.no_grad():
            w.copy_(saved)
    with pytest.raises(ParameterError, match="unknown dtype 'half'"):
        load_copy(llama, "half")


def test_unembedding_gets_a_contiguous_input_without_changing_values(llama):
    """The pre-hook load_model puts on the unembedding: a strided slice (what generation passes) gives the
    same logits as its contiguous copy, and in bfloat16 no per-row copy of the weight is made."""
    from lmbook.core.models import _contiguous_head, load_copy

    head = llama._model.get_output_embeddings()
    assert getattr(head, "_lmbook_contiguous", False)
    h = torch.randn(3, 5, llama.hidden_size)
    last = h[:, -1:]  # [3, 1, d], not contiguous
    assert not last.is_contiguous() and _contiguous_head(head, (h,)) is None
    fixed = _contiguous_head(head, (last,))[0]
    assert fixed.is_contiguous() and torch.equal(fixed, last)
    with torch.no_grad():
        torch.testing.assert_close(head(last), head(last.contiguous()))
    fast = load_copy(llama, "bfloat16")
    fhead = fast._model.get_output_embeddings()
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        fhead(last.to(torch.bfloat16))
    copies = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::copy_"
              and any(len(s) == 3 and s[-1] == fhead.weight.shape[0] for s in e.input_shapes)]
    assert not copies, "the bfloat16 unembedding copied its weight per row"
