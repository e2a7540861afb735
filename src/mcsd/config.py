"""The library's frozen configuration records, their defaults and their validation.

Every bad value raises ``mcsd.errors.ParamError`` (a ``ValueError``) naming the parameter and
the allowed values, with the parameter's name as data (``error.param``), so a mistake on the
command line, in the server or in Python never surfaces as a stack trace from torch.
``SamplingConfig`` lives in ``mcsd.sampling`` (beside the code that reads it) and is exported
here. The commands keep their own option defaults: ``mcsd.bench.defaults`` (bench, tune),
``mcsd.server.defaults`` (serve) and ``mcsd.checks.defaults`` (check, capture).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mcsd.errors import ParamError, check_int
from mcsd.sampling import DEFAULT_TEMPERATURE as DEFAULT_TEMPERATURE
from mcsd.sampling import SamplingConfig
from mcsd.tree import TokenTree
from mcsd.verify.rules import Rule, get_rule

DEFAULT_TREE = "4,2,2"  # 4 + 8 + 16 = 28 nodes: the paper's favourite shape for 2-4x size gaps
# The CLI's default per runtime where 4,2,2 does not fit it: on llama.cpp's CPU kernels a decode of
# N tokens costs ~0.6 N single-token decodes (docs/benchmarks.md, 2026-12-02), so a 28-node tree
# costs ~10 target steps; a 3-token chain (llama.cpp's own default draft length) is its best tree.
RUNTIME_DEFAULT_TREES = {"llama.cpp": "1,1,1"}
# The CLI's default of --adaptive-tree (mcsd generate: the tree picked per step from measured step
# costs and the acceptance seen so far, mcsd.budget), per runtime: on llama.cpp's CPU kernels the
# draft costs ~0.65 of the target per token, so speculation rarely pays and must switch itself off.
DEFAULT_ADAPTIVE_TREE = False
RUNTIME_ADAPTIVE_TREE = {"llama.cpp": True}
DEFAULT_MAX_TREE_NODES = 1024  # a target forward over more nodes is never worth it
DEFAULT_MAX_NEW_TOKENS = 128
VERIFIER_CACHE = 64  # verifiers an engine keeps (per tree shape, node flags, rule, sampling)
EXPECTED_LENGTH_CACHE = 4096  # (tree, acceptance) pairs mcsd.budget.expected_length remembers
DYNAMIC_PREFIX = "dynamic"  # --tree dynamic:BUDGET[:WIDTH[:DEPTH]]
NO_SPECULATION = "none"  # --tree none: the target alone (what mcsd tune saves when no tree pays)
# Dynamic trees whose rule the proposer can draft for losslessly (mcsd.draft.dynamic)
DYNAMIC_RULES = ("greedy", "topk", "mcss-wor")
DEFAULT_MAX_BATCH = 16  # rows decoded side by side (a list of prompts in the API, the server)
COMPILE_CHOICES = ("none", "draft", "all")  # load_pair(compile=...): which models to compile
DEFAULT_RUNTIME = "auto"  # mcsd.models.factory.RUNTIMES: auto picks the fastest for the machine
DEFAULT_DTYPE = "auto"  # bfloat16 where the CPU/GPU computes it natively, else float32
DEFAULT_ATTENTION = "sdpa"  # transformers attention implementation ("eager" also works)

# The static-cache runtime (mcsd.models.static)
STATIC_MAX_LENGTH = 4096  # cache positions per row when the model allows that many
MAX_GRAPH_TOKENS = 128  # new tokens per forward up to which forwards are padded and captured
ATTENTION_BLOCK = 256  # attention length granularity: fewer graphs, little wasted attention

PROPOSERS = ("model", "context", "mixed")  # what builds each step's tree (mcsd.draft)
DEFAULT_PROPOSER = "model"
# A draft reads a row's tokens only when it next drafts for it (a prompt, or the tokens of plain
# steps under an adaptive budget, which may never draft again); more than this many, and they
# run in a forward of their own before the step's first draft forward (no padding of other rows).
DRAFT_CATCH_UP_TOKENS = 8

# The llama.cpp runtime (mcsd.models.llamacpp)
LLAMA_MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids one context can hold
# torch.Generator.manual_seed takes 64 bits, signed or not (a negative seed s means s + 2**64)
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


@dataclass(frozen=True, kw_only=True)
class LlamaCppConfig:
    """One llama.cpp context (``mcsd.models.llamacpp``); the target and the draft get one each.

    KV cells = ``context + pending_cells`` per row: the committed tokens of a row use at most
    ``context`` positions, and a step's pending block (a token tree) needs its own cells on top.
    A tree is scored in one ``llama_decode`` with one sequence id per root-to-leaf path, so the
    ids a row owns (``row_sequences``) bound the leaves of its tree plus one id for the
    committed tokens. A context of B rows (``LlamaCppModel(batch_size=B)``: the server's
    ``--max-batch``, a list of prompts) asks llama.cpp for ``B x row_sequences`` ids, which must
    be at most 256 (llama.cpp's limit) and at most ``batch``.
    """

    context: int = STATIC_MAX_LENGTH  # positions per row (capped at the model's training length)
    pending_cells: int = DEFAULT_MAX_TREE_NODES + 1  # room for the largest tree and its root
    threads: int | None = None  # None: every CPU this process may run on
    batch_threads: int | None = None  # threads of multi-token decodes; None: as ``threads``
    # Tokens per llama_decode (longer forwards are split); every token's logits are kept, so the
    # output buffer is batch x vocabulary floats (512 x 151,936 x 4 B = 311 MB for Qwen).
    batch: int = 512
    sequences: int = 128  # the most sequence ids a row owns: 127 tree leaves at most
    # Sequence ids per row (a draft's padding roots count as leaves too: rows whose uncached
    # tokens differ in length). None: llama.cpp's 256 ids shared evenly by the rows, at most
    # ``sequences`` and ``batch`` / rows each (1 row: 128, 4 rows: 64, 16 rows: 16 ids).
    row_sequences: int | None = None
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
        check_int("context", self.context, 2)
        check_int("pending_cells", self.pending_cells, 1)
        for name in ("threads", "batch_threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        check_int("batch", self.batch, 1)
        check_int("sequences", self.sequences, 2, LLAMA_MAX_SEQUENCES)
        if self.row_sequences is not None:
            check_int("row_sequences", self.row_sequences, 2, LLAMA_MAX_SEQUENCES)
        if self.batch < self.sequences:  # llama.cpp asserts it (llama_context::output_reserve)
            raise ParamError(
                f"batch ({self.batch}) must be >= sequences ({self.sequences}): llama.cpp keeps "
                "room for one row of logits per sequence id in every decode",
                param="batch",
                allowed="an integer >= sequences",
            )
        for name in ("repack", "flash_attention", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(
                    f"{name} must be True or False, got {getattr(self, name)!r}",
                    param=name,
                    allowed="True or False",
                )


@dataclass(frozen=True, kw_only=True)
class ContextConfig:
    """The context proposer (``mcsd.draft.context``): candidates copied from the prompt, the
    tokens generated so far and, opt-in, recent requests, found by matching the longest suffix
    of the committed tokens; no model forward."""

    max_nodes: int = 16  # node budget of one step's context tree
    max_depth: int = 8  # the deepest continuation proposed
    max_ngram: int = 4  # longest suffix of the committed tokens that is matched
    # most recent earlier occurrences of the matched suffix that vote for continuations: bounds
    # the work per step on long, repetitive contexts
    max_occurrences: int = 64
    max_children: int = 4  # continuations per node where the context branches

    def __post_init__(self) -> None:
        check_int("context max_nodes", self.max_nodes, 1, DEFAULT_MAX_TREE_NODES, param="max_nodes")
        check_int("context max_depth", self.max_depth, 1, DEFAULT_MAX_TREE_NODES, param="max_depth")
        check_int("context max_ngram", self.max_ngram, 1, 64, param="max_ngram")
        check_int("context max_occurrences", self.max_occurrences, 1, param="max_occurrences")
        check_int(
            "context max_children",
            self.max_children,
            1,
            DEFAULT_MAX_TREE_NODES,
            param="max_children",
        )


GREEDY = SamplingConfig(temperature=0.0)


@dataclass(frozen=True, kw_only=True)
class DynamicTreeConfig:
    """A tree grown per step by the draft's path probability under a node budget (EAGLE-2
    style, ``mcsd.draft.dynamic``): level by level, the ``width`` most probable nodes of the
    newest depth run through the draft and get children, down to ``max_depth``; a tree has
    exactly ``budget`` nodes (sampled trees place at most ``width`` per level, hence
    ``width * max_depth >= budget``), so the target's forward keeps one shape."""

    budget: int = 16  # nodes per step: what the target verifies in one forward
    width: int = 4  # nodes expanded per level, and children per expanded node
    max_depth: int = 6  # deepest level grown (a draft forward each)

    def __post_init__(self) -> None:
        check_int("dynamic tree budget", self.budget, 1, DEFAULT_MAX_TREE_NODES, param="budget")
        check_int("dynamic tree width", self.width, 1, param="width")
        check_int("dynamic tree max_depth", self.max_depth, 1, param="max_depth")
        if self.width * self.max_depth < self.budget:
            raise ParamError(
                f"dynamic tree budget {self.budget} needs width * max_depth >= {self.budget}, "
                f"got {self.width} * {self.max_depth}; raise WIDTH or DEPTH "
                "(dynamic:BUDGET:WIDTH:DEPTH)",
                param="budget",
            )

    @classmethod
    def parse(cls, text: str) -> DynamicTreeConfig:
        """``dynamic:BUDGET[:WIDTH[:DEPTH]]``, e.g. ``dynamic:32`` or ``dynamic:32:8:6``."""
        head, _, rest = text.strip().partition(":")
        parts = rest.split(":") if rest else []
        if head != DYNAMIC_PREFIX or not 1 <= len(parts) <= 3:
            raise ParamError(
                f"dynamic tree must look like dynamic:BUDGET[:WIDTH[:DEPTH]] (e.g. dynamic:16 "
                f"or dynamic:32:8:6), got {text!r}",
                param="tree",
                allowed="dynamic:BUDGET[:WIDTH[:DEPTH]]",
            )
        try:
            values = [int(part) for part in parts]
        except ValueError:
            raise ParamError(
                f"dynamic tree {text!r}: BUDGET, WIDTH and DEPTH must be integers",
                param="tree",
                allowed="dynamic:BUDGET[:WIDTH[:DEPTH]]",
            ) from None
        return cls(**dict(zip(("budget", "width", "max_depth"), values, strict=False)))

    def describe(self) -> str:
        return f"{DYNAMIC_PREFIX}:{self.budget}:{self.width}:{self.max_depth}"


