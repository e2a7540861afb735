"""GPU benchmark of the fast runtime (issue 12): one table per call, the baselines side by side.

Per size (random-weight Qwen2.5 0.5B / 1.5B / 7B configs, bf16, 512-token context), ms per
forward of N = 1 / 16 / 64 new tokens (CUDA-graph replay, CUDA events, median):
- ``hf_static``:  transformers ``generate(cache_implementation="static")`` (it compiles), per token;
- ``static N``:   mcsd's ``StaticHFModel`` (transformers' modelling code on mcsd's slot cache);
- ``fast N``:     mcsd's fast runtime, graphs only; ``fastc N``: compiled (torch.compile) + graphs;
- ``floor``:      weight bytes a forward reads / measured copy bandwidth.
The fast runtime runs the same weights as the transformers model (``build(state=...)``), so the
table also reports the largest bf16 logit difference to transformers at N = 16.

``--parts steps``: the whole speculative step, 0.5B drafting for the largest size, both on the
compiled fast runtime: ms per step per tree, host synchronisations per step
(``torch.cuda.set_sync_debug_mode``), the share outside the forwards, and the target alone.
Acceptance on random weights is meaningless: ``--al TREE=AL`` (measured on the real pair) turns
step times into projected tokens/s. ``check``: fp32 tiny models on the GPU, fast vs transformers.

    python bench/gpu_fast.py --sizes 0.5b,1.5b --parts check,sizes --out $OUT/a.json
    python bench/gpu_fast.py --sizes 0.5b,7b --parts steps --out $OUT/b.json --al 4,2,2=3.9
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_step import (
    CONTEXT,
    build,
    copy_bandwidth,
    cuda_ms,
    forward_ms,
    hf_generate_ms,
    prompt_ids,
    read_bytes,
    static_model,
    step_profile,
)

N = (1, 16, 64)
TREES = ("1,1,1,1", "2,2,2", "4,2,2", "8,4,2", "2,2,1,1")


def fast_from(model, *, compile: bool, length: int = CONTEXT + 512):
    """The fast runtime on the same weights as a transformers model."""
    from mcsd.models.fast import FastModel, architecture
    from mcsd.models.fast import build as build_fast

    arch = architecture(model.config.to_dict())
    lm = build_fast(
        arch,
        dtype=model.dtype,
        device=model.device,
        max_length=length,
        state=model.state_dict(),
    )
    return FastModel(lm, label=f"random-{arch.num_layers}l", compile=compile)


def logit_gap(model, fast, n: int = 16) -> float:
    """Largest |fast - transformers| over the logits of a 512 + n token sequence (bf16)."""
    from mcsd.models.base import chain_mask

    ids = torch.tensor([prompt_ids(model.config.vocab_size, CONTEXT + n)], device="cuda")
    with torch.no_grad():
        reference = model(ids).logits[0, -n:].float()
    fast.reset()
    fast.forward(ids[:, :CONTEXT], torch.arange(CONTEXT, device="cuda")[None],
                 chain_mask(CONTEXT, 0, "cuda"), logits="none")  # fmt: skip
    fast.commit()
    out = fast.forward(ids[:, CONTEXT:], torch.arange(CONTEXT, CONTEXT + n, device="cuda")[None],
                       chain_mask(n, 0, "cuda"))  # fmt: skip
    fast.reset()
    return float((out[0] - reference).abs().max())


def ar_ms(m, new: int = 64) -> float:
    from mcsd.config import GREEDY
    from mcsd.engine import autoregressive_decode

    prompt = prompt_ids(m.vocab_size)
    for _ in range(2):  # the first run captures the graphs
        stamps = []
        for _step in autoregressive_decode(m, prompt, GREEDY, new, vocab_size=m.vocab_size):
            stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def check() -> dict:
    """fp32 tiny Qwen2 / Llama-3.1 / Qwen3 on the GPU: fast logits vs transformers, greedy
    speculation vs generate, with graphs and compile."""
    import transformers

    from mcsd.config import GREEDY, SpecConfig
    from mcsd.draft.model import ModelProposer
    from mcsd.engine import speculative_decode
    from mcsd.models.fast import FastModel, architecture
    from mcsd.models.fast import build as build_fast

    out = {}
    configs = {
        "qwen2": transformers.Qwen2Config(tie_word_embeddings=True),
        "llama3": transformers.LlamaConfig(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen3": transformers.Qwen3Config(head_dim=48),
    }  # fmt: skip
    for name, config in configs.items():
        config.update(dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, attn_implementation="sdpa"))  # fmt: skip
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).cuda().eval()
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
        arch = architecture(model.config.to_dict())

        def make(compile: bool, source=model, arch=arch):
            lm = build_fast(arch, dtype=torch.float32, device=torch.device("cuda"),
                            max_length=512, state=source.state_dict())  # fmt: skip
            return FastModel(lm, compile=compile)

        seq = torch.randint(0, 512, (1, 40), device="cuda")
        prompt = seq[0, :20].tolist()
        with torch.no_grad():
            ref = model.generate(seq[:, :20], attention_mask=torch.ones_like(seq[:, :20]),
                                 do_sample=False, max_new_tokens=60,
                                 min_new_tokens=60)[0, 20:].tolist()  # fmt: skip
        torch.manual_seed(1)
        draft_model = transformers.AutoModelForCausalLM.from_config(config).cuda().eval()
        spec = SpecConfig(tree="4,2,2", target=GREEDY, max_new_tokens=60)
        row = {}
        for compile in (False, True):
            target, draft = make(compile), make(compile, draft_model)
            if compile:
                target.warmup((29, 1))
                draft.warmup((1, 2, 4, 8))
            proposer = ModelProposer.for_spec(draft, spec, 512)
            tokens = [t for s in speculative_decode(target, proposer, prompt, spec,
                                                    vocab_size=512) for t in s.tokens]  # fmt: skip
            row["compiled" if compile else "graphs"] = tokens == ref
        row["max_logit_diff"] = logit_gap_fp32(model, make(False), seq)
        out[name] = row
    return out


def logit_gap_fp32(model, fast, seq) -> float:
    from mcsd.models.base import chain_mask

    with torch.no_grad():
        reference = model(seq).logits[0].float()
    a = fast.forward(seq[:, :24], torch.arange(24, device="cuda")[None], chain_mask(24, 0, "cuda"))
    fast.commit()
    b = fast.forward(
        seq[:, 24:], torch.arange(24, 40, device="cuda")[None], chain_mask(16, 0, "cuda")
    )
    return float((torch.cat([a[0], b[0]]) - reference).abs().max())


def sizes_part(size: str, bandwidth: float, row: dict) -> None:
    model = build(size)
    row["floor_ms"] = read_bytes(model) / bandwidth * 1e3
    row["hf_static"] = hf_generate_ms(model, static=True)
    print(size, "hf_static", round(row["hf_static"], 3), flush=True)
    static = static_model(model)
    for n in N:
        row[f"static{n}"] = forward_ms(static, n)
    del static
    for compile in (True,):  # graphs alone: see the profile part
        fast = fast_from(model, compile=compile)
        key = "fastc" if compile else "fast"
        started = time.perf_counter()
        fast.warmup(N)
        row["compile_s"] = time.perf_counter() - started
        row["fastc_ar"] = ar_ms(fast)
        row["bf16_logit_gap"] = logit_gap(model, fast)
        for n in N:
            row[f"{key}{n}"] = forward_ms(fast, n)
        print(size, key, {k: round(v, 3) for k, v in row.items()}, flush=True)
        del fast
    del model
    gc.collect()
    torch.cuda.empty_cache()


def steps_part(sizes: list[str], rules: list[str], results: dict) -> None:
    """0.5B drafting for the largest size, both compiled fast runtimes."""
    draft_hf, target_hf = build(sizes[0]), build(sizes[-1])
    draft, target = fast_from(draft_hf, compile=True), fast_from(target_hf, compile=True)
    del draft_hf, target_hf
    gc.collect()
    from mcsd.tree import TokenTree

    started = time.perf_counter()
    for tree in TREES:
        t = TokenTree.parse(tree)
        target.warmup((t.num_nodes + 1, 1))
        draft.warmup((1, 2, *(sum(1 for u in lv if t.children(u)) or 1 for lv in t.levels)))
    results["steps_compile_s"] = time.perf_counter() - started
    results["step_pair"] = f"{sizes[0]} -> {sizes[-1]}"
    results["target_ar_ms"] = ar_ms(target)
    results["steps"] = []
    for rule in rules:
        for tree in TREES if rule == "greedy" else ("4,2,2", "2,2,1,1"):
            step = step_profile(target, draft, tree, rule=rule)
            results["steps"].append(step)
            print(step, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="0.5b,1.5b,7b")
    parser.add_argument("--parts", default="check,sizes")
    parser.add_argument("--rules", default="greedy,mcss-wor")
    parser.add_argument("--out", default=None)
    parser.add_argument("--al", nargs="*", default=[], help="TREE=AL (CPU, real pair)")
    parser.add_argument("--table", nargs="*", default=None, help="print the table of JSON files")
    args = parser.parse_args()
    if args.table is not None:
        results: dict = {}
        for path in args.table:
            other = json.loads(Path(path).read_text())
            sizes = {**results.get("sizes", {}), **other.get("sizes", {})}
            results |= other | {"sizes": sizes}
        print_table(results, dict(a.split("=") for a in args.al))
        return
    parts = args.parts.split(",")
    results = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "sizes": {},
    }
    bandwidth = copy_bandwidth()
    results["copy_GBps"] = bandwidth / 1e9
    save(args.out, results)
    if "check" in parts:
        results["check"] = check()
        print("check", results["check"], flush=True)
        save(args.out, results)
    if "sizes" in parts:
        for size in args.sizes.split(","):
            results["sizes"][size] = {}
            sizes_part(size, bandwidth, results["sizes"][size])
            save(args.out, results)
    if "steps" in parts:
        steps_part(args.sizes.split(","), args.rules.split(","), results)
        save(args.out, results)
    if "profile" in parts:
        for flex, length in ((True, CONTEXT + 512), (True, 4096), (False, 4096)):
            name = f"profile_{'flex' if flex else 'sdpa'}_{length}"
            results[name] = profile_part(args.sizes.split(",")[0], flex, length)
            save(args.out, results)
            print(name)
            for key, value in results[name].items():
                print(
                    " ",
                    key,
                    *(value[:12] if key == "top" else [value]),
                    sep="\n    " if key == "top" else " ",
                )
    print_table(results, dict(a.split("=") for a in args.al))


def save(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


def print_table(results: dict, al: dict) -> None:
    r = results
    print(f"\n{r.get('card')} {r.get('date')} torch {r.get('torch')} transformers "
          f"{r.get('transformers')}, copy bandwidth {r.get('copy_GBps', 0):.0f} GB/s")  # fmt: skip
    cols = ["floor_ms", "hf_static", *(f"{k}{n}" for k in ("static", "fast", "fastc") for n in N)]
    cols += ["fastc_ar", "compile_s", "bf16_logit_gap"]
    print("| size | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for size, row in r.get("sizes", {}).items():
        print(
            f"| {size} | " + " | ".join(f"{row[c]:.2f}" if c in row else "-" for c in cols) + " |"
        )
    steps = r.get("steps")
    if steps:
        ar = r.get("target_ar_ms")
        print(f"\nsteps {r.get('step_pair')}: target alone {ar:.2f} ms/token (fast, compiled)")
        print("| tree | rule | nodes | step ms | draft ms | forwards ms | other % | syncs | AL | "
              "tokens/s | x own ar |")  # fmt: skip
        print("|---" * 11 + "|")
        for s in steps:
            a = float(al[s["tree"]]) if s["tree"] in al else None
            tps = a / s["step_ms"] * 1e3 if a else None
            print(f"| {s['tree']} | {s['rule']} | {s['nodes']} | {s['step_ms']:.2f} | "
                  f"{s['draft_ms']:.2f} | {s['forwards_ms']:.2f} | {s['other_pct']:.1f} | "
                  f"{s['syncs']:.0f} | {a or '-'} | {f'{tps:.0f}' if tps else '-'} | "
                  f"{f'{tps * ar / 1e3:.2f}' if tps and ar else '-'} |")  # fmt: skip
    if "check" in r:
        print("\ncheck:", r["check"])


def profile_part(size: str, flex: bool, length: int = CONTEXT + 512) -> dict:
    """Where the time of one compiled, graph-replayed fast forward (N = 1) goes: GPU kernels by
    name (torch.profiler), their sum against the host-timed forward, and the eager work around
    the graph (mask, inputs, head)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from mcsd.models.base import chain_mask

    model = build(size)
    fast = fast_from(model, compile=False, length=length)
    del model
    fast._run = torch.compile(fast._hidden, fullgraph=True, dynamic=False)
    fast.flex = flex
    fast.warmup((1,))
    ids = torch.tensor([prompt_ids(fast.vocab_size, CONTEXT + 1)], device="cuda")
    fast.forward(ids[:, :CONTEXT], torch.arange(CONTEXT, device="cuda")[None],
                 chain_mask(CONTEXT, 0, "cuda"), logits="none")  # fmt: skip
    fast.commit()
    tokens, positions = ids[:, CONTEXT:], torch.tensor([[CONTEXT]], device="cuda")
    mask = chain_mask(1, 0, "cuda")

    def step():
        fast.forward(tokens, positions, mask)
        fast.commit([[]])

    wall = cuda_ms(step)
    replay = cuda_ms(lambda: fast._graphs._graphs[(1, fast.max_length)][0].replay())
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels.setdefault(e.name[:70], []).append(e.time_range.elapsed_us() / 5)
    total = sum(sum(v) for v in kernels.values())
    top = sorted(((sum(v), len(v) // 5, k) for k, v in kernels.items()), reverse=True)[:25]
    return {
        "forward_ms": wall,
        "graph_replay_ms": replay,
        "kernel_ms_per_forward": total / 1e3,
        "kernels_per_forward": sum(len(v) for v in kernels.values()) // 5,
        "top": [(round(us, 1), count, name) for us, count, name in top],
    }


if __name__ == "__main__":
    main()
