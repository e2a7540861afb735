"""Where does one speculative step's time go on this machine? (a script, not a test)

Wraps the model adapters' ``forward`` / ``commit`` with timers and runs mcsd's engine on real
prompts, then splits the mean step time into: draft forwards (inside transformers), target
forward, KV compaction, and the rest (the engine's own work: tensor set-up, warping, sampling,
verification, bookkeeping). Also times the pieces of a transformers forward that are not matmuls
by comparing with a forward of the same model on the same tokens through ``hf_model`` alone.

python bench/profile_cpu_step.py --tree 1,1,1,1 --tree 2,1,1 --tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections import defaultdict

import torch

from mcsd.api import encode_prompt, load_pair
from mcsd.bench.datasets import load_dataset
from mcsd.config import GREEDY, SpecConfig
from mcsd.draft.model import ModelProposer
from mcsd.engine import speculative_decode
from mcsd.models.hf import HFModel

PROMPTS = ("humaneval", "mt-bench")


def instrument(totals: dict[str, float], counts: dict[str, int]) -> None:
    """Time HFModel.forward / commit per model (the pair's target and draft are told apart by
    their vocabulary-independent size: number of layers)."""

    def wrap(name: str, function):
        def timed(self, *args, **kwargs):
            empty = self.cache_lengths()[0] == 0 and self.pending_length == 0
            kind = "prefill" if name == "forward" and empty else name
            started = time.perf_counter()
            result = function(self, *args, **kwargs)
            key = f"{kind}[{self.hf_model.config.num_hidden_layers} layers]"
            totals[key] += time.perf_counter() - started
            counts[key] += 1
            return result

        return timed

    HFModel.forward = wrap("forward", HFModel.forward)
    HFModel.commit = wrap("commit", HFModel.commit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--n", type=int, default=1, help="prompts per dataset")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--draft-vocab", type=int, default=None)
    parser.add_argument("--draft-int8", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = load_pair(progress=False)
    if args.draft_vocab or args.draft_int8:
        pair = pair.with_cheap_draft(vocab=args.draft_vocab, int8=args.draft_int8)
    prompts = [
        encode_prompt(pair.tokenizer, q.turns[0], chat=True)
        for name in PROMPTS
        for q in load_dataset(name, n=args.n, seed=0)
    ]
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    instrument(totals, counts)
    print(f"torch threads {torch.get_num_threads()}, {len(prompts)} prompts, {args.tokens} tokens")
    for tree in args.tree or ["1,1,1,1"]:
        spec = SpecConfig(tree=tree, target=GREEDY, max_new_tokens=args.tokens)
        proposer = ModelProposer.for_spec(pair.draft, spec, pair.vocab_size)
        list(
            speculative_decode(pair.target, proposer, prompts[0], spec, vocab_size=pair.vocab_size)
        )
        totals.clear()
        counts.clear()
        steps = tokens = 0
        wall = 0.0
        profiler = cProfile.Profile() if args.profile else None
        for prompt in prompts:
            if profiler:
                profiler.enable()
            started = time.perf_counter()
            run = speculative_decode(
                pair.target, proposer, prompt, spec, vocab_size=pair.vocab_size
            )
            for step in run:
                steps += 1
                tokens += len(step.tokens)
            wall += time.perf_counter() - started
            if profiler:
                profiler.disable()
        print(
            f"\ntree {tree}: {tokens} tokens, {steps} steps, AL {tokens / steps:.2f}, "
            f"{tokens / wall:.2f} tokens/s, {1e3 * wall / steps:.1f} ms/step (prefill included)"
        )
        accounted = 0.0
        for key in sorted(totals):
            accounted += totals[key]
            per_call = 1e3 * totals[key] / counts[key]
            print(
                f"  {key:<28} {1e3 * totals[key] / steps:8.1f} ms/step   "
                f"{counts[key] / steps:5.2f} calls/step  {per_call:7.1f} ms/call"
            )
        print(f"  {'engine (rest)':<28} {1e3 * (wall - accounted) / steps:8.1f} ms/step")
        if profiler:
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
            print(stream.getvalue())


if __name__ == "__main__":
    main()
