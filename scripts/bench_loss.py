"""The training loss alone: s2ft's memory-lean loss through a frozen head against
transformers' (the batch's full-vocabulary logits, then cross-entropy), forward and
backward with respect to the hidden states, in one process with the two alternating.

The lean loss takes the hidden states through the head a chunk of rows at a time
(``losses.chunk_rows``) and forms d(loss)/d(hidden) in the same pass; its one buffer is a
chunk of float32 logits, against transformers' full logits and their log-probabilities.

    python scripts/bench_loss.py                          # LLaMA-2's and LLaMA-3's vocabularies
    python scripts/bench_loss.py --vocab 151936 --tokens 2047
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from s2ft_cli.engine import losses


def transformers_loss(hidden, head, labels) -> None:
    logits = head(hidden).float()
    F.cross_entropy(logits, labels, reduction="sum").backward()


def lean_loss(rows: int | None):
    """The lean loss with the toolkit's chunks (``rows=None``) or chunks of ``rows`` rows."""

    def loss(hidden, head, labels) -> None:
        saved = losses.CHUNK_LOGITS, losses.CHUNK_ROWS
        if rows is not None:
            losses.CHUNK_LOGITS, losses.CHUNK_ROWS = 0, rows
        try:
            losses.token_losses(hidden, head, labels).sum().backward()
        finally:
            losses.CHUNK_LOGITS, losses.CHUNK_ROWS = saved

    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="32000,128256", help="vocabulary sizes, comma-separated")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=511, help="target positions in the batch")
    ap.add_argument("--repeats", type=int, default=6, help="timings of each (the first dropped)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rows",
        default="",
        help="also time chunks of these many rows, e.g. 32,131 (comma-separated)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.tokens} target positions")
    for vocab in (int(v) for v in args.vocab.split(",")):
        g = torch.Generator().manual_seed(0)
        head = torch.nn.Linear(args.hidden, vocab, bias=False).requires_grad_(False)
        head.weight.normal_(0, 0.02, generator=g)
        hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_(True)
        labels = torch.randint(0, vocab, (args.tokens,), generator=g)
        # name -> (rows per chunk, the loss); transformers' has no chunks
        methods = {"transformers": (None, transformers_loss)}
        rows = min(losses.chunk_rows(vocab), args.tokens)
        methods[f"lean, {rows} rows"] = (rows, lean_loss(None))
        for r in (int(r) for r in args.rows.split(",") if r):
            methods[f"lean, {r} rows"] = (r, lean_loss(r))
        times = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, (_, loss) in methods.items():
                start = time.perf_counter()
                loss(hidden, head, labels)
                times[name].append(time.perf_counter() - start)
                hidden.grad = None
        base = statistics.median(times["transformers"][1:])
        full = args.tokens * vocab * 4 / 2**20
        print(f"vocab {vocab}: transformers {base:.3f} s, logits {full:.0f} MiB")
        for name, (rows, _) in list(methods.items())[1:]:
            chunk = rows * vocab * 4 / 2**20
            median = statistics.median(times[name][1:])
            print(f"  {name}: {median:.3f} s ({median / base:.2f}×), one chunk {chunk:.0f} MiB")


if __name__ == "__main__":
    main()
