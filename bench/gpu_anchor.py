"""Side-by-side anchor on one GPU (issue 24): gpt-fast's decoding loop and speculative step
against mcsd's engine on the same shapes, in one process, interleaved, and where mcsd's time goes.

Random bf16 weights of the real Qwen2.5 configs (``gpu_step.SIZES``: the default pair's 0.5B
draft and 1.5B target, and the 7B shape), 512-token context, batch 1, greedy. Parts:

- ``plain``    ms per token of plain decoding, per size: (a) gpt-fast's ``decode_n_tokens`` with
               ``decode_one_token`` compiled as its ``generate.py`` does (``mode="reduce-overhead",
               fullgraph=True``; ``dynamic=False``: one process holds several models, see below);
               (b) mcsd's ``Engine`` (``add_request`` / ``step``) with ``tree="none"`` on the fast
               runtime with CUDA graphs (the CLI default);
- ``compile``  the same with mcsd's ``compile="all"`` (``FastModel(compile=True)``) beside both;
- ``spec``     ms per step, 0.5B drafting 1.5B: (c) gpt-fast's ``speculative_decode`` (a chain,
               the draft's real probabilities) at k = 3 / 4; (d) mcsd's engine with the static
               trees ``TREES``; and each step's forwards measured alone (the same shapes, CUDA
               events, median);
- ``profile``  (e) one plain-decoding token (1.5B) and one ``2,2,2`` step: the engine's phases
               (host clock and CUDA events at the boundaries of the target's and draft's forward,
               graph replay, head and commit, the proposer and the verification, by wrapping
               those bound methods on the instances), and torch.profiler over a few steps: GPU
               busy time, kernels, runtime API calls (launches outside graphs, graph launches,
               copies, synchronisations); the same for gpt-fast's decode token; kernels per
               forward of one graph replay.

Each timing part alternates the systems (one run of each per repeat, ``--reps`` repeats) and
reports medians. Random weights make acceptance meaningless: both systems reject at the first
draft token every step (greedy), which is the cheapest path of gpt-fast's step (no extra draft
forward) and the same tree shapes for mcsd. gpt-fast greedy is its ``temperature=0`` (logits /
1e-5, softmax, exponential draw), ``top_k=None``.

gpt-fast is not part of this project: fetch its ``model.py`` and ``generate.py`` into the
git-ignored ``.gpt-fast/`` (``git --git-dir <mirror> show HEAD:model.py > .gpt-fast/model.py``,
the same for ``generate.py``) and carry that folder to the GPU machine. Its ``tokenizer`` import
is satisfied by an empty stand-in module (no tokenizer is used). Importing ``generate`` sets its
inductor options (``coordinate_descent_tuning`` on, as its runs have it); mcsd's compilations run
with that option off, as the mcsd CLI runs them.

Every part in one call takes ~10 min on an H100, most of it compiling (gpt-fast ~90 s per
compiled shape with coordinate_descent_tuning, ~33 s without; mcsd ``compile="all"`` 70-100 s
per size), so the 2026-12-06 record (docs/benchmarks.md) took two calls:

    PYTHONPATH=src python bench/gpu_anchor.py --parts plain,7b,compile --out $OUT
    PYTHONPATH=src python bench/gpu_anchor.py --parts spec,profile --ks 4 --gf-sizes 0.5b \
        --gf-tuning off --reps 3 --out $OUT
    python bench/gpu_anchor.py --table docs/gpu_anchor/2026-12-06/run2_spec_profile.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).parent))
from gpu_step import SIZES, copy_bandwidth, cuda_ms, forward_ms, prompt_ids

GPT_FAST = Path(__file__).resolve().parent.parent / ".gpt-fast"
CONTEXT = 512
GF_CACHE = CONTEXT + 256  # gpt-fast's cache length: it attends over all of it, mcsd over 768
NEW_TOKENS = 64  # timed tokens per repeat of plain decoding
STEPS = 24  # timed steps per repeat of a speculative system
SKIP = 2  # first steps of each repeat not timed (a new request's prefills)
KS = [3, 4]  # gpt-fast's chain lengths (``--ks``)
TREES = ("1,1,1", "1,1,1,1", "2,2,2", "4,2,2")
PROFILE_TREE = "2,2,2"
GF_SAMPLING: dict[str, Any] = {"temperature": 0.0, "top_k": None}
API_CALLS = (  # runtime API names counted per step (torch.profiler's CPU-side events)
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaLaunchKernelExC",
    "cudaGraphLaunch",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaDeviceSynchronize",
    "cudaHostAlloc",
    "cudaEventRecord",
)


# ---------------------------------------------------------------- the two systems
def load_gpt_fast() -> types.ModuleType:
    """gpt-fast's ``generate`` module from ``.gpt-fast/`` (its ``model`` beside it)."""
    if not (GPT_FAST / "model.py").exists() or not (GPT_FAST / "generate.py").exists():
        raise SystemExit(f"{GPT_FAST}/model.py and generate.py are missing: see the docstring")
    sys.path.insert(0, str(GPT_FAST))
    stand_in = types.ModuleType("tokenizer")  # generate.py imports it; nothing here tokenizes
    stand_in.get_tokenizer = None  # type: ignore[attr-defined]
    sys.modules.setdefault("tokenizer", stand_in)
    import generate  # type: ignore[import-not-found]

    # As generate.main does, with dynamic=False: one process decodes with three models, and a
    # second shape would otherwise recompile gpt-fast's function dynamic in every dimension.
    generate.decode_one_token = torch.compile(
        generate.decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False
    )
    generate.model_forward = torch.compile(
        generate.model_forward, mode="reduce-overhead", fullgraph=True, dynamic=False
    )
    generate.decode_n_tokens = batch_one(generate.decode_n_tokens)
    return generate


