"""Frozen configuration dataclasses: the only home of defaults and of input validation.

Every bad value raises ``ValueError`` naming the parameter and the allowed values, so a mistake
on the command line, in the server or in Python never surfaces as a stack trace from torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from mcsd.tree import TokenTree
from mcsd.verify.rules import get_rule

DEFAULT_TEMPERATURE = 1.0  # CLI, Python API and server alike (the OpenAI API's default)
DEFAULT_TREE = "4,2,2"  # 4 + 8 + 16 = 28 nodes: the paper's favourite shape for 2-4x size gaps
DEFAULT_MAX_TREE_NODES = 1024  # a target forward over more nodes is never worth it
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_MAX_BATCH = 16  # rows decoded side by side (a list of prompts in the API, the server)
COMPILE_CHOICES = ("none", "draft", "all")  # load_pair(compile=...): which models to compile
DEFAULT_RUNTIME = "auto"  # mcsd.models.factory.RUNTIMES: auto picks the fastest for the machine
DEFAULT_DTYPE = "auto"  # bfloat16 where the CPU/GPU computes it natively, else float32
DEFAULT_ATTENTION = "sdpa"  # transformers attention implementation ("eager" also works)

# The static-cache runtime (mcsd.models.static)
STATIC_MAX_LENGTH = 4096  # cache positions per row when the model allows that many
MAX_GRAPH_TOKENS = 128  # new tokens per forward up to which forwards are padded and captured
ATTENTION_BLOCK = 256  # attention length granularity: fewer graphs, little wasted attention

# The llama.cpp runtime (mcsd.models.llamacpp)
LLAMA_MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids one context can hold


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be an integer <= {high}, got {value!r}")


@dataclass(frozen=True)
class LlamaCppConfig:
    """One llama.cpp context (``mcsd.models.llamacpp``); the target and the draft get one each.

    KV cells = ``context + pending_cells``: the committed tokens of a row use at most
    ``context`` positions, and a step's pending block (a token tree) needs its own cells on top.
    A tree is scored in one ``llama_decode`` with one sequence id per root-to-leaf path, so
    ``sequences`` bounds the leaves of a tree (plus one id for the committed tokens).
    """

    context: int = STATIC_MAX_LENGTH  # positions per row (capped at the model's training length)
    pending_cells: int = DEFAULT_MAX_TREE_NODES + 1  # room for the largest tree and its root
    threads: int | None = None  # None: every CPU this process may run on
    batch_threads: int | None = None  # threads of multi-token decodes; None: as ``threads``
    # Tokens per llama_decode (longer forwards are split); every token's logits are kept, so the
    # output buffer is batch x vocabulary floats (512 x 151,936 x 4 B = 311 MB for Qwen).
    batch: int = 512
    sequences: int = 128  # sequence ids: 127 tree leaves at most (llama.cpp allows 256)
    # llama.cpp's repacked CPU weight layouts ("extra buffer types"); False is the documented way
    # around kernels that crash on some CPUs (AMX, see .ci/prepare)
    repack: bool = True
    # Flash attention stays off: with it, llama.cpp 0.3.36 on the CPU gets the next token wrong
    # (logits off by ~0.5, exact without it) once a commit kept any path but the first and the
    # new token fills a freed cell before the kept one (tests/test_llamacpp.py checks this case)
    flash_attention: bool = False
    verbose: bool = False  # llama.cpp's own log lines on stderr

    def thread_counts(self) -> tuple[int, int]:
        """``(threads, batch_threads)`` with the defaults resolved for this machine."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on every platform
            cpus = os.cpu_count() or 1
        threads = self.threads or cpus
        return threads, self.batch_threads or threads

    def __post_init__(self) -> None:
        _check_int("context", self.context, 2)
        _check_int("pending_cells", self.pending_cells, 1)
        for name in ("threads", "batch_threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("batch", self.batch, 1)
        _check_int("sequences", self.sequences, 2, LLAMA_MAX_SEQUENCES)
        if self.batch < self.sequences:  # llama.cpp asserts it (llama_context::output_reserve)
            raise ValueError(
                f"batch ({self.batch}) must be >= sequences ({self.sequences}): llama.cpp keeps "
                "room for one row of logits per sequence id in every decode"
            )
        for name in ("repack", "flash_attention", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How logits become a distribution (see ``mcsd.sampling.warp`` for the order)."""

    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1.0 = disabled

    def __post_init__(self) -> None:
        temperature = _check_number("temperature", self.temperature)
        if temperature < 0 or math.isinf(temperature):
            raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        top_p = _check_number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingConfig(temperature=0.0)


@dataclass(frozen=True)
class SpecConfig:
    """One speculative generation: tree, verification rule, both samplers, stopping.

    ``tree`` is a k-config (``(4, 2, 2)`` or ``"4,2,2"``), a list of paths (each path a list of
    sibling ranks, Medusa style) or a ``TokenTree``. ``rule=None`` picks the natural rule:
    ``greedy`` for a greedy target, ``topk`` for a greedy draft under a sampling target, ``sps``
    for a chain and ``mcss-wor`` otherwise.
    """

    tree: TokenTree | str | tuple[int, ...] | list = DEFAULT_TREE
    rule: str | None = None
    target: SamplingConfig = field(default_factory=SamplingConfig)
    draft: SamplingConfig | None = None  # None: the same as the target
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS ids
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    max_tree_nodes: int = DEFAULT_MAX_TREE_NODES
    speculate: bool = True  # False: plain decoding, the target alone (one token per step)

    def __post_init__(self) -> None:
        if not isinstance(self.speculate, bool):
            raise ValueError(f"speculate must be True or False, got {self.speculate!r}")
        if not isinstance(self.target, SamplingConfig):
            raise ValueError(f"target must be a SamplingConfig, got {type(self.target).__name__}")
        if self.draft is not None and not isinstance(self.draft, SamplingConfig):
            raise ValueError(f"draft must be a SamplingConfig, got {type(self.draft).__name__}")
        if self.rule is not None:
            get_rule(self.rule)
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {m!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        if not isinstance(self.stop_strings, list | tuple):
            raise ValueError(
                f"stop_strings must be a string or a list of strings, got {self.stop_strings!r}"
            )
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop_strings must be non-empty strings, got {s!r}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list | tuple | set | frozenset):
                raise ValueError(
                    f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}"
                )
            ids = tuple(self.stop_token_ids)
            if not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"stop_token_ids must be non-negative integers, got {ids!r}")
            object.__setattr__(self, "stop_token_ids", ids)
        # Build the tree now so a bad shape fails at configuration time, not mid-generation.
        object.__setattr__(self, "tree", self.token_tree())
        self.resolved_rule()

    @property
    def draft_sampling(self) -> SamplingConfig:
        return self.target if self.draft is None else self.draft

    def token_tree(self) -> TokenTree:
        return TokenTree.parse(self.tree, max_nodes=self.max_tree_nodes)

    def resolved_rule(self) -> str:
        """The rule used, after defaults, checked against the samplers and the tree."""
        tree = self.token_tree()
        if self.rule is None:
            if self.target.greedy:
                return "greedy"
            if self.draft_sampling.greedy:
                return "topk"
            return "sps" if tree.max_children == 1 else "mcss-wor"
        rule = get_rule(self.rule)
        if self.target.greedy and rule.target == "sampling":
            # Every lossless rule reduces to greedy when p is one-hot; say so rather than guess.
            raise ValueError(
                f"rule {rule.name!r} needs a sampling target; with temperature 0 use rule "
                "'greedy' (or leave rule unset)"
            )
        if not self.target.greedy and rule.target == "greedy":
            raise ValueError(
                f"rule {rule.name!r} emits the target's argmax: it needs temperature 0; for a "
                "sampling target leave rule unset (or use 'topk' with a greedy draft)"
            )
        if rule.max_children is not None and tree.max_children > rule.max_children:
            raise ValueError(
                f"rule {rule.name!r} verifies one candidate per node, but tree {tree.describe()} "
                f"has nodes with {tree.max_children} children; use 'mcss' or 'mcss-wor'"
            )
        if self.draft_sampling.greedy and rule.reads_q:
            raise ValueError(
                f"rule {rule.name!r} needs the draft's sampling distribution q, but the draft is "
                "greedy (draft temperature 0); use rule 'topk' (deterministic candidates) instead"
            )
        return rule.name


# ------------------------------------------------------------------ the commands' defaults
@dataclass(frozen=True)
class BenchDefaults:
    """``mcsd bench`` / ``mcsd tune`` (``mcsd.bench``)."""

    datasets: tuple[str, ...] = ("humaneval", "mt-bench")
    # {tree} is the tree mcsd tune saved for the pair here, else DEFAULT_TREE
    methods: tuple[str, ...] = (
        "hf-ar",
        "hf-assisted",
        "hf-assisted:5",
        "ar",
        "sps:4",
        "tree:{tree}",
    )
    # on the llama.cpp runtime: llama.cpp's own loops instead of transformers'
    llamacpp_methods: tuple[str, ...] = (
        "llama-ar",
        "llama-spec",
        "llama-spec:16:0.75",  # the best llama-server setting measured in issue 13
        "ar",
        "sps:4",
        "tree:{tree}",
    )
    n: int = 10  # prompts per dataset (seeded sample)
    turns: int = 1
    seed: int = 0  # a benchmark is reproducible unless asked otherwise
    out: str = "bench-out"
    warmup_tokens: int = 16  # enough to run every tree level and the verification shapes once
    hf_static_length: int = 4096  # hf-static's cache: one shape, one compilation for all prompts


@dataclass(frozen=True)
class SweepDefaults:
    """``mcsd tune`` / ``mcsd bench --sweep`` (``mcsd.bench.sweep``)."""

    budgets: tuple[int, ...] = (4, 8, 16, 32, 64)
    verify: int = 3  # best predicted shapes run for real
    max_depth: int = 10
    n: int = 4  # prompts per dataset for mcsd tune
    out: str = "tune-out"
    chain: str = "sps:4"  # produces the reference answers (and calibrates the step overhead)
    cost_sizes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80)


@dataclass(frozen=True)
class BudgetDefaults:
    """The adaptive tree budget (``mcsd.budget``)."""

    acceptance: float = 0.6  # prior acceptance rate of one candidate (a 2-4x size-gap pair)
    repeats: int = 3  # timed forwards per probed size (the median counts)
    probe_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # in all


@dataclass(frozen=True)
class ServeDefaults:
    """``mcsd serve`` (``mcsd.server``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 64  # requests waiting behind the running ones; more get 429
    max_batch: int = 1  # generations decoded side by side (rows of the batch engine)
    adaptive_tree: bool = False  # measure the step cost; the default tree shrinks with the batch
    max_body_bytes: int = 16 << 20  # far beyond any context, small enough to refuse junk early
    disconnect_poll_s: float = 0.05  # how often a waiting request checks its client is there
    unbounded_max_tokens: int = 1 << 20  # max_tokens cap when the models declare no limit


@dataclass(frozen=True)
class CheckDefaults:
    """``mcsd check`` (``mcsd.checks``)."""

    seed: int = 0
    alpha: float = 1e-6  # false-failure probability of each statistical test
    k: int = 3
    vocab: int = 8
    trials: int = 100_000
    engine_trials: int = 20_000
    ks: tuple[int, ...] = (2, 3, 4)
    random_pairs: int = 200
    random_vocab: int = 50
    samples: int = 256  # Monte Carlo chains per pair for mcss-wor with k >= 3
    pairs: str = "tests/data/qwen_pairs.pt"  # captured by python -m mcsd.checks.capture


@dataclass(frozen=True)
class CaptureDefaults:
    """``python -m mcsd.checks.capture``."""

    prompts: int = 16
    new_tokens: int = 40
    per_prompt: int = 19
    temperature: float = 1.0
    top: int = 1024  # tokens kept per pair
    seed: int = 0


HF_STATIC_LENGTH = BenchDefaults.hf_static_length
FREQUENT_CORPUS_CHARS = 8_000_000  # per corpus source: stable counts of the top 32k tokens