def parse_tree(tree: object, max_tree_nodes: int) -> TokenTree | DynamicTreeConfig | str:
    """A ``SpecConfig.tree`` value parsed: a ``TokenTree``, a ``DynamicTreeConfig`` or
    ``NO_SPECULATION`` (``ValueError`` for a bad shape or a tree beyond ``max_tree_nodes``). The
    one parser of trees: the spec and the server's request fields use it."""
    if isinstance(tree, str) and tree.strip().startswith(DYNAMIC_PREFIX):
        tree = DynamicTreeConfig.parse(tree)
    if isinstance(tree, str) and tree.strip() == NO_SPECULATION:
        return NO_SPECULATION
    if isinstance(tree, DynamicTreeConfig):
        if tree.budget > max_tree_nodes:
            raise ParamError(
                f"dynamic tree budget {tree.budget} is more than the limit "
                f"max_tree_nodes={max_tree_nodes}",
                param="tree",
                allowed=f"a budget <= max_tree_nodes ({max_tree_nodes})",
            )
        return tree
    return TokenTree.parse(tree, max_nodes=max_tree_nodes)


@dataclass(frozen=True, kw_only=True)
class SpecConfig:
    """One speculative generation: tree, verification rule, both samplers, stopping.

    ``tree`` is a k-config (``(4, 2, 2)`` or ``"4,2,2"``), a list of paths (each path a list of
    sibling ranks, Medusa style), a ``TokenTree``, or a dynamic tree grown per step
    (``"dynamic:16"`` or a ``DynamicTreeConfig``), or ``"none"``: no speculation, the target
    alone, one token per forward (``mcsd.engine.autoregressive_decode``). ``rule=None`` picks
    the natural rule: ``greedy`` for a greedy target, ``topk`` for a greedy draft under a
    sampling target, ``sps`` for a chain and ``mcss-wor`` otherwise.
    """

    tree: TokenTree | DynamicTreeConfig | str | tuple[int, ...] | list = DEFAULT_TREE
    rule: str | None = None
    target: SamplingConfig = field(default_factory=SamplingConfig)
    draft: SamplingConfig | None = None  # None: the same as the target
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS ids
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    max_tree_nodes: int = DEFAULT_MAX_TREE_NODES
    # what builds each step's tree: "model" the draft model (``tree``), "context" candidates
    # copied from the context (``context``, no draft model at all), "mixed" both in one tree
    proposer: str = DEFAULT_PROPOSER
    context: ContextConfig = field(default_factory=ContextConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.proposer, str) or self.proposer not in PROPOSERS:
            raise ParamError(
                f"proposer must be one of {', '.join(PROPOSERS)}; got {self.proposer!r}",
                param="proposer",
                allowed=", ".join(PROPOSERS),
            )
        if not isinstance(self.context, ContextConfig):
            raise ParamError(
                f"context must be a ContextConfig, got {type(self.context).__name__}",
                param="context",
                allowed="a ContextConfig",
            )
        if not isinstance(self.target, SamplingConfig):
            raise ParamError(
                f"target must be a SamplingConfig, got {type(self.target).__name__}",
                param="target",
                allowed="a SamplingConfig",
            )
        if self.draft is not None and not isinstance(self.draft, SamplingConfig):
            raise ParamError(
                f"draft must be a SamplingConfig, got {type(self.draft).__name__}",
                param="draft",
                allowed="a SamplingConfig or None",
            )
        if self.rule is not None:
            get_rule(self.rule)
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ParamError(
                f"max_new_tokens must be an integer >= 1, got {m!r}",
                param="max_new_tokens",
                allowed="an integer >= 1",
            )
        self._check_seed()
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        if not isinstance(self.stop_strings, list | tuple):
            raise ParamError(
                f"stop_strings must be a string or a list of strings, got {self.stop_strings!r}",
                param="stop_strings",
                allowed="a string or a list of non-empty strings",
            )
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ParamError(
                    f"stop_strings must be non-empty strings, got {s!r}",
                    param="stop_strings",
                    allowed="a string or a list of non-empty strings",
                )
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list | tuple | set | frozenset):
                raise ParamError(
                    f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}",
                    param="stop_token_ids",
                    allowed="a list of token ids >= 0",
                )
            ids = tuple(self.stop_token_ids)
            if not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ParamError(
                    f"stop_token_ids must be non-negative integers, got {ids!r}",
                    param="stop_token_ids",
                    allowed="a list of token ids >= 0",
                )
            object.__setattr__(self, "stop_token_ids", ids)
        # Build the tree now so a bad shape fails at configuration time, not mid-generation.
        try:
            object.__setattr__(self, "tree", self._built_tree())
        except ValueError as error:  # a dynamic tree's budget, a TokenTree's shape: the tree
            if isinstance(error, ParamError) and error.param == "tree":
                raise
            raise ParamError(str(error), param="tree") from error
        self.resolved_rule()

    def _built_tree(self) -> TokenTree | DynamicTreeConfig | str:
        return parse_tree(self.tree, self.max_tree_nodes)

    def _check_seed(self) -> None:
        """None, or an integer torch.Generator.manual_seed takes (one of 64 bits)."""
        seed, (low, high) = self.seed, SEED_RANGE
        if seed is None:
            return
        if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
            raise ParamError(
                f"seed must be an integer or None, an integer in [-2**63, 2**64 - 1] (64 bits: "
                f"what torch.Generator.manual_seed takes), got {seed!r}",
                param="seed",
                allowed="an integer in [-2**63, 2**64 - 1], or None",
            )

    @property
    def draft_sampling(self) -> SamplingConfig:
        return self.target if self.draft is None else self.draft

    @property
    def speculative(self) -> bool:
        """False for ``tree="none"``: plain decoding with the target alone."""
        return self.tree != NO_SPECULATION

    @property
    def dynamic(self) -> DynamicTreeConfig | None:
        """The dynamic tree's configuration, or None for a static tree."""
        return self.tree if isinstance(self.tree, DynamicTreeConfig) else None

    def token_tree(self) -> TokenTree:
        """The static tree; ``ValueError`` for a dynamic one (its shape changes every step)."""
        if isinstance(self.tree, DynamicTreeConfig):
            raise ParamError(
                f"tree {self.tree.describe()} is grown per step and has no fixed shape",
                param="tree",
            )
        if not self.speculative:
            raise ParamError(
                "tree 'none' means no speculation: there is no token tree", param="tree"
            )
        return TokenTree.parse(self.tree, max_nodes=self.max_tree_nodes)

    def describe_tree(self) -> str:
        """The tree's short name: a k-config, a node count, or ``dynamic:BUDGET:WIDTH:DEPTH``."""
        dynamic = self.dynamic
        if not self.speculative:
            return NO_SPECULATION
        return dynamic.describe() if dynamic is not None else self.token_tree().describe()

    @property
    def tree_nodes(self) -> int:
        """Nodes per step (at most, for a dynamic tree; 0 without speculation)."""
        dynamic = self.dynamic
        if not self.speculative:
            return 0
        return dynamic.budget if dynamic is not None else self.token_tree().num_nodes

    def resolved_rule(self) -> str:
        """The rule used, after defaults, checked against the samplers and the tree; ``"none"``
        without speculation (a rule asked for is then refused)."""
        if not self.speculative:
            if self.rule is not None:
                raise ParamError(
                    f"rule {self.rule!r} needs a tree; tree 'none' verifies nothing",
                    param="rule",
                    allowed="none (tree none verifies nothing)",
                )
            return NO_SPECULATION
        if self.dynamic is not None:
            return self._dynamic_rule()
        tree = self.token_tree()
        if self.rule is None:
            if self.target.greedy:
                return "greedy"
            if self.draft_sampling.greedy or self.proposer == "context":
                return "topk"
            return "sps" if tree.max_children == 1 else "mcss-wor"
        rule = self._checked_rule()
        if rule.max_children is not None and tree.max_children > rule.max_children:
            raise ParamError(
                f"rule {rule.name!r} verifies one candidate per node, but tree {tree.describe()} "
                f"has nodes with {tree.max_children} children; use 'mcss' or 'mcss-wor'",
                param="rule",
                allowed="mcss or mcss-wor",
            )
        return rule.name

    def _dynamic_rule(self) -> str:
        """A dynamic tree's rule: ``greedy`` / ``topk`` (the draft's top-k, deterministic) or
        ``mcss-wor`` (sampled without replacement, each node a prefix of its draws)."""
        if self.rule is None:
            if self.target.greedy:
                return "greedy"
            return "topk" if self.draft_sampling.greedy else "mcss-wor"
        rule = self._checked_rule()
        if rule.name not in DYNAMIC_RULES:
            raise ParamError(
                f"rule {rule.name!r} cannot verify dynamic trees losslessly; use one of "
                f"{', '.join(DYNAMIC_RULES)} (or leave rule unset)",
                param="rule",
                allowed=", ".join(DYNAMIC_RULES),
            )
        return rule.name

    def _checked_rule(self) -> Rule:
        """The rule asked for, checked against the target and draft samplers."""
        rule = get_rule(self.rule)
        if self.proposer == "context" and rule.reads_q:
            raise ParamError(
                f"rule {rule.name!r} reads the draft's q, but proposer 'context' copies "
                "deterministic candidates: use rule 'topk' or 'mcns' (or leave rule unset)",
                param="rule",
                allowed="topk or mcns",
            )
        if self.proposer == "mixed" and rule.mixed_trees is None:
            raise ParamError(
                f"rule {rule.name!r} cannot verify trees that mix context and draft candidates "
                "(proposer 'mixed'); leave rule unset or use 'mcss-wor'",
                param="rule",
                allowed="mcss-wor",
            )
        if self.target.greedy and rule.target == "sampling":
            # Every lossless rule reduces to greedy when p is one-hot; say so rather than guess.
            raise ParamError(
                f"rule {rule.name!r} needs a sampling target; with temperature 0 use rule "
                "'greedy' (or leave rule unset)",
                param="rule",
                allowed="greedy",
            )
        if not self.target.greedy and rule.target == "greedy":
            raise ParamError(
                f"rule {rule.name!r} emits the target's argmax: it needs temperature 0; for a "
                "sampling target leave rule unset (or use 'topk' with a greedy draft)",
                param="rule",
                allowed="a rule for sampling targets",
            )
        if self.draft_sampling.greedy and rule.reads_q:
            raise ParamError(
                f"rule {rule.name!r} needs the draft's sampling distribution q, but the draft is "
                "greedy (draft temperature 0); use rule 'topk' (deterministic candidates) instead",
                param="rule",
                allowed="topk",
            )
        return rule