def batch_one(decode_n_tokens: Callable) -> Callable:
    """gpt-fast's ``decode_n_tokens`` returning batch-1 shapes: since its batch-size change it
    returns tokens ``[1, 1]`` and probabilities ``[1, V]``, which its ``speculative_decode``
    (written for tokens ``[1]`` and probabilities ``[V]``) cannot concatenate (``torch.cat``:
    "Tensors must have same number of dimensions: got 1 and 2"). Views only: the compiled
    ``decode_one_token`` it runs is unchanged."""

    def wrapped(*args: Any, **kwargs: Any) -> tuple[list, list]:
        tokens, probs = decode_n_tokens(*args, **kwargs)
        return [t.view(-1) for t in tokens], [q.view(-1) for q in probs]

    return wrapped


def gf_model(generate: types.ModuleType, size: str) -> torch.nn.Module:
    """gpt-fast's ``Transformer`` with the Qwen2.5 shape of ``size`` (no QKV bias: gpt-fast
    has none), random bf16 weights, caches of ``GF_CACHE`` positions, the context prefilled."""
    from model import ModelArgs, Transformer  # type: ignore[import-not-found]

    hidden, layers, heads, kv, inter, vocab, _tied = SIZES[size]
    args = ModelArgs(
        block_size=4096, vocab_size=vocab, n_layer=layers, n_head=heads, dim=hidden,
        intermediate_size=inter, n_local_heads=kv, rope_base=1e6, norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Transformer(args).eval()
            model.setup_caches(max_batch_size=1, max_seq_length=GF_CACHE)
    finally:
        torch.set_default_dtype(default)
    ids = torch.tensor([prompt_ids(vocab)], dtype=torch.int, device="cuda")
    with torch.no_grad():
        model(ids, torch.arange(CONTEXT, device="cuda"))
    return model


def mcsd_model(size: str, *, compile: bool = False, lm: Any = None) -> Any:
    """mcsd's fast runtime (``FastModel``) on random bf16 weights of ``size`` as the CLI loads
    it (cache of ``STATIC_MAX_LENGTH`` positions, CUDA graphs), warmed for one-token forwards.
    ``lm``: share that model's weights (a compiled twin of a graphs-only runtime)."""
    from mcsd.models.fast import FastModel, architecture
    from mcsd.models.fast import build as build_fast

    hidden, layers, heads, kv, inter, vocab, tied = SIZES[size]
    arch = architecture(
        {
            "model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv,
            "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": tied,
            "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        }
    )  # fmt: skip
    if lm is None:
        lm = build_fast(arch, dtype=torch.bfloat16, device=torch.device("cuda"))
    runtime = FastModel(lm, label=f"random-{size}", compile=compile)
    with torch._inductor.config.patch(coordinate_descent_tuning=False):
        runtime.warmup((1,))
    return runtime


# ---------------------------------------------------------------- timed runs
def gf_decode_ms(generate: types.ModuleType, model: torch.nn.Module, n: int) -> float:
    """ms per token of gpt-fast's decoding loop (no host read per token: one sync at the end).
    ``input_pos`` is int64 as in its speculative step, so both share one compilation."""
    token = torch.zeros(1, 1, dtype=torch.int, device="cuda")
    pos = torch.tensor([CONTEXT], dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        generate.decode_n_tokens(model, token, pos, n, **GF_SAMPLING)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / n * 1e3


def gf_spec_ms(
    generate: types.ModuleType, target: torch.nn.Module, draft: torch.nn.Module, k: int
) -> tuple[float, list[int]]:
    """ms per step of gpt-fast's ``speculative_decode`` driven as its ``generate`` loop does
    (the position on the host, the next token on the device), and the tokens per step."""
    token = torch.zeros((), dtype=torch.int, device="cuda")
    pos, lengths = CONTEXT, []
    with torch.no_grad():
        for i in range(SKIP + STEPS):
            if i == SKIP:
                torch.cuda.synchronize()
                started = time.perf_counter()
            out = generate.speculative_decode(target, draft, token, pos, k, **GF_SAMPLING)
            lengths.append(len(out))
            pos += len(out)
            token = out[-1]
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / STEPS * 1e3, lengths


def mcsd_steps(
    target: Any, draft: Any, tree: str, n: int, probe: Probe | None = None
) -> Iterator[float]:
    """Seconds of each engine step of one request (``tree="none"``: plain decoding, no
    proposer), from ``add_request`` to the ``n``-th step; the request is aborted after."""
    from mcsd.config import GREEDY, SpecConfig
    from mcsd.draft.proposer import Drafter
    from mcsd.engine import Engine

    vocab = target.vocab_size if draft is None else min(target.vocab_size, draft.vocab_size)
    proposer = None if draft is None else Drafter(draft, vocab_size=vocab, device=target.device)
    engine = Engine(target, proposer, vocab_size=vocab)
    spec = SpecConfig(tree=tree, target=GREEDY, max_new_tokens=4 * n + 8, seed=0)
    request = engine.add_request(prompt_ids(vocab), spec)
    if probe is not None:
        probe.attach(engine)
    try:
        for _ in range(n):
            started = time.perf_counter()
            if probe is not None:
                probe.mark("step")
            engine.step()
            if probe is not None:
                probe.mark("/step")
            yield time.perf_counter() - started
    finally:
        if probe is not None:
            probe.detach()
        engine.abort(request)


def mcsd_ms(target: Any, draft: Any, tree: str, n: int) -> float:
    """Median ms per engine step after the first ``SKIP`` steps (the request's prefills)."""
    times = list(mcsd_steps(target, draft, tree, SKIP + n))[SKIP:]
    return statistics.median(times) * 1e3


def interleaved(systems: dict[str, Callable[[], float]], reps: int) -> dict[str, dict]:
    """Each system once per repeat, in turn; median and spread of the repeats."""
    runs: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(reps):
        for name, run in systems.items():
            runs[name].append(run())
    return {
        name: {"ms": statistics.median(v), "min": min(v), "max": max(v), "reps": v}
        for name, v in runs.items()
    }


# ---------------------------------------------------------------- the parts
def plain_part(
    generate: types.ModuleType, gf: dict, mc: dict, size: str, reps: int, compiled: Any = None
) -> dict:
    systems: dict[str, Callable[[], float]] = {
        "gpt-fast": lambda: gf_decode_ms(generate, gf[size], NEW_TOKENS),
        "mcsd graphs": lambda: mcsd_ms(mc[size], None, "none", NEW_TOKENS),
    }
    if compiled is not None:
        systems["mcsd compile=all"] = lambda: mcsd_ms(compiled, None, "none", NEW_TOKENS)
    return interleaved(systems, reps)


def tree_shapes(tree: str) -> tuple[list[int], int]:
    """The draft forwards of one step (the first over the uncached token, then one per level
    with inner nodes) and the target's tree forward, in tokens."""
    from mcsd.tree import TokenTree

    t = TokenTree.parse(tree)
    levels = [sum(1 for u in level if t.children(u)) for level in t.levels]
    return [1, *(n for n in levels if n)], t.num_nodes + 1


def gf_forward_ms(generate: types.ModuleType, model: torch.nn.Module, n: int) -> float:
    """One compiled ``model_forward`` of n tokens after the context (gpt-fast's verification)."""
    ids = torch.zeros(1, n, dtype=torch.int, device="cuda")
    pos = torch.arange(CONTEXT, CONTEXT + n, device="cuda")
    with torch.no_grad():
        return cuda_ms(lambda: generate.model_forward(model, ids, pos))


def spec_part(generate: types.ModuleType, gf: dict, mc: dict, reps: int) -> dict:
    target, draft = mc["1.5b"], mc["0.5b"]
    lengths: dict[str, list[int]] = {}

    def gf_run(k: int) -> Callable[[], float]:
        def run() -> float:
            ms, seen = gf_spec_ms(generate, gf["1.5b"], gf["0.5b"], k)
            lengths[f"gpt-fast k={k}"] = seen
            return ms

        return run

    systems: dict[str, Callable[[], float]] = {f"gpt-fast k={k}": gf_run(k) for k in KS}
    for tree in TREES:
        systems[f"mcsd {tree}"] = lambda tree=tree: mcsd_ms(target, draft, tree, STEPS)
    out: dict[str, Any] = {"steps": interleaved(systems, reps), "gpt-fast tokens/step": lengths}
    # The same shapes' forwards alone (CUDA events, median of 30).
    token = torch.zeros(1, 1, dtype=torch.int, device="cuda")
    pos = torch.tensor([CONTEXT], device="cuda")

    def one_token(size: str) -> None:  # in its loop: the SDPA setting its compilation saw
        generate.decode_n_tokens(gf[size], token, pos.fill_(CONTEXT), 1, **GF_SAMPLING)

    with torch.no_grad():
        decode = {"0.5b": cuda_ms(lambda: one_token("0.5b"))}
    alone: dict[str, Any] = {"gpt-fast decode_one_token": decode}
    for k in KS:
        verify = gf_forward_ms(generate, gf["1.5b"], k + 1)
        alone[f"gpt-fast k={k}"] = {
            "draft": [decode["0.5b"]] * k, "target": verify, "sum": k * decode["0.5b"] + verify
        }  # fmt: skip
    fwd: dict[tuple[str, int], float] = {}
    for tree in TREES:
        drafts, verify = tree_shapes(tree)
        for model, n in [*(("0.5b", d) for d in drafts), ("1.5b", verify)]:
            if (model, n) not in fwd:
                fwd[model, n] = forward_ms(mc[model], n)
        d = [fwd["0.5b", n] for n in drafts]
        alone[f"mcsd {tree}"] = {
            "draft_tokens": drafts, "draft": d, "target_tokens": verify,
            "target": fwd["1.5b", verify], "sum": sum(d) + fwd["1.5b", verify],
        }  # fmt: skip
    out["forwards alone"] = alone
    return out


class Probe:
    """Host clock and a CUDA event at named points of an engine step: wraps bound methods of
    the engine's instances (instance attributes shadowing them, removed by ``detach``). Read
    after the step's own synchronisation, so the events add no synchronisation."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, torch.cuda.Event]] = []
        self._wrapped: list[tuple[object, str]] = []

    def mark(self, label: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append((label, time.perf_counter(), event))

    def wrap(self, obj: object, method: str, label: str) -> None:
        original = getattr(obj, method)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.mark(label)
            out = original(*args, **kwargs)
            self.mark("/" + label)
            return out

        setattr(obj, method, wrapped)
        self._wrapped.append((obj, method))

    def attach(self, engine: Any) -> None:
        target = engine.target
        self.wrap(target, "forward", "target forward")
        self.wrap(target, "forward_rows", "target forward")
        self.wrap(target._graphs, "run", "target replay")
        self.wrap(target, "_logits", "target head")
        self.wrap(target, "commit", "target commit")
        if engine.proposer is not None:
            draft = engine.proposer.model.draft
            self.wrap(engine.proposer, "propose", "propose")
            self.wrap(draft, "forward", "draft forward")
            self.wrap(draft, "forward_rows", "draft forward")
            self.wrap(draft._graphs, "run", "draft replay")
            self.wrap(draft, "_logits", "draft head")
            self.wrap(engine.proposer, "commit", "draft commit")
            self.wrap(engine, "_target_logits", "target logits")

    def detach(self) -> None:
        for obj, method in self._wrapped:
            delattr(obj, method)
        self._wrapped.clear()

    def segments(self) -> list[dict[str, list[float]]]:
        """Per step: ms between consecutive marks, host clock and device (events), keyed
        ``"a -> b"``; the step's wall time under ``"step"``."""
        torch.cuda.synchronize()
        steps, current, last = [], None, None
        for label, host, event in self.marks:
            if label == "step":
                current, last = {"step": [host, event]}, (label, host, event)
                continue
            assert current is not None and last is not None
            key = f"{last[0]} -> {label}"
            host_ms = (host - last[1]) * 1e3
            device_ms = last[2].elapsed_time(event)
            current.setdefault(key, []).append((host_ms, device_ms))
            last = (label, host, event)
            if label == "/step":
                begin = current.pop("step")
                current["step"] = [((host - begin[0]) * 1e3, begin[1].elapsed_time(event))]
                steps.append(current)
        self.marks.clear()
        return steps


def phase_table(steps: list[dict]) -> dict[str, dict[str, float]]:
    """Median over steps of each segment's host and device ms (summed within a step)."""
    keys = list(dict.fromkeys(k for s in steps for k in s))
    out = {}
    for key in keys:
        per = [s[key] for s in steps if key in s]
        out[key] = {
            "calls": len(per[0]),
            "host_ms": round(statistics.median(sum(h for h, _ in p) for p in per), 4),
            "device_ms": round(statistics.median(sum(d for _, d in p) for p in per), 4),
        }
    return out


def kernel_profile(run: Callable[[], None], repeats: int) -> dict[str, Any]:
    """torch.profiler over ``repeats`` calls of ``run`` (after two unprofiled ones): per call,
    GPU kernels and busy time (union of kernel, copy and set intervals), runtime API calls,
    the busiest kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - started) / repeats * 1e3
    events = prof.events()
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in gpu)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    kernels = [e for e in gpu if not e.name.startswith(("Memcpy", "Memset"))]
    api: dict[str, int] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name in API_CALLS:
            api[e.name] = api.get(e.name, 0) + 1
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:80], []).append(e.time_range.elapsed_us())
    top = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)[:12]
    first = min((a for a, _ in spans), default=0.0)
    last = max((b for _, b in spans), default=0.0)
    return {
        "wall_ms_profiled": round(wall, 4),
        "gpu_span_ms": round((last - first) / 1e3 / repeats, 4),
        "gpu_busy_ms": round(busy / 1e3 / repeats, 4),
        "kernels": round(len(kernels) / repeats, 1),
        "copies_and_sets": round((len(gpu) - len(kernels)) / repeats, 1),
        "kernel_ms": round(sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / repeats, 4),
        "api_calls": {k: round(v / repeats, 1) for k, v in sorted(api.items())},
        "top_kernels_us": [
            (round(us / repeats, 1), round(n / repeats, 1), name) for us, n, name in top
        ],
    }


def profile_part(generate: types.ModuleType, gf: dict, mc: dict, decoded: list[str]) -> dict:
    """(e); ``decoded``: the sizes whose gpt-fast decode is compiled."""
    target, draft = mc["1.5b"], mc["0.5b"]
    out: dict[str, Any] = {}
    # Phases of the engine's steps (host clock and CUDA events at the boundaries).
    for name, d, tree in (
        ("mcsd plain 1.5b", None, "none"),
        (f"mcsd {PROFILE_TREE}", draft, PROFILE_TREE),
    ):
        probe = Probe()
        for _ in mcsd_steps(target, d, tree, SKIP + 16, probe):
            pass
        out[f"{name} phases"] = phase_table(probe.segments()[SKIP:])
    # torch.profiler: whole engine steps, gpt-fast's token and step, one graph-replayed forward.
    for name, t, d, tree in (
        ("mcsd plain 0.5b", draft, None, "none"),
        ("mcsd plain 1.5b", target, None, "none"),
        (f"mcsd {PROFILE_TREE}", target, draft, PROFILE_TREE),
    ):
        steps = mcsd_steps(t, d, tree, SKIP + 2 + 8 + 1)
        for _ in range(SKIP):
            next(steps)
        out[f"{name} profile"] = kernel_profile(lambda steps=steps: advance(steps), 8)
        steps.close()
    token = torch.zeros(1, 1, dtype=torch.int, device="cuda")
    pos = torch.tensor([CONTEXT], device="cuda")
    for size in decoded:

        def gf_token(size: str = size) -> None:
            with torch.no_grad():
                generate.decode_n_tokens(gf[size], token, pos.fill_(CONTEXT), 1, **GF_SAMPLING)

        out[f"gpt-fast decode {size} profile"] = kernel_profile(gf_token, 8)
    k = KS[0]

    def gf_step() -> None:
        with torch.no_grad():
            generate.speculative_decode(
                gf["1.5b"], gf["0.5b"], token[0, 0], CONTEXT, k, **GF_SAMPLING
            )

    out[f"gpt-fast k={k} profile"] = kernel_profile(gf_step, 8)
    for size in ("0.5b", "1.5b"):
        out[f"mcsd forward(1) {size} profile"] = forward_profile(mc[size])
    return out


def advance(steps: Iterator[float]) -> None:
    """One more step of a running ``mcsd_steps``."""
    next(steps)


def forward_profile(m: Any) -> dict:
    """Kernels of one graph-replayed one-token forward with its head, after the context."""
    from mcsd.models.base import chain_mask

    m.reset()
    ids = torch.tensor([prompt_ids(m.vocab_size, CONTEXT + 1)], device="cuda")
    m.forward(ids[:, :CONTEXT], torch.arange(CONTEXT, device="cuda")[None],
              chain_mask(CONTEXT, 0, "cuda"), logits="none")  # fmt: skip
    m.commit()
    tokens, positions = ids[:, CONTEXT:], torch.tensor([[CONTEXT]], device="cuda")
    mask = chain_mask(1, 0, "cuda")

    def run() -> None:
        m.forward(tokens, positions, mask, logits="last")
        m.commit([[]])

    out = kernel_profile(run, 8)
    m.reset()
    return out


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="plain,spec,profile,7b,compile")
    parser.add_argument("--compile-sizes", default="1.5b,0.5b", help="sizes of the compile part")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ks", default="3,4", help="gpt-fast's chain lengths (spec part)")
    parser.add_argument(
        "--gf-sizes", default="0.5b,1.5b", help="sizes whose gpt-fast decode is compiled first"
    )
    parser.add_argument(
        "--gf-tuning",
        choices=("on", "off"),
        default="on",
        help="inductor coordinate_descent_tuning for gpt-fast (its generate.py: on; ~2.5x the "
        "compile time)",
    )
    parser.add_argument("--out", default=None, help="folder for anchor.json")
    parser.add_argument("--table", default=None, help="print the table of an anchor.json")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(Path(args.table).read_text()))
        return
    parts = args.parts.split(",")
    out_path = Path(args.out) / "anchor.json" if args.out else None
    results: dict[str, Any] = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "context": CONTEXT,
        "copy_GBps": round(copy_bandwidth() / 1e9, 1),
        "plain": {},
        "times_s": {},
    }

    def save() -> None:
        if out_path is not None:
            out_path.write_text(json.dumps(results, indent=1))

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = fn()
        results["times_s"][name] = round(time.perf_counter() - started, 1)
        print(f"[{results['times_s'][name]:7.1f} s] {name}", flush=True)
        save()
        return value

    def part(name: str, fn: Callable[[], None]) -> None:
        """Run one part; a failure is recorded (with its traceback) and the next part runs."""
        try:
            fn()
        except Exception as error:
            results.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
            print(f"part {name} failed: {error!r}", flush=True)
        save()

    KS[:] = [int(k) for k in args.ks.split(",")]
    decoded = args.gf_sizes.split(",")
    generate = load_gpt_fast()
    torch._inductor.config.coordinate_descent_tuning = args.gf_tuning == "on"
    results["gpt-fast coordinate_descent_tuning"] = args.gf_tuning
    gf: dict[str, torch.nn.Module] = {}
    mc: dict[str, Any] = {}
    for size in ("0.5b", "1.5b"):
        gf[size] = timed(f"gpt-fast {size} build", lambda size=size: gf_model(generate, size))
        if size in decoded:
            timed(f"gpt-fast {size} compile", lambda size=size: gf_decode_ms(generate, gf[size], 4))
        mc[size] = timed(f"mcsd {size} build+capture", lambda size=size: mcsd_model(size))

    def plain() -> None:
        for size in ("0.5b", "1.5b"):
            results["plain"][size] = plain_part(generate, gf, mc, size, args.reps)
            print(size, json.dumps(summary(results["plain"][size])), flush=True)

    def spec() -> None:
        for k in KS:  # compile gpt-fast's verification shape (k + 1 tokens) before timing
            timed(
                f"gpt-fast k={k} compile",
                lambda k=k: gf_spec_ms(generate, gf["1.5b"], gf["0.5b"], k),
            )
        results["spec"] = timed("spec", lambda: spec_part(generate, gf, mc, args.reps))
        print(json.dumps(summary(results["spec"]["steps"])), flush=True)

    def profile() -> None:
        results["profile"] = timed("profile", lambda: profile_part(generate, gf, mc, decoded))

    def seven() -> None:
        gf["7b"] = timed("gpt-fast 7b build", lambda: gf_model(generate, "7b"))
        timed("gpt-fast 7b compile", lambda: gf_decode_ms(generate, gf["7b"], 4))
        mc["7b"] = timed("mcsd 7b build+capture", lambda: mcsd_model("7b"))
        results["plain"]["7b"] = plain_part(generate, gf, mc, "7b", args.reps)
        print("7b", json.dumps(summary(results["plain"]["7b"])), flush=True)
        del gf["7b"], mc["7b"]
        gc.collect()
        torch.cuda.empty_cache()

    def compiled() -> None:
        results.setdefault("compile", {})
        for size in args.compile_sizes.split(","):
            twin = timed(
                f"mcsd {size} compile=all",
                lambda size=size: mcsd_model(size, compile=True, lm=mc[size].lm),
            )
            results["compile"][size] = plain_part(generate, gf, mc, size, args.reps, twin)
            print(size, json.dumps(summary(results["compile"][size])), flush=True)
            del twin
            save()

    functions = {"plain": plain, "spec": spec, "profile": profile, "7b": seven, "compile": compiled}
    for name in parts:
        part(name, functions[name])
    save()
    print_table(results)


def summary(runs: dict[str, dict]) -> dict[str, float]:
    return {name: round(r["ms"], 3) for name, r in runs.items()}


def print_table(r: dict) -> None:
    print(f"\n{r['card']} {r['date']} torch {r['torch']}, copy bandwidth {r['copy_GBps']} GB/s,"
          f" context {r['context']}, batch 1, greedy; medians of interleaved repeats")  # fmt: skip
    print(
        "\n| size | gpt-fast ms/token | mcsd graphs | x gpt-fast | mcsd compile=all | x gpt-fast |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for size, row in r.get("plain", {}).items():
        gf, graphs = row["gpt-fast"]["ms"], row["mcsd graphs"]["ms"]
        comp = r.get("compile", {}).get(size, {})
        c = comp.get("mcsd compile=all", {}).get("ms")
        cgf = comp.get("gpt-fast", {}).get("ms")
        cells = f"{c:.2f} (gpt-fast {cgf:.2f} beside it) | {c / cgf:.2f}" if c else "- | -"
        print(f"| {size} | {gf:.2f} | {graphs:.2f} | {graphs / gf:.2f} | {cells} |")
    spec = r.get("spec")
    if spec:
        print("\n| step, 0.5b drafting 1.5b | ms/step | forwards alone ms | step / forwards |")
        print("|---|---:|---:|---:|")
        for name, run in spec["steps"].items():
            alone = spec["forwards alone"].get(name, {}).get("sum")
            ratio = f"{run['ms'] / alone:.2f}" if alone else "-"
            print(f"| {name} | {run['ms']:.2f} | {alone or 0:.2f} | {ratio} |")
    prof = r.get("profile", {})
    rows = [k for k in prof if k.endswith(" profile")]
    if rows:
        print("\n| profiled (per token / step / forward) | wall ms | GPU busy ms | kernels | "
              "launches outside graphs | graph launches | syncs |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|")
        for k in rows:
            p, api = prof[k], prof[k].get("api_calls", {})
            launches = sum(api.get(n, 0) for n in API_CALLS[:4])
            syncs = sum(api.get(n, 0) for n in API_CALLS[7:10])
            print(f"| {k[:-8]} | {p['wall_ms_profiled']:.2f} | {p['gpu_busy_ms']:.2f} | "
                  f"{p['kernels']:.0f} | {launches:.0f} | {api.get('cudaGraphLaunch', 0):.0f} | "
                  f"{syncs:.0f} |")  # fmt: skip
    for k in (k for k in prof if k.endswith(" phases")):
        print(f"\n{k} (median per step: calls, host ms, device ms between the marks)")
        for segment, v in prof[k].items():
            print(f"  {segment:42s} {v['calls']:3d} {v['host_ms']:8.3f} {v['device_ms']:8.3f}")
    for name, text in r.get("errors", {}).items():
        print(f"\nerror in {name}:\n{text[-600:]}")


if __name__ == "__main__":
    main()
