"""Per-node and per-tree cost of the verification rules (issue 7), on CPU or GPU.

    python bench/rule_cost.py --device cpu --vocab 151936 --repeats 20
    python bench/rule_cost.py --device cuda

Synthetic LM-like distributions (p = softmax(s z), q = softmax(s z + e), s = 3) over the Qwen
vocabulary. ``node``: one ``verify_node`` call with k candidates drawn as the rule expects;
``tree``: one ``verify_tree`` call on a 4,2,2 tree (28 nodes) whose rows are independent such
pairs, i.e. the whole verification of one decoding step. Times are the median of ``--repeats``
after one warm-up call (seconds -> ms). Prints a Markdown table and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from mcsd.sampling import sample_candidates
from mcsd.tree import ROOT, TokenTree
from mcsd.verify import get_rule, verify_node, verify_tree

RULES = ("mcss", "mcss-wor", "kseq", "optimal", "traversal")


def pair(vocab: int, generator: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(vocab, generator=generator)
    e = torch.randn(vocab, generator=generator)
    p = torch.softmax(3.0 * z, 0).to(device)
    q = torch.softmax(3.0 * z + e, 0).to(device)
    return p, q


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    device_generator = torch.Generator(device=args.device).manual_seed(1)
    p, q = pair(args.vocab, generator, args.device)
    tree = TokenTree.from_config((4, 2, 2))
    rows = [pair(args.vocab, generator, args.device) for _ in range(tree.num_nodes + 1)]
    tree_p = torch.stack([r[0] for r in rows])  # [N+1, V]
    tree_q = torch.stack([r[1] for r in rows])
    results = {}
    for rule in RULES:
        replacement = get_rule(rule).replacement
        candidates = sample_candidates(
            q, args.k, replacement=replacement, generator=device_generator
        )
        tokens = torch.zeros(tree.num_nodes, dtype=torch.long, device=args.device)
        for node in (ROOT, *range(tree.num_nodes)):
            children = tree.children(node)
            if children:
                drawn = sample_candidates(
                    tree_q[node + 1],
                    len(children),
                    replacement=replacement,
                    generator=device_generator,
                )
                tokens[list(children)] = drawn
        node_ms = timed(
            lambda rule=rule, c=candidates: verify_node(rule, p, q, c, device_generator),
            args.repeats,
            args.device,
        )
        tree_ms = timed(
            lambda rule=rule, t=tokens: verify_tree(
                tree, t, tree_p, tree_q, rule, device_generator
            ),
            args.repeats,
            args.device,
        )
        results[rule] = {"node_ms": node_ms, "tree_ms": tree_ms}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device {name}, vocab {args.vocab}, k {args.k}, threads {args.threads}, load {load:.1f}")
    print(f"| rule | verify_node (k={args.k}) ms | verify_tree 4,2,2 ms |")
    print("|---|---:|---:|")
    for rule, r in results.items():
        print(f"| {rule} | {r['node_ms']:.2f} | {r['tree_ms']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "vocab": args.vocab, "load": load, "results": results}, f)


if __name__ == "__main__":
    main()
