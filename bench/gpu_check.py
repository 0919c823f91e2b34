"""Device check: the library's traces on ``device="auto"`` (a GPU where there is one).

Builds the tiny random models of tests/tiny.py, loads each with ``load_model(path, device="auto")``
and checks, on whatever device that picks, the properties the CPU unit tests check: the logit lens
at the last layer equals the model's own output, batched and looped knockout sweeps agree, causal
tracing with zero noise gives back the clean probability, patching a prompt into itself changes
nothing; and for chapters 3-7: cached lower blocks give the full model's losses, a zero steering
coefficient changes nothing, directional ablation leaves the residual stream orthogonal to the
direction, a task-vector sweep that patches each prompt's own states changes nothing, the
sublayer writes add up to the residual stream, and merged LoRA adapters equal the hooked ones.
Prints the device and one line per check; exits 1 on any failure.
Usage: python bench/gpu_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402

from lmbook.experiments.arithmetic import sublayer_writes  # noqa: E402
from lmbook.experiments.causal_tracing import causal_trace  # noqa: E402
from lmbook.mechanisms.training import attach_lora  # noqa: E402
from lmbook.mechanisms.interventions import hidden_states  # noqa: E402
from lmbook.experiments.perplexity import cached_nll, encode_texts, prefix_states, token_nll  # noqa: E402
from lmbook.experiments.refusal import ablated_residuals, encode_prompts, last_logprobs  # noqa: E402
from lmbook.experiments.steering import contrast_vector, steered_target_logprobs  # noqa: E402
from lmbook.experiments.taskvectors import intervene_sweep, next_token  # noqa: E402
from lmbook.mechanisms.knockout import group_facts, knockout_sweep, knockout_sweep_looped  # noqa: E402
from lmbook.mechanisms.readout import logit_lens  # noqa: E402
from lmbook.core.models import load_model, model_device  # noqa: E402
from lmbook.mechanisms.interventions import last_token_logprobs, patch_sweep  # noqa: E402
from lmbook.core.tokens import encode  # noqa: E402

PROMPTS = ["the eiffel tower is located in the city of", "michael jordan plays the sport of"]
SUBJECTS = ["eiffel tower", "michael jordan"]


def main() -> int:
    failures = 0
    root = Path(tempfile.mkdtemp())
    print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    for family in ["llama", "gemma3", "gpt2", "gptj"]:
        model = load_model(str(tiny.build(family, root / family)), device="auto", dtype=torch.float32)
        dev = model_device(model)
        b = encode(model, PROMPTS)
        checks = {}
        lens = logit_lens(model, b, targets=torch.tensor([5, 6]), k=1)
        lp = last_token_logprobs(model, b)
        checks["lens == output"] = float((lens.target_logprobs[-1, :, 0] - lp[:, [5, 6]]).abs().max())
        g = group_facts(model, PROMPTS[:1], SUBJECTS[:1], torch.tensor([10]))[0]
        checks["knockout batched == looped"] = float((knockout_sweep(model, g, window=2) - knockout_sweep_looped(model, g, window=2)).abs().max())
        r = causal_trace(model, b.select([0]), (2, 4), 10, noise=0.0, samples=2, window=2)
        checks["tracing, zero noise"] = max(abs(r.p_clean - r.p_corrupt), max(float(v.abs().max()) for v in r.effects.values()))
        p = patch_sweep(model, b.select([0]), b.select([0]))
        checks["self-patch"] = float((p[1:] - p[:1]).abs().max())
        checks.update(chapter_checks(model, b))
        if family in ("llama", "gemma3"):
            checks.update(protocol_checks(model))
        for name, err in checks.items():
            ok = err < 1e-4
            failures += not ok
            print(f"{family:7s} on {dev}: {name:28s} max error {err:.1e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


def _guard(out: dict, name: str, fn) -> None:
    """Run one check; an exception is a failure (reported with its last line) that stops no other check."""
    try:
        out[name] = float(fn())
    except Exception as e:  # noqa: BLE001 - the check reports any error as a failure
        import traceback

        tb = traceback.extract_tb(e.__traceback__)[-1]
        print(f"    {name}: {type(e).__name__}: {e} ({Path(tb.filename).name}:{tb.lineno})")
        out[name] = float("inf")


def chapter_checks(model, b) -> dict[str, float]:
    """The properties chapters 3-7 rely on, as max errors (relative where noted)."""
    out: dict[str, float] = {}
    sc = encode_texts(model, PROMPTS)
    pb = encode_prompts(model, PROMPTS, fmt="plain")

    def ch3():
        full = token_nll(model, sc).cpu()
        return (cached_nll(model, sc, prefix_states(model, sc, 1), 1).cpu() - full).abs().max()

    def ch4():
        sv = contrast_vector(model, "paris", "rome", layers=[0, 1])
        lp = steered_target_logprobs(model, PROMPTS, sv, [(None, 0.0), (1, 0.0)], torch.arange(10))
        return (lp[0] - lp[1]).abs().max()

    def ch5():
        r = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(1))
        res = ablated_residuals(model, pb, r).float().cpu()
        return (res @ (r / r.norm())).abs().max() / res.norm(dim=-1).max()

    def ch6():
        targets = torch.tensor([5, 6])  # one target token per prompt
        clean = next_token(model, b, targets)
        sweep = intervene_sweep(model, b, hidden_states(model, b), range(model.num_layers), targets=targets)
        return (sweep.target_logprob.cpu() - clean.target_logprob.cpu()).abs().max()

    def ch7():
        w = sublayer_writes(model, b)
        with torch.no_grad():
            hs = model._model(**{k: v.to(model_device(model)) for k, v in b.inputs().items()},
                              output_hidden_states=True).hidden_states
        return max(float((hs[l][b.rows(), b.last].cpu() + w["attn"][l].cpu() + w["mlp"][l].cpu()
                          - w["resid"][l].cpu()).abs().max()) for l in range(model.num_layers))

    for name, fn in [("ch3 cached lower blocks", ch3), ("ch4 zero coefficient", ch4),
                     ("ch5 ablation orthogonal (rel.)", ch5), ("ch6 task-vector self-patch", ch6),
                     ("ch7 sublayer writes add up", ch7)]:
        _guard(out, name, fn)
    if type(model._model).__name__.startswith(("GPT2", "GPTJ")):
        return out  # GPT-2's Conv1D layers take no LoRA adapters (attach_lora says so); GPT-J is not fine-tuned here

    def lora():
        base = last_logprobs(model, pb).cpu()
        adapters = attach_lora(model, [0], rank=2, seed=0)
        with torch.no_grad():
            for B in adapters.B:
                B.normal_()
        hooked = last_logprobs(model, pb).cpu()
        adapters.merge()
        if torch.allclose(hooked, base):
            raise AssertionError("the adapters did not change the output")
        return (last_logprobs(model, pb).cpu() - hooked).abs().max()

    _guard(out, "ch5 LoRA merge", lora)
    return out


def protocol_checks(model) -> dict[str, float]:
    """Each chapter's whole protocol on ``model``'s device: it must run and give finite numbers
    (error 0), or it fails (error inf, with the exception printed)."""
    import dataclasses

    from lmbook.experiments.arithmetic import relation_edits, relation_lens
    from lmbook.mechanisms.training import finetune
    from lmbook.experiments.perplexity import adapt, restore_after, top_layer_parameters
    from lmbook.experiments.refusal import generate, mean_diff_directions, select_direction, text_nll
    from lmbook.experiments.steering import steered_generate, steered_nll
    from lmbook.data.tasks import Task, split_task
    from lmbook.experiments.taskvectors import run_function_vector, run_task_vectors

    out: dict[str, float] = {}

    def finite(*xs) -> float:
        return 0.0 if all(torch.isfinite(torch.as_tensor(x, dtype=torch.float32)).all() for x in xs) else float("inf")

    def ch3():
        sc = encode_texts(model, PROMPTS)
        st = prefix_states(model, sc, 1)
        with restore_after(top_layer_parameters(model, 1)):
            r = adapt(model, sc, st, {"t": (sc, st)}, n_train_layers=1, lr=1e-3, epochs=1, batch_size=1, eval_every=1)
        return finite(r.eval_nats["t"])

    def ch4():
        sv = contrast_vector(model, "paris", "rome", layers=[1])
        gens = steered_generate(model, PROMPTS[0], sv, [(None, 0.0), (1, 4.0)], max_new_tokens=4, seed=0)
        s, c = steered_nll(model, PROMPTS, sv, [(None, 0.0), (1, 4.0)])
        return finite(s, c) if len(gens) == 2 else float("inf")

    def ch5():
        hb, sb = encode_prompts(model, PROMPTS, "plain"), encode_prompts(model, PROMPTS[::-1], "plain")
        cand = mean_diff_directions(model, hb, sb, n_positions=1)
        sel = select_direction(model, cand, hb, sb, refusal_ids=[5, 6], max_layer_fraction=1.0, kl_threshold=10.0,
                               top_k=2, progress=False)
        generate(model, PROMPTS, "plain", ablate=sel.direction, max_new_tokens=3)
        generate(model, PROMPTS, "plain", add={sel.layer: sel.direction}, max_new_tokens=3)
        res = finetune(model, [(p, " yes") for p in PROMPTS], method="lora", layers=[0], steps=2, batch_size=2,
                       lr=1e-3, rank=2, add_special_tokens=True, progress=False)
        s, c = text_nll(model, hb, ablate=sel.direction)
        return finite(sel.bypass, res.losses, s, c)

    def ch6():
        words = [w for w in tiny.WORDS if w not in ("the", "a")]
        task = Task("shift", tuple((a, b) for a, b in zip(words[:30], words[1:31])), "gpu")
        split = split_task(task, n_val=4, n_test=5, min_demos=8, seed=0)
        r = run_task_vectors(model, split, k=3, n_dummy=2, seed=0)
        fv = run_function_vector(model, split, k=3, n_clean=4, n_corrupted=3, n_heads_grid=[1, 2], seed=0)
        return finite(r.val_curve, fv.effects)

    def ch7():
        words = ["paris", "rome", "france", "italy", "red", "blue", "green", "one", "two", "three", "city", "tower"]
        rl = relation_lens(model, "toy", list(zip(words[::2], words[1::2])), "capital of {} is", layer=1)
        fake = dataclasses.replace(rl, usable=torch.ones(len(rl.items), dtype=torch.bool))
        ed = relation_edits(model, fake, n_source=2, n_sweep=2, scales=[1])
        return finite(ed.vector)

    for name, fn in [("ch3 protocol runs", ch3), ("ch4 protocol runs", ch4), ("ch5 protocol runs", ch5),
                     ("ch6 protocol runs", ch6), ("ch7 protocol runs", ch7)]:
        _guard(out, name, fn)
    return out


if __name__ == "__main__":
    sys.exit(main())
