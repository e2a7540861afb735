"""GPU step benchmark: random-weight Qwen2.5 0.5B / 1.5B / 7B (bf16), one table (issue 6).

Per size, milliseconds per token or per forward:
- hf_eager:   transformers ``generate`` (DynamicCache, eager), greedy, per new token;
- hf_static:  transformers ``generate(cache_implementation="static")`` (auto-compiled), same;
- mcsd_ar:    mcsd target-only decoding (``autoregressive_decode`` on ``StaticHFModel``);
- fwd N:      one ``StaticHFModel.forward`` over N tree tokens after the context (N = 1 is a
              plain decode step), CUDA-graph replay, with the mask build and logits cast;
- floor:      bytes read per forward (parameters, less an untied input embedding) / measured
              device-to-device copy bandwidth.
Then the full mcsd step, the 0.5B drafting for the 7B, per tree: ms per step, the time spent
outside model forwards, and host synchronisations per step (counted with
``torch.cuda.set_sync_debug_mode``). Acceptance on random weights is meaningless: projected
tokens/s use mean accepted lengths measured on CPU with the real pair (``--al TREE=AL``).

    python bench/gpu_step.py --sizes 0.5b,7b --parts check,mcsd,steps --out $OUT/a.json
    python bench/gpu_step.py --table $OUT/a.json b.json   # merge and print
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

SIZES = {  # Qwen2.5 configs: hidden, layers, heads, kv heads, intermediate, vocab, tied
    "0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
}
VERIFY_N = (1, 8, 16, 32, 64)
TREES = ("1,1,1,1", "2,2,2", "4,2,2", "8,4,2")
CONTEXT = 512
KERNEL_KINDS = (  # profiler kernel names -> kind, first match wins
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "splitk")),
    ("attention", ("fmha", "attention", "flash", "softmax")),
    ("copy/index", ("copy", "memcpy", "memset", "index", "gather", "cat")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "triton")),
)


def build(size: str, dtype=torch.bfloat16, layers: int | None = None):
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, n_layers, heads, kv, inter, vocab, tied = SIZES[size]
    config = Qwen2Config(
        hidden_size=hidden,
        num_hidden_layers=layers or n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def read_bytes(model) -> int:
    """Parameter bytes a decode step reads (an untied input embedding reads one row only)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), reps=20)
    return 2 * 2**31 / (ms / 1e3)


