"""Capture real (p, q) pairs from a model pair, for ``mcsd check --compare`` and the tests.

    python -m mcsd.checks.capture --out tests/data/qwen_pairs.pt --prompts 16 --new-tokens 40

For each prompt (half HumanEval, half MT-bench, chat-templated) the target alone samples a
continuation at the given temperature; then both models read prompt + continuation in one
forward each, and at positions spread over the continuation the target's and the draft's
next-token distributions (warped at that temperature, cut to the common vocabulary) are kept.
Each pair is cut to the ``top`` tokens of largest p + q and both sides renormalised there, so
the file stays small (float32; 300 pairs of 1024 tokens take 2.4 MB).

The saved dict: ``p`` and ``q`` float32 ``[N, top]`` (the same token set per row), ``tokens``
int32 ``[N, top]`` (their ids), ``kept_p`` / ``kept_q`` ``[N]`` (mass kept by the cut), and
``meta`` (models, temperature, prompts, the command).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from mcsd.checks.defaults import CaptureDefaults
from mcsd.config import SamplingConfig
from mcsd.models.base import score
from mcsd.sampling import warp

D = CaptureDefaults


def capture(
    pair,  # mcsd.api.ModelPair
    prompts: list[list[int]],
    *,
    new_tokens: int,
    per_prompt: int,
    temperature: float,
    top: int,
    seed: int,
) -> dict:
    """Sampled continuations and the (p, q) pairs along them (see the module docstring)."""
    from mcsd.engine import autoregressive_decode

    sampling = SamplingConfig(temperature=temperature)
    vocab = pair.vocab_size
    rng = random.Random(seed)
    rows_p, rows_q, rows_tokens, kept_p, kept_q = [], [], [], [], []
    for index, prompt in enumerate(prompts):
        continuation: list[int] = []
        for step in autoregressive_decode(
            pair.target,
            prompt,
            sampling,
            new_tokens,
            vocab_size=vocab,
            stop_token_ids=frozenset(pair.eos_token_ids),
            seed=seed * 1_000_003 + index,
        ):
            continuation += step.tokens
        ids = prompt + continuation  # [L]
        target_logits = score(pair.target, ids)[:, :vocab]  # [L, V]
        draft_logits = score(pair.draft, ids)[:, :vocab]
        # logits at position t predict token t + 1: the continuation is predicted from
        # len(prompt) - 1 on
        first = len(prompt) - 1
        positions = list(range(first, first + len(continuation)))
        for position in sorted(rng.sample(positions, min(per_prompt, len(positions)))):
            p = warp(target_logits[position], sampling).double()  # [V]
            q = warp(draft_logits[position], sampling).double()
            keep = torch.topk(p + q, top).indices  # [top]
            rows_tokens.append(keep.cpu())
            kept_p.append(float(p[keep].sum()))
            kept_q.append(float(q[keep].sum()))
            rows_p.append((p[keep] / p[keep].sum()).float().cpu())
            rows_q.append((q[keep] / q[keep].sum()).float().cpu())
        print(
            f"prompt {index + 1}/{len(prompts)}: {len(continuation)} tokens, "
            f"{len(rows_p)} pairs so far",
            file=sys.stderr,
        )
    return {
        "p": torch.stack(rows_p),
        "q": torch.stack(rows_q),
        "tokens": torch.stack(rows_tokens).int(),
        "kept_p": torch.tensor(kept_p),
        "kept_q": torch.tensor(kept_q),
    }


def load_pairs(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``p``, ``q`` float64 ``[N, top]`` from a file written by ``main``."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data["p"].double(), data["q"].double()


def main(argv: list[str] | None = None) -> int:
    from mcsd.api import encode_prompt, load_pair
    from mcsd.bench.datasets import load_dataset

    parser = argparse.ArgumentParser(prog="python -m mcsd.checks.capture", description=__doc__)
    parser.add_argument("--out", required=True, help="output .pt file")
    parser.add_argument("--prompts", type=int, default=D.prompts, help="prompts (half each set)")
    parser.add_argument("--new-tokens", type=int, default=D.new_tokens, help="tokens per prompt")
    parser.add_argument("--per-prompt", type=int, default=D.per_prompt, help="pairs per prompt")
    parser.add_argument("--temperature", type=float, default=D.temperature)
    parser.add_argument("--top", type=int, default=D.top, help="tokens kept per pair")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: bf16 where native)")
    parser.add_argument("--seed", type=int, default=D.seed)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    pair = load_pair(dtype=args.dtype)
    half = args.prompts // 2
    questions = load_dataset("humaneval", n=half, seed=args.seed) + load_dataset(
        "mt-bench", n=args.prompts - half, seed=args.seed
    )
    prompts = [encode_prompt(pair.tokenizer, q.turns[0], chat=True) for q in questions]
    data = capture(
        pair,
        prompts,
        new_tokens=args.new_tokens,
        per_prompt=args.per_prompt,
        temperature=args.temperature,
        top=args.top,
        seed=args.seed,
    )
    data["meta"] = {
        "target": pair.target_name,
        "draft": pair.draft_name,
        "temperature": args.temperature,
        "top": args.top,
        "questions": [f"{q.dataset}:{q.question_id}" for q in questions],
        "command": " ".join(["python -m mcsd.checks.capture", *(argv or sys.argv[1:])]),
        "dtype": str(args.dtype),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, args.out)
    elapsed = time.perf_counter() - started
    print(f"saved {len(data['p'])} pairs to {args.out} in {elapsed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
