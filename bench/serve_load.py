"""Bounded load test of a running ``mcsd serve``: N concurrent streaming clients share a fixed
number of requests; reports requests/s, tokens/s, TTFT and ITL percentiles and errors.

    mcsd serve --target smollm2 --draft smollm2 --port 8000 &
    python bench/serve_load.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 16

Times are measured by the client: TTFT = request sent -> first chunk with text (includes queue
wait: the server runs one generation at a time); ITL = gap between consecutive text chunks (one
chunk carries every token of one speculative step). Token counts come from the final usage chunk
(``stream_options.include_usage``). One unmeasured warm-up request runs first. This is a
benchmark, not a test: it asserts nothing about speed, and exits 1 only if a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import httpx

PROMPTS = (  # mixed code and English, like the project's benchmarks
    "def fibonacci(n):",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash table is in two sentences.",
    "class Stack:\n    def __init__(self):",
    "List three uses of binary search.",
    "What is the difference between a process and a thread?",
    "import json\n\ndef load_config(path):",
    "Summarise the rules of chess in one paragraph.",
)


@dataclass
class Result:
    ok: bool
    error: str = ""
    latency: float = 0.0  # request sent -> stream finished
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # inter-chunk latencies
    completion_tokens: int = 0
    mean_accepted_length: float = 0.0


async def one_request(http: httpx.AsyncClient, args: argparse.Namespace, index: int) -> Result:
    prompt = PROMPTS[index % len(PROMPTS)]
    body: dict = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.model:
        body["model"] = args.model
    if args.tree:
        body["mcsd"] = {"tree": args.tree}
    if args.chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    started = time.perf_counter()
    result = Result(ok=False)
    last = None
    try:
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"]["message"]
                    return result
                if event.get("usage"):
                    usage = event["usage"]
                    result.completion_tokens = usage["completion_tokens"]
                    result.mean_accepted_length = usage["speculative"]["mean_accepted_length"]
                    continue
                choice = event["choices"][0]
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if not text:
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - started
                else:
                    result.gaps.append(now - last)
                last = now
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.latency = time.perf_counter() - started
    result.ok = True
    return result


async def run_level(args: argparse.Namespace, concurrency: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as http:
        counter = iter(range(args.requests))
        results: list[Result] = []

        async def client() -> None:
            for index in counter:  # clients pull the next request until none is left
                results.append(await one_request(http, args, index))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    good = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in good)
    ttfts = [r.ttft for r in good]
    gaps = [g for r in good for g in r.gaps]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(good),
        "error_samples": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": wall,
        "requests_per_s": len(good) / wall,
        "tokens_per_s": tokens / wall,
        "completion_tokens": tokens,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "mean_accepted_length": statistics.fmean(r.mean_accepted_length for r in good)
        if good
        else 0.0,
    }


async def warm_up(args: argparse.Namespace) -> Result:
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout) as http:
        return await one_request(http, args, 0)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN when there is nothing to rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--tree", default=None, help="per-request tree (default: the server's)")
    parser.add_argument("--model", default=None, help="model id (default: the server's)")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per request, seconds")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    models = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]
    print(f"server: {models['id']} ({json.dumps(models.get('mcsd', {}).get('defaults'))})")
    warm = asyncio.run(warm_up(args))
    if not warm.ok:
        print(f"warm-up request failed: {warm.error}", file=sys.stderr)
        return 1
    rows = []
    header = "clients  reqs  errors  req/s   tok/s   TTFT p50/p99 (s)   ITL p50/p99 (s)   AL"
    print(header)
    for concurrency in levels:
        row = asyncio.run(run_level(args, concurrency))
        rows.append(row)
        print(
            f"{concurrency:7d} {row['requests']:5d} {row['errors']:7d} "
            f"{row['requests_per_s']:6.3f} {row['tokens_per_s']:7.2f}   "
            f"{row['ttft_p50_s']:7.3f} / {row['ttft_p99_s']:7.3f}   "
            f"{row['itl_p50_s']:6.3f} / {row['itl_p99_s']:6.3f}   "
            f"{row['mean_accepted_length']:.2f}",
            flush=True,
        )
        for sample in row["error_samples"]:
            print(f"  error: {sample}", file=sys.stderr)
    if args.json:
        record = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "argv": sys.argv,
            "server": models,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "levels": rows,
            "warm_up": asdict(warm) | {"gaps": len(warm.gaps)},
        }
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