def cuda_ms(fn, reps: int = 30, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` between two CUDA events, synchronising between runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def prompt_ids(vocab: int, n: int = CONTEXT, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 151643), (n,), generator=g).tolist()


# ---------------------------------------------------------------- parts
def hf_generate_ms(model, static: bool, new: int = 32) -> float:
    """Per-token time of ``generate`` from the host time stamps of its decoding steps (a logits
    processor records them; generate synchronises every step for its stopping check)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ids = torch.tensor([prompt_ids(model.config.vocab_size)], device="cuda")
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids))
    if static:
        kwargs["cache_implementation"] = "static"
    per_token = []
    for _ in range(3):  # the first run compiles (static cache)
        stamps = Stamps()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(
                ids,
                max_new_tokens=new,
                min_new_tokens=new,
                logits_processor=LogitsProcessorList([stamps]),
                **kwargs,
            )
        t = stamps.times
        per_token.append((t[-1] - t[0]) / (len(t) - 1) * 1e3)
    return statistics.median(per_token[1:])


def static_model(model, **kwargs):
    from mcsd.models.static import StaticHFModel

    return StaticHFModel(model, max_length=CONTEXT + 512, **kwargs)


def forward_ms(m, n: int, cache: int = CONTEXT) -> float:
    """One forward of n tree tokens (a (n-1)-node chain under the root) after ``cache``."""
    from mcsd.models.base import chain_mask

    vocab = m.vocab_size
    m.reset()
    ids = torch.tensor([prompt_ids(vocab, cache + n)], device="cuda")
    m.forward(
        ids[:, :cache], torch.arange(cache, device="cuda")[None], chain_mask(cache, 0, "cuda")
    )
    m.commit()
    tokens, positions = ids[:, cache:], torch.arange(cache, cache + n, device="cuda")[None]
    mask = chain_mask(n, 0, "cuda")

    def fn():
        m.forward(tokens, positions, mask)
        m.commit([[]])

    return cuda_ms(fn)


def ar_ms(m, new: int = 64) -> float:
    from mcsd.config import GREEDY
    from mcsd.engine import autoregressive_decode

    prompt = prompt_ids(m.vocab_size)
    for _ in range(2):  # the first run captures the graphs
        stamps = []
        for _step in autoregressive_decode(m, prompt, GREEDY, new, vocab_size=m.vocab_size):
            stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def step_profile(target, draft, tree: str, steps: int = 24, rule: str = "greedy") -> dict:
    """Time per full speculative step, and host synchronisations per step (``rule`` other than
    greedy: sampling at temperature 1)."""
    from mcsd.config import GREEDY, SamplingConfig, SpecConfig
    from mcsd.draft.model import ModelProposer
    from mcsd.engine import speculative_decode

    vocab = min(target.vocab_size, draft.vocab_size)
    sampling = GREEDY if rule == "greedy" else SamplingConfig(temperature=1.0)
    spec = SpecConfig(tree=tree, target=sampling, rule=rule, max_new_tokens=4 * steps, seed=0)
    prompt = prompt_ids(vocab)
    for _ in range(2):  # the first run captures every shape
        times, drafts, syncs, where = [], [], [], set()
        proposer = ModelProposer.for_spec(draft, spec, vocab)
        gen = speculative_decode(target, proposer, prompt, spec, vocab_size=vocab)
        torch.cuda.synchronize()
        last = time.perf_counter()
        for _ in range(steps):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step = next(gen, None)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            if step is None:
                break
            now = time.perf_counter()
            times.append(now - last)
            last = now
            drafts.append(step.record.draft_time)
            found = [w for w in caught if "synchroniz" in str(w.message)]
            syncs.append(len(found))
            where.update(f"{Path(w.filename).name}:{w.lineno}" for w in found)
    # Forward-only time of the same shapes: draft levels and the target's tree forward.
    from mcsd.tree import TokenTree

    t = TokenTree.parse(tree)
    runs = [1] + [sum(1 for u in level if t.children(u)) for level in t.levels]
    forwards = sum(forward_ms(draft, n) for n in runs if n) + forward_ms(target, t.num_nodes + 1)
    step_ms = statistics.median(times[1:]) * 1e3
    return {
        "tree": tree,
        "rule": rule,
        "nodes": t.num_nodes,
        "step_ms": step_ms,
        "draft_ms": statistics.median(drafts[1:]) * 1e3,
        "forwards_ms": forwards,
        "other_pct": 100 * (step_ms - forwards) / step_ms,
        "syncs": statistics.median(syncs[1:]),
        "sync_lines": sorted(where),
    }


def profile_forward(model, n: int = 1, cache: int = CONTEXT) -> dict:
    """GPU kernel time of one eager forward, by kind of kernel (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from mcsd.models.base import chain_mask

    m = static_model(model, cuda_graphs=False)
    ids = torch.tensor([prompt_ids(m.vocab_size, cache + n)], device="cuda")
    m.forward(
        ids[:, :cache], torch.arange(cache, device="cuda")[None], chain_mask(cache, 0, "cuda")
    )
    m.commit()
    tokens, positions = ids[:, cache:], torch.arange(cache, cache + n, device="cuda")[None]
    mask = chain_mask(n, 0, "cuda")

    def fn():
        m.forward(tokens, positions, mask)
        m.commit([[]])

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        name = e.name.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        kinds.setdefault(kind, []).append(e.time_range.elapsed_us() / 1e3)
    out = {k: {"ms": round(sum(v), 3), "kernels": len(v)} for k, v in kinds.items()}
    out["total_kernel_ms"] = round(sum(sum(v) for v in kinds.values()), 3)
    top = sorted(
        (
            (e.name[:60], e.time_range.elapsed_us())
            for e in prof.events()
            if e.device_type == DeviceType.CUDA
        ),
        key=lambda x: -x[1],
    )[:8]
    out["top_us"] = [(name, round(us, 1)) for name, us in top]
    return out


def check_graphs() -> dict:
    """fp32 tiny Qwen2 on the GPU: graph-replayed logits vs DynamicCache, and greedy
    speculative output vs transformers generate."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mcsd.config import GREEDY, SpecConfig
    from mcsd.draft.model import ModelProposer
    from mcsd.engine import speculative_decode
    from mcsd.models.base import chain_mask
    from mcsd.models.hf import HFModel

    config = Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    target = Qwen2ForCausalLM(config).cuda().eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
    torch.manual_seed(1)
    draft = Qwen2ForCausalLM(config).cuda().eval()
    seq = torch.randint(0, 512, (1, 300), device="cuda")
    a, b = HFModel(target), static_model(target)
    worst = 0.0
    for m in (a, b):
        m.forward(seq[:, :200], torch.arange(200, device="cuda")[None], chain_mask(200, 0, "cuda"))
        m.commit()
    for cache in range(200, 290, 9):
        n = 9
        args = (seq[:, cache : cache + n], torch.arange(cache, cache + n, device="cuda")[None])
        mask = chain_mask(n, 0, "cuda")
        worst = max(worst, float((a.forward(*args, mask) - b.forward(*args, mask)).abs().max()))
        a.commit()
        b.commit()
    prompt = seq[0, :20].tolist()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = target.generate(
            seq[:, :20], attention_mask=torch.ones_like(seq[:, :20]), do_sample=False,
            max_new_tokens=100, min_new_tokens=100,
        )[0, 20:].tolist()  # fmt: skip
    spec = SpecConfig(tree="4,2,2", target=GREEDY, max_new_tokens=100)
    out = []
    proposer = ModelProposer.for_spec(static_model(draft), spec, 512)
    for s in speculative_decode(static_model(target), proposer, prompt, spec, vocab_size=512):
        out += s.tokens
    return {"max_logit_diff_fp32": worst, "greedy_equal": out == ref, "captures": b.graph_captures}


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="0.5b,1.5b,7b")
    parser.add_argument("--parts", default="check,hf,mcsd,steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile before capture")
    parser.add_argument(
        "--compile-draft", action="store_true", help="torch.compile the 0.5B draft in the steps"
    )
    parser.add_argument(
        "--rules",
        default="greedy",
        help="rules of the full steps (comma-separated; any but greedy samples at temperature 1)",
    )
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--table", nargs="*", default=None, help="print the table of JSON files")
    parser.add_argument("--al", nargs="*", default=[], help="TREE=AL (CPU, real pair)")
    args = parser.parse_args()
    if args.table is not None:
        results = {}
        for path in args.table:
            merge(results, json.loads(Path(path).read_text()))
        print_table(results, dict(a.split("=") for a in args.al))
        return
    parts = args.parts.split(",")
    results: dict = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "sizes": {},
    }
    results["copy_GBps"] = copy_bandwidth() / 1e9
    if "check" in parts:
        results["check"] = check_graphs()
        print("check", results["check"], flush=True)
    kwargs = {"compile": args.compile}
    keep = {}
    for size in args.sizes.split(","):
        model = build(size)
        row = {"floor_ms": read_bytes(model) / (results["copy_GBps"] * 1e9) * 1e3}
        results["sizes"][size] = row
        if "hf" in parts:
            row["hf_eager"] = hf_generate_ms(model, static=False)
            print(size, "hf_eager", row["hf_eager"], flush=True)
            row["hf_static"] = hf_generate_ms(model, static=True)
            print(size, "hf_static", row["hf_static"], flush=True)
        if "mcsd" in parts:
            m = static_model(model, **kwargs)
            row["mcsd_ar"] = ar_ms(m)
            for n in (*VERIFY_N, 4):
                row[f"fwd{n}"] = forward_ms(m, n)
            row["captures"] = m.graph_captures
            print(size, row, flush=True)
            del m
        if "compile" in parts:  # torch.compile before capture, two shapes (~30 s each)
            m = static_model(model, compile=True)
            for n in (1, 8):
                row[f"compiled_fwd{n}"] = forward_ms(m, n)
            print(size, "compiled", row, flush=True)
            del m
        save(args.out, results)
        if "profile" in parts:
            try:
                row["profile_fwd1"] = profile_forward(model)
            except Exception as error:  # the profiler is a diagnostic: never lose the run
                row["profile_fwd1"] = {"error": repr(error)}
            print(size, "profile", row["profile_fwd1"], flush=True)
        if "steps" in parts:  # the first size drafts for the last
            draft_compile = args.compile_draft and not keep
            keep[size] = static_model(model, **{**kwargs, "compile": draft_compile or args.compile})
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if "steps" in parts and len(keep) >= 2:
        sizes = list(keep)
        results["step_pair"] = f"{sizes[0]} -> {sizes[-1]}"
        results["steps"] = []
        for rule in args.rules.split(","):
            for tree in TREES if rule == "greedy" else ("4,2,2",):
                step = step_profile(keep[sizes[-1]], keep[sizes[0]], tree, rule=rule)
                results["steps"].append(step)
                print(step, flush=True)
    save(args.out, results)
    print_table(results, dict(a.split("=") for a in args.al))


def save(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


def merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if key == "sizes":
            for size, row in value.items():
                into.setdefault("sizes", {}).setdefault(size, {}).update(row)
        else:
            into[key] = value


def print_table(results: dict, al: dict) -> None:
    r = results
    print(f"\n{r.get('card')} {r.get('date')} torch {r.get('torch')} transformers "
          f"{r.get('transformers')}, copy bandwidth {r.get('copy_GBps', 0):.0f} GB/s")  # fmt: skip
    cols = ["hf_eager", "hf_static", "mcsd_ar", *(f"fwd{n}" for n in VERIFY_N), "fwd4"]
    cols += ["compiled_fwd1", "compiled_fwd8", "floor_ms"]
    print("| size | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for size, row in results.get("sizes", {}).items():
        cells = [f"{row[c]:.2f}" if c in row else "-" for c in cols]
        print(f"| {size} | " + " | ".join(cells) + " |")
    steps = results.get("steps")
    if steps:
        pair = r.get("step_pair", "0.5b -> 7b")
        hf7 = results["sizes"].get(pair.split()[-1], {}).get("hf_static")
        print(f"\n| tree ({pair}) | rule | nodes | step ms | forwards ms | other % | syncs "
              "| AL (CPU) | tokens/s | x hf_static |")  # fmt: skip
        print("|---" * 10 + "|")
        for s in steps:
            rule = s.get("rule", "greedy")
            a = float(al[s["tree"]]) if s["tree"] in al and rule == "greedy" else None
            tps = a / s["step_ms"] * 1e3 if a else None
            speedup = tps * hf7 / 1e3 if tps and hf7 else None
            tps_cell = f"{tps:.0f}" if tps else "-"
            speedup_cell = f"{speedup:.2f}" if speedup else "-"
            print(f"| ({s['tree']}) | {rule} | {s['nodes']} | {s['step_ms']:.2f} | "
                  f"{s['forwards_ms']:.2f} | "
                  f"{s['other_pct']:.1f} | {s['syncs']:.0f} | {a or '-'} | {tps_cell} | "
                  f"{speedup_cell} |")  # fmt: skip
    if "check" in results:
        print("\ncheck:", results["check"])


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
