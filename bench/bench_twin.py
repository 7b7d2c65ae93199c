"""Twin-Merging inference: TwinModel against the reference's per-sample dense rebuild and against
the shared model alone.

    python bench/bench_twin.py [--device cpu|cuda] [--batch 32 256] [--length 32] [--tasks 3]
                               [--rank-ratio 0.1] [--json rows.jsonl] [--profile]

A BERT encoder with all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, vocabulary 30522;
random weights from the config, nothing downloaded) and a 3-way classification head; T experts
made by perturbing every weight. Per batch size, timed with :func:`meldkit.bench.time_impls`:

* ``shared``: the shared model's forward alone (θ_s, one static model);
* ``twin``: ``TwinModel`` with given router weights: θ_s·x plus each sample's mix of the rank-r
  exclusive parts on the activations (``meldkit.ops.routed_lora``, gate mode);
* ``twin_top1``: ``twin`` with top-1 routing weights (``TwinModel(top_k=1)``): on the CPU each
  expert then runs only on the samples routed to it;
* ``twin+router``: the same plus the router (the shared model's features, then the MLP): what a
  call without ``weights`` costs;
* ``rebuild``: the reference code's way, ``materialize=True``: for every sample the dense merged
  weights θ_s + Σ_t w_t·v_t are rebuilt and the model runs on that sample alone.

The issue's targets: ``twin`` at least 10x faster than ``rebuild``, and within 1.3x of ``shared``.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from meldkit.bench import cache_flusher, run_metadata, time_impls, write_rows


def build(args):
    import transformers

    from meldkit import twin

    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_labels=3,
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    experts = []
    for t in range(args.tasks):
        e = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        experts.append(e)
    ex = twin.build(base, experts, rank_ratio=args.rank_ratio, progress=False)
    model = twin.TwinModel(base, ex).to(args.device).eval()
    model.router.trained = True  # timings only: the routing's values do not matter here
    return model, ex


def make_impls(model, ids, mask, w, n_rebuild):
    """The timed calls of one batch: (shared, twin, twin_top1, twin+router) and the rebuild."""
    w1 = torch.zeros_like(w).scatter_(1, w.argmax(-1, keepdim=True), 1.0)

    @torch.no_grad()
    def shared():
        model.routing.mode = "plain"
        model.model(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def twin_given():
        model(input_ids=ids, attention_mask=mask, weights=w)

    @torch.no_grad()
    def twin_top1():
        model(input_ids=ids, attention_mask=mask, weights=w1)

    @torch.no_grad()
    def twin_routed():
        model(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def rebuild():
        model(
            input_ids=ids[:n_rebuild],
            attention_mask=mask[:n_rebuild],
            weights=w[:n_rebuild],
            materialize=True,
        )

    impls = {"shared": shared, "twin": twin_given, "twin_top1": twin_top1}
    return {**impls, "twin+router": twin_routed}, rebuild


def profile_table(call, device: str, rows: int = 25) -> str:
    """torch.profiler's table of one ``call`` (after one untimed call), by host time: where a
    forward that should be bound by the GPU waits on the host instead (op count, launches,
    ``cudaStreamSynchronize``/``aten::item``: the synchronisations)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        call()
        if device == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--rank-ratio", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--rebuild-samples",
        type=int,
        default=None,
        help="time the rebuild on this many samples and scale (default: all)",
    )
    ap.add_argument("--json", help="append one JSON row per implementation and batch here")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print, per batch, torch.profiler's op table of one shared and one twin "
        "forward (host time per op, kernel launches, synchronisations)",
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_twin: no CUDA device", file=sys.stderr)
        return 2
    model, ex = build(args)
    storage = ex.storage()
    flush = cache_flusher(args.device)
    meta = run_metadata()
    print(
        f"BERT 6x384 (MiniLM shape), {args.tasks} experts, rank {args.rank_ratio:.0%}, "
        f"length {args.length}, {args.device}; twin storage "
        f"{storage['twin'] / 2**20:.1f} MiB vs {storage['experts'] / 2**20:.1f} MiB of dense "
        "experts"
    )
    for b in args.batch:
        gen = torch.Generator().manual_seed(b)
        ids = torch.randint(1000, 30000, (b, args.length), generator=gen).to(args.device)
        mask = torch.ones_like(ids)
        w = torch.softmax(torch.randn(b, args.tasks, generator=gen), -1).to(args.device)
        n_rebuild = min(b, args.rebuild_samples or b)

        impls, rebuild = make_impls(model, ids, mask, w, n_rebuild)
        times = time_impls(impls, args.device, flush=flush, repeats=args.repeats)
        times["rebuild"] = time_impls(
            {"rebuild": rebuild}, args.device, flush=flush, warmup=1, repeats=args.repeats or 3
        )["rebuild"]
        scale = {"rebuild": b / n_rebuild}
        base_s = times["shared"].median_s
        twin_s = times["twin"].median_s
        print(
            f"\nbatch {b}"
            + (f" (rebuild timed on {n_rebuild} samples, scaled)" if n_rebuild < b else "")
        )
        for name, t in times.items():
            s = t.median_s * scale.get(name, 1.0)
            print(
                f"  {name:<12} {s * 1e3:10.2f} ms  {s / base_s:6.2f}x shared  "
                f"{b / s:9.1f} samples/s"
            )
        if args.profile:
            for name in ("shared", "twin"):
                print(f"\n  torch.profiler, one {name} forward, batch {b}:")
                print(profile_table(impls[name], args.device))
        rebuild_s = times["rebuild"].median_s * scale["rebuild"]
        print(
            f"  twin vs rebuild: {rebuild_s / twin_s:.1f}x faster (target ≥ 10x); twin / shared "
            f"{twin_s / base_s:.2f}x (target ≤ 1.3x); top-1 routing "
            f"{times['twin_top1'].median_s / base_s:.2f}x; with the router "
            f"{times['twin+router'].median_s / base_s:.2f}x"
        )
        if args.json:
            write_rows(
                args.json,
                [
                    {
                        **meta,
                        "bench": "twin",
                        "batch": b,
                        "length": args.length,
                        "tasks": args.tasks,
                        "rank_ratio": args.rank_ratio,
                        "impl": name,
                        "median_s": t.median_s * scale.get(name, 1.0),
                        "device": args.device,
                    }
                    for name, t in times.items()
                ],
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
