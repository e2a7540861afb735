"""Command-line options shared by ``generate``, ``bench``, ``tune`` and ``serve``.

- ``add_model_arguments`` / ``load_pair_from_args``: which models, on which runtime, device and
  precision;
- ``add_decoding_arguments`` / ``spec_from_args``: tree, rule, both samplers, lengths, stops;
- ``add_bench_arguments`` / ``add_sweep_arguments`` / ``load_questions``: what ``bench`` and
  ``tune`` share;
- ``tree_default``: when ``--tree`` is not given, the tree ``mcsd tune`` saved for this pair,
  device, dtype and runtime (``mcsd.bench.tuned``), else ``DEFAULT_TREE``, with the one line the
  command prints about it;
- ``add_adaptive_argument`` / ``adaptive_from_args``: ``--adaptive-tree`` (``mcsd.budget``), on
  by default where ``RUNTIME_ADAPTIVE_TREE`` says so.
Every default comes from ``mcsd.config`` (the library's) or ``mcsd.bench.defaults``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mcsd.bench.defaults import BenchDefaults, SweepDefaults
from mcsd.config import (
    COMPILE_CHOICES,
    DEFAULT_ADAPTIVE_TREE,
    DEFAULT_DTYPE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROPOSER,
    DEFAULT_RUNTIME,
    DEFAULT_TEMPERATURE,
    DEFAULT_TREE,
    PROPOSERS,
    RUNTIME_ADAPTIVE_TREE,
    RUNTIME_DEFAULT_TREES,
    ContextConfig,
    ParallelConfig,
    SamplingConfig,
    SpecConfig,
)
from mcsd.models.factory import DTYPE_CHOICES, RUNTIME_CHOICES
from mcsd.sources.registry import DEFAULT_TARGET
from mcsd.verify.rules import RULE_NAMES

if TYPE_CHECKING:
    from mcsd.api import ModelPair


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--target/--draft/--runtime/--dtype/--device/--compile."""
    parser.add_argument(
        "--target", default=None, help="target model: known name, local dir or HF id"
    )
    parser.add_argument("--draft", default=None, help="draft model: known name, local dir or HF id")
    parser.add_argument(
        "--runtime",
        default=DEFAULT_RUNTIME,
        choices=RUNTIME_CHOICES,
        help="how the models run: llama.cpp (GGUF files, quantised CPU kernels), hf "
        "(transformers, dynamic cache), hf-static (mcsd's static KV cache, CUDA graphs on GPUs); "
        "auto (default) picks llama.cpp for GGUF models on a CPU when llama-cpp-python is "
        "installed, else hf",
    )
    parser.add_argument(
        "--static-cache",
        action="store_const",
        const="hf-static",
        dest="runtime",
        help="the same as --runtime hf-static",
    )
    parser.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        choices=DTYPE_CHOICES,
        help="weights and compute precision (auto: bfloat16 where the CPU/GPU supports it)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--compile",
        default="none",
        choices=COMPILE_CHOICES,
        help="with --runtime hf-static or fast: torch.compile the draft or both models "
        "(hf-static ~30 s per shape; fast ~2 min per model, once, then no recompilation)",
    )
    parser.add_argument(
        "--tp",
        type=int,
        default=ParallelConfig.size,
        help="tensor-parallel processes for the target on the fast runtime (generate, bench: "
        "NCCL over that many GPUs, gloo on a CPU); the draft is replicated on each",
    )
    parser.add_argument(
        "--check-ranks",
        action="store_true",
        help="with --tp: check every step that the ranks agree on tokens and accepted path",
    )


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse a bad runtime / device / dtype / compile combination before any slow work."""
    from mcsd.models.factory import check_options, parse_device, parse_dtype, runtime_kind

    device = parse_device(args.device)
    parse_dtype(args.dtype, device)
    kind = runtime_kind(args.runtime, device, args.target or DEFAULT_TARGET, args.dtype)
    check_options(kind, compile=False, max_length=None, dtype=args.dtype)
    try:
        check_options(kind, compile=args.compile != "none", max_length=None)
    except ValueError:
        raise ValueError(
            f"--compile {args.compile} needs --runtime hf-static or fast (got {kind.name})"
        ) from None


def load_pair_from_args(args: argparse.Namespace, *, load_draft: bool | None = None) -> ModelPair:
    """The pair named by ``add_model_arguments``' options; the draft is loaded when
    ``load_draft`` says so (None: unless ``--proposer context``, which needs none)."""
    from mcsd.api import load_pair
    from mcsd.config import LlamaCppConfig

    threads = getattr(args, "threads", None)  # bench / tune: torch's and llama.cpp's threads
    tp = ParallelConfig(size=args.tp).size
    if tp > 1 and args.command not in PARALLEL_COMMANDS:
        raise ValueError(
            f"--tp {tp}: tensor parallelism runs under mcsd {' and '.join(PARALLEL_COMMANDS)}, "
            f"not {args.command}"
        )
    return load_pair(
        args.target,
        args.draft,
        runtime=args.runtime,
        dtype=args.dtype,
        device=args.device,
        compile=args.compile,
        llamacpp=LlamaCppConfig(threads=threads) if threads else None,
        load_draft=(
            getattr(args, "proposer", DEFAULT_PROPOSER) != "context"
            if load_draft is None
            else load_draft
        ),
        tp=tp,
        check_ranks=args.check_ranks,
    )


PARALLEL_COMMANDS = ("generate", "bench")  # the commands --tp N > 1 launches on N ranks


def run_parallel(args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int | None:
    """With ``--tp N > 1`` in a process of no group yet: ``run(args)`` on N ranks
    (``mcsd.models.fast.parallel.launch``: this process is rank 0 and its exit code is
    returned; the others follow with their output silenced and their results in a scratch
    folder). None when this process runs ``run`` itself: one process, or a rank already (a
    spawned one, or torchrun's, which silences ranks > 0 here)."""
    import torch.distributed as dist

    tp = ParallelConfig(size=args.tp).size
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if int(os.environ["RANK"]) > 0:
            _follower(args)
        return None
    if tp == 1 or dist.is_initialized():
        return None
    from mcsd.models.factory import check_parallel, parse_device
    from mcsd.models.fast.parallel import launch

    check_parallel(ParallelConfig(size=tp), args.runtime)  # before any process starts
    if getattr(args, "prompt", None) == "-":  # followers have no standard input
        args = argparse.Namespace(**{**vars(args), "prompt": sys.stdin.read()})
    return int(launch(_rank_command, tp, (run, args), device=parse_device(args.device)))


def _rank_command(
    rank: int, world: int, run: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    if rank:
        _follower(args)
    return run(args)


def _follower(args: argparse.Namespace) -> None:
    """A rank > 0: no output of its own, results in a scratch folder."""
    quiet = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process)
    sys.stdout = sys.stderr = quiet
    if hasattr(args, "out"):
        args.out = tempfile.mkdtemp(prefix="mcsd-rank-")
    if hasattr(args, "no_plots"):
        args.no_plots = True


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Tree, rule and sampling options."""
    parser.add_argument(
        "--tree",
        default=None,
        help="k-config like 4,2,2 (1,1,1,1 = chain), JSON rank paths, or a tree grown per step "
        "dynamic:BUDGET[:WIDTH[:DEPTH]] (e.g. dynamic:16); default: the tree mcsd "
        f"tune saved for the pair here, else {DEFAULT_TREE}",
    )
    parser.add_argument("--rule", default=None, choices=RULE_NAMES, help="verification rule")
    parser.add_argument(
        "--proposer",
        default=DEFAULT_PROPOSER,
        choices=PROPOSERS,
        help="what drafts each step's tree: model (the draft model, --tree), context "
        "(continuations copied from the prompt and the output: no draft model is loaded), "
        f"mixed (both in one tree); default {DEFAULT_PROPOSER}",
    )
    parser.add_argument(
        "--context-nodes",
        type=int,
        default=ContextConfig.max_nodes,
        help=f"node budget of the context tree (default {ContextConfig.max_nodes})",
    )
    parser.add_argument(
        "--context-depth",
        type=int,
        default=ContextConfig.max_depth,
        help=f"deepest context continuation (default {ContextConfig.max_depth})",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"target temperature, 0 = greedy (default {DEFAULT_TEMPERATURE:g})",
    )
    parser.add_argument("--top-k", type=int, default=0, help="target top-k (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="target top-p (1 = off)")
    parser.add_argument(
        "--draft-temperature",
        type=float,
        default=None,
        help="draft temperature (default: target's)",
    )
    parser.add_argument("--draft-top-k", type=int, default=None, help="draft top-k")
    parser.add_argument("--draft-top-p", type=float, default=None, help="draft top-p")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")


def spec_from_args(args: argparse.Namespace, tree: Any = None) -> SpecConfig:
    """The ``SpecConfig`` of the decoding options; ``tree`` when ``--tree`` is not given."""
    target = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    overrides = (args.draft_temperature, args.draft_top_k, args.draft_top_p)
    draft = None
    if any(value is not None for value in overrides):
        draft = SamplingConfig(
            temperature=target.temperature
            if args.draft_temperature is None
            else args.draft_temperature,
            top_k=target.top_k if args.draft_top_k is None else args.draft_top_k,
            top_p=target.top_p if args.draft_top_p is None else args.draft_top_p,
        )
    from mcsd.bench.methods import parse_tree

    chosen = args.tree if args.tree is not None else tree
    return SpecConfig(
        tree=DEFAULT_TREE if chosen is None else parse_tree(chosen),
        rule=args.rule,
        target=target,
        draft=draft,
        max_new_tokens=args.max_new_tokens,
        stop_strings=tuple(args.stop),
        seed=args.seed,
        proposer=args.proposer,
        context=ContextConfig(max_nodes=args.context_nodes, max_depth=args.context_depth),
    )


def tree_default(args: argparse.Namespace) -> tuple[str, str]:
    """The tree to use when ``--tree`` is not given, and the log line that says where it came
    from: the tree ``mcsd tune`` saved for these models, device, dtype and runtime, else the
    runtime's ``RUNTIME_DEFAULT_TREES`` entry, else ``DEFAULT_TREE``. Read before the models
    load, so the command's first line can say it."""
    from mcsd.bench.tuned import tuned_entry, tuned_key_for
    from mcsd.models.factory import parse_device, runtime_kind

    check_model_arguments(args)
    key = tuned_key_for(args.target, args.draft, args.device, args.dtype, args.runtime)
    entry = tuned_entry(key)
    if entry is None:
        kind = runtime_kind(
            args.runtime, parse_device(args.device), args.target or DEFAULT_TARGET, args.dtype
        )
        tree = RUNTIME_DEFAULT_TREES.get(kind.name, DEFAULT_TREE)
        where = "the default" + (f" on {kind.name}" if kind.name in RUNTIME_DEFAULT_TREES else "")
        return tree, f"tree {tree} ({where}; mcsd tune finds a faster one)"
    return entry["tree"], (
        f"tree {entry['tree']} saved by mcsd tune for {key} on {entry.get('saved', '?')} "
        "(--tree overrides it)"
    )


def add_adaptive_argument(parser: argparse.ArgumentParser) -> None:
    """``--adaptive-tree`` / ``--no-adaptive-tree`` (None when neither is given)."""
    on = ", ".join(name for name, value in RUNTIME_ADAPTIVE_TREE.items() if value)
    parser.add_argument(
        "--adaptive-tree",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pick each step's tree among --tree, its smaller prefixes and plain decoding from "
        "the models' measured step cost and the acceptance seen so far, so that speculation "
        "that does not pay switches itself off (still lossless); default: on with the "
        f"{on} runtime, else off",
    )


def adaptive_from_args(args: argparse.Namespace, spec: SpecConfig) -> tuple[bool, str | None]:
    """Whether ``--adaptive-tree`` is on for ``spec`` (asked for, else the runtime's
    ``RUNTIME_ADAPTIVE_TREE`` entry, else ``DEFAULT_ADAPTIVE_TREE``) and the words the first log
    line says about it (None when off). Asked for with a tree it cannot shrink (``none``, a
    dynamic tree, the context or mixed proposer) or with ``--tp`` > 1 (every rank would measure
    its own costs and pick its own trees): ``ValueError``."""
    asked = args.adaptive_tree
    static = spec.speculative and spec.dynamic is None and spec.proposer == "model"
    parallel = getattr(args, "tp", 1) > 1
    if asked:
        if not static:
            raise ValueError(
                f"--adaptive-tree picks among the prefixes of a static draft tree; --tree "
                f"{spec.describe_tree()} with --proposer {spec.proposer} has none"
            )
        if parallel:
            raise ValueError("--adaptive-tree with --tp > 1: each rank would pick its own trees")
        return True, "adaptive tree (--adaptive-tree)"
    if asked is False or not static or parallel:
        return False, None
    name = _runtime_name(args)
    if not RUNTIME_ADAPTIVE_TREE.get(name, DEFAULT_ADAPTIVE_TREE):
        return False, None
    return True, f"adaptive tree (the default on {name}; --no-adaptive-tree turns it off)"


def announce_tree(args: argparse.Namespace, origin: str, adaptive_origin: str | None) -> None:
    """The command's first log line: where its tree (no ``--tree`` given) and its
    ``--adaptive-tree`` (``adaptive_from_args``) come from; nothing when neither needs saying."""
    said = ([origin] if args.tree is None else []) + ([adaptive_origin] if adaptive_origin else [])
    if said:
        print(f"mcsd: {', '.join(said)}", file=sys.stderr)


def log_tree_budget(pair: ModelPair, spec: SpecConfig, rows: int) -> None:
    """Measure ``spec``'s adaptive budget at ``rows`` rows now (``ModelPair.tree_budget``: the
    engines reuse it, so the generation's time leaves it out) and log what it implies."""
    budget = pair.tree_budget(spec.token_tree(), rows)
    print(f"mcsd: adaptive tree: {budget.describe(rows)}", file=sys.stderr)


def _runtime_name(args: argparse.Namespace) -> str:
    """The runtime ``--runtime`` resolves to (``auto`` decided as ``load_pair`` will)."""
    from mcsd.models.factory import parse_device, runtime_kind

    device = parse_device(args.device)
    return runtime_kind(args.runtime, device, args.target or DEFAULT_TARGET, args.dtype).name


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Everything ``bench`` and ``tune`` share."""
    add_model_arguments(parser)
    add_decoding_arguments(parser)
    parser.set_defaults(seed=BenchDefaults.seed)  # reproducible unless asked otherwise
    parser.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="humaneval, humaneval-edit, mt-bench, mt-bench-2nd, sharegpt or a file path "
        "(repeatable; default: "
        f"{' and '.join(BenchDefaults.datasets)})",
    )
    parser.add_argument(
        "--n", type=int, default=BenchDefaults.n, help="prompts per dataset (seeded sample)"
    )
    parser.add_argument(
        "--turns", type=int, default=BenchDefaults.turns, help="user turns per question"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"default: {' '.join(BenchDefaults.methods)} ({{tree}}: see --tree)",
    )
    parser.add_argument("--out", default=BenchDefaults.out, help="output directory")
    parser.add_argument(
        "--draft-vocab",
        default=None,
        help="FR-Spec: mcsd drafts score only the K most frequent tokens (e.g. 32k); same as "
        "adding +fr=K to every sps/tree method",
    )
    parser.add_argument(
        "--draft-int8",
        action="store_true",
        help="int8 weights for mcsd drafts (CPU); same as adding +int8 to every sps/tree method",
    )
    parser.add_argument(
        "--warmup-tokens",
        type=int,
        default=BenchDefaults.warmup_tokens,
        help="0 disables the warm-up",
    )
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch and of llama.cpp (default: torch's choice; llama.cpp: every "
        "CPU this process may use)",
    )


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """``mcsd tune`` and ``mcsd bench --sweep``."""
    parser.add_argument(
        "--budgets",
        default=",".join(map(str, SweepDefaults.budgets)),
        help="node budgets (comma-separated)",
    )
    parser.add_argument(
        "--verify",
        type=int,
        default=SweepDefaults.verify,
        help="best predicted shapes to run for real (0: none)",
    )
    parser.add_argument(
        "--max-depth", type=int, default=SweepDefaults.max_depth, help="deepest candidate tree"
    )


def load_questions(args: argparse.Namespace) -> list[Any]:
    """The prompts ``--dataset`` / ``--n`` / ``--turns`` / ``--seed`` name."""
    from mcsd.bench.datasets import load_dataset

    questions = []
    for name in args.dataset or BenchDefaults.datasets:
        questions += load_dataset(name, n=args.n, seed=args.seed, turns=args.turns)
    return questions
