"""Why ``compile="all"`` is slower than CUDA graphs alone on the fast runtime (issue 24).

One process on the GPU, random bf16 weights of the Qwen2.5 shapes (``gpu_step.SIZES``),
512-token context, batch 1, greedy plain decoding through the engine (``gpu_anchor.mcsd_ms``),
the variants of the captured one-token forward interleaved (median of ``--reps``):

- ``graphs``            the eager forward captured in a CUDA graph (the CLI default);
- ``compile dynamic``   ``torch.compile(fullgraph=True, dynamic=True)``, captured (what
                        ``FastModel(compile=True)`` does today);
- ``compile static``    ``torch.compile(fullgraph=True, dynamic=False)``: specialised to the
                        shapes it meets (one compilation per token bucket and attention length);

plus each variant's one-token forward alone (CUDA events around a graph replay, median of 50)
and kernels per replay (torch.profiler). Compile seconds are printed per variant.

    PYTHONPATH=src python bench/gpu_compile_probe.py --sizes 0.5b,1.5b --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_anchor import mcsd_model, mcsd_ms

VARIANTS = ("graphs", "compile dynamic", "compile static")


def variant(size: str, name: str, lm: Any = None) -> tuple[Any, float]:
    """The fast runtime of ``size`` with its captured forward as ``name`` says, warmed (the
    compilation happens there), and the warm-up's seconds."""
    started = time.perf_counter()
    runtime = mcsd_model(size, compile=False, lm=lm)
    if name != "graphs":
        dynamic = name == "compile dynamic"
        runtime._run = torch.compile(runtime._hidden, fullgraph=True, dynamic=dynamic)
        runtime._graphs = type(runtime._graphs)(runtime.device, enabled=True, label=name)
        with torch._inductor.config.patch(coordinate_descent_tuning=False):
            runtime.warmup((1,))
    torch.cuda.synchronize()
    return runtime, time.perf_counter() - started


def forward_ms(runtime: Any, repeats: int = 50) -> float:
    """One captured one-token forward after a 512-token context, CUDA events, median."""
    from mcsd.models.base import chain_mask

    device = runtime.device
    runtime.reset()
    context = torch.zeros(1, 512, dtype=torch.long, device=device)
    runtime.forward(context, torch.arange(512, device=device)[None], chain_mask(512, device=device))
    runtime.commit()
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    position = torch.full((1, 1), 512, device=device)
    mask = chain_mask(1, device=device)
    times = []
    for _ in range(repeats + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runtime.forward(token, position, mask, logits="last")
        end.record()
        runtime.commit([[]])
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    runtime.reset()
    return statistics.median(times[5:])


def kernels_per_forward(runtime: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    from mcsd.models.base import chain_mask

    device = runtime.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    position = torch.full((1, 1), 0, device=device)
    runtime.reset()
    runtime.forward(token, position, chain_mask(1, device=device), logits="last")
    runtime.commit([[]])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runtime.forward(token, position, chain_mask(1, device=device), logits="last")
        torch.cuda.synchronize()
    runtime.commit([[]])
    runtime.reset()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="0.5b,1.5b")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    for size in args.sizes.split(","):
        runtimes: dict[str, Any] = {}
        row: dict[str, Any] = {}
        lm = None
        for name in VARIANTS:
            runtimes[name], seconds = variant(size, name, lm)
            lm = runtimes[name].lm
            started = time.perf_counter()
            mcsd_ms(runtimes[name], None, "none", 8)  # the context's attention length compiles
            seconds += time.perf_counter() - started
            row[name] = {"warmup_s": round(seconds, 1)}
            print(f"{size} {name}: warm-up {seconds:.1f} s", flush=True)
        for name, runtime in runtimes.items():
            row[name]["forward_ms"] = round(forward_ms(runtime), 3)
            row[name]["kernels"] = kernels_per_forward(runtime)
        runs: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(args.reps):
            for name, runtime in runtimes.items():
                runs[name].append(mcsd_ms(runtime, None, "none", args.tokens))
        for name, values in runs.items():
            row[name]["token_ms"] = round(statistics.median(values), 3)
            row[name]["token_reps"] = [round(v, 3) for v in values]
        results[size] = row
        if args.out:
            Path(args.out, "compile_probe.json").write_text(json.dumps(results, indent=1))
    print(f"\n{results['gpu']}, torch {results['torch']}")
    header = f"{'size':<5} {'variant':<16} {'warm-up s':>9} {'fwd ms':>7} {'kernels':>7}"
    print(f"{header} {'ms/tok':>7}")
    for size in args.sizes.split(","):
        for name in VARIANTS:
            r = results[size][name]
            print(
                f"{size:<5} {name:<16} {r['warmup_s']:>9} {r['forward_ms']:>7} "
                f"{r['kernels']:>7} {r['token_ms']:>7}"
            )


if __name__ == "__main__":
    main()