@dataclass(frozen=True, kw_only=True)
class BudgetDefaults:
    """The adaptive tree budget (``mcsd.budget``)."""

    acceptance: float = 0.6  # prior acceptance rate of one candidate (a 2-4x size-gap pair)
    # time outside the forwards of a speculative step (verification, sampling, commits), as a
    # fraction of its forwards' time: 6-16% measured on the H200 (docs/benchmarks.md, issue 12);
    # without it a tree priced a few percent faster than plain decoding runs slower
    overhead: float = 0.10
    # the prior counts as this many candidate trials, so the first steps move it but little
    prior_trials: float = 4.0
    # per speculative step, the weight of the past evidence decays by this factor: the estimate
    # remembers the last ~1 / weight steps (~20-60 candidate trials on 1,1,1)
    weight: float = 0.1
    # plain steps between two re-probes (one speculative step with the ladder's smallest tree)
    # while plain decoding is the best choice; each re-probe also catches the draft up on the
    # tokens it skipped (a forward of reprobe + 1 tokens), and is skipped where that never pays
    reprobe: int = 32
    repeats: int = 3  # timed forwards per probed size (the median counts)
    probe_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # in all


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Tensor parallelism of the fast runtime (``mcsd.models.fast.parallel``): ``size`` ranks
    on ``torch.distributed`` (NCCL on CUDA, gloo on a CPU). ``check_ranks``: a debug check that
    every rank feeds the same tokens and keeps the same accepted path each step (two
    all-gathers and a host sync per forward and per commit)."""

    size: int = 1
    check_ranks: bool = False
    address: str = "127.0.0.1"  # the rendezvous of a spawned group (torchrun sets its own)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ParamError(
                f"tp must be an integer >= 1, got {self.size!r}",
                param="size",
                allowed="an integer >= 1",
            )


HF_STATIC_LENGTH = 4096  # hf-static's cache: one shape, one compilation for all prompts
FREQUENT_CORPUS_CHARS = 8_000_000  # per corpus source: stable counts of the top 32k tokens
