"""Decode cost on the llama.cpp runtime: one forward of N new tokens after a fixed context.

For N = 1 .. 32 (default), target and draft of the pair, as a chain (``chain_mask``) and as a
tree of the same size (a root with N - 1 children: the widest mask), through the runtime
protocol (chains: ``mcsd.budget.StepCost.probe``, the median of ``--repeats`` after a warm-up;
the star: the fastest of ``--repeats``). Prints a
table of milliseconds and multiples of the N = 1 cost and writes it as JSON.

    python bench/llamacpp_decode_cost.py --threads 2 --out bench-out/decode_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mcsd.api import load_pair
from mcsd.budget import StepCost
from mcsd.config import LlamaCppConfig
from mcsd.models.base import Runtime, chain_mask


def star_time(model: Runtime, context: list[int], n: int, repeats: int) -> float:
    """Seconds of one forward of a root and ``n - 1`` children after ``context`` (fastest)."""
    model.reset()
    c = len(context)
    model.forward(torch.tensor([context]), torch.arange(c)[None], chain_mask(c))
    model.commit()
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:, 0] = True
    mask[torch.arange(n), torch.arange(n)] = True
    positions = torch.tensor([[c] + [c + 1] * (n - 1)])
    ids = torch.tensor([[context[i % c] for i in range(n)]])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.forward(ids, positions, mask)
        times.append(time.perf_counter() - started)
        model.commit([[]])
    model.reset()
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None)
    parser.add_argument("--draft", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--context", type=int, default=200, help="tokens before the timed forward")
    parser.add_argument("--sizes", default=",".join(map(str, range(1, 33))))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args = parser.parse_args()

    pair = load_pair(
        args.target, args.draft, runtime="llama.cpp", llamacpp=LlamaCppConfig(threads=args.threads)
    )
    text = "def fibonacci(n):\n    '''Return the n-th Fibonacci number.'''\n" * 40
    context = pair.tokenizer(text)["input_ids"][: args.context]
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for role, model in (("target", pair.target), ("draft", pair.draft)):
        chains = StepCost.probe(model, sizes, context=context, repeats=args.repeats)
        for n in sizes:
            chain = chains(n)
            star = star_time(model, context, n, args.repeats) if n > 1 else chain
            rows.append({"model": role, "n": n, "chain_ms": 1e3 * chain, "tree_ms": 1e3 * star})
    print(f"{'model':<7} {'N':>3} {'chain ms':>9} {'x N=1':>6} {'tree ms':>8} {'x N=1':>6}")
    for row in rows:
        one = next(r for r in rows if r["model"] == row["model"] and r["n"] == sizes[0])
        print(
            f"{row['model']:<7} {row['n']:>3} {row['chain_ms']:>9.2f} "
            f"{row['chain_ms'] / one['chain_ms']:>6.2f} {row['tree_ms']:>8.2f} "
            f"{row['tree_ms'] / one['chain_ms']:>6.2f}"
        )
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"target": pair.target.name, "draft": pair.draft.name, "context": len(context)}
        path.write_text(json.dumps({"meta": meta | vars(args), "rows": rows}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
