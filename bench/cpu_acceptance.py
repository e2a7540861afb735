"""Mean accepted length (AL) of the real pair on the CPU, per tree, for the GPU projections.

The Qwen2.5-Coder 0.5B drafting for the 1.5B (bf16), greedy unless ``--temperature`` is given,
on the first ``--n`` HumanEval and MT-bench prompts (chat template, seeded sample). Prints one
JSON object: per tree, AL over all prompts (new tokens / steps) and per prompt.

    python bench/cpu_acceptance.py --trees 1,1,1,1 2,2,2 4,2,2 8,4,2 --n 2 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import json

import torch

import mcsd
from mcsd.bench.datasets import load_dataset
from mcsd.config import SamplingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", nargs="+", default=["1,1,1,1", "2,2,2", "4,2,2", "8,4,2"])
    parser.add_argument("--n", type=int, default=2, help="prompts per dataset")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pair = mcsd.load_pair(dtype=args.dtype, device="cpu", progress=False)
    prompts = [
        q.turns[0] for name in ("humaneval", "mtbench") for q in load_dataset(name, n=args.n)
    ]
    out: dict = {"dtype": args.dtype, "temperature": args.temperature, "trees": {}}
    for tree in args.trees:
        steps = tokens = 0
        per_prompt = []
        for i, prompt in enumerate(prompts):
            config = mcsd.SpecConfig(
                tree=tree,
                target=SamplingConfig(args.temperature),
                max_new_tokens=args.max_new_tokens,
                seed=i,
            )
            result = mcsd.generate(pair, prompt, config, chat=True)
            steps += result.stats.steps
            tokens += result.stats.new_tokens
            per_prompt.append(round(result.stats.mean_accepted_length, 3))
        out["trees"][tree] = {"al": round(tokens / steps, 3), "per_prompt": per_prompt}
        print(json.dumps({tree: out["trees"][tree]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
