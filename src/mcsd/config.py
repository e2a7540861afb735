"""Frozen configuration dataclasses: the only home of defaults and of input validation.

Every bad value raises ``ValueError`` naming the parameter and the allowed values, so a mistake
on the command line, in the server or in Python never surfaces as a stack trace from torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mcsd.tree import TokenTree

# Verification rules (DESIGN section 3). Lossless rules only; see mcsd.verify for the math.
RULES: tuple[str, ...] = (
    "sps",
    "mcss",
    "mcss-wor",
    "topk",
    "mcns",
    "greedy",
    "kseq",
    "optimal",
    "traversal",
)
# Rules that read the draft distribution q (the engine passes it; a greedy draft has none).
RULES_WITH_Q: tuple[str, ...] = ("sps", "mcss", "mcss-wor", "kseq", "optimal", "traversal")
# Rules whose siblings must be drawn without replacement; every other sampled rule assumes iid
# draws from q (the deterministic rules topk and greedy take the draft's top-k).
RULES_WITHOUT_REPLACEMENT: tuple[str, ...] = ("mcss-wor", "traversal")

DEFAULT_TREE = "4,2,2"  # 4 + 8 + 16 = 28 nodes: the paper's favourite shape for 2-4x size gaps
DEFAULT_MAX_TREE_NODES = 1024  # a target forward over more nodes is never worth it
COMPILE_CHOICES = ("none", "draft", "all")  # load_pair(compile=...): which models to compile


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How logits become a distribution (see ``mcsd.sampling.warp`` for the order)."""

    temperature: float = 1.0  # 0 = greedy
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


def check_rule(rule: object) -> str:
    """Return ``rule`` if it names a verification rule, else raise a clear ``ValueError``."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    return rule  # type: ignore[return-value]


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
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS ids
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    max_tree_nodes: int = DEFAULT_MAX_TREE_NODES

    def __post_init__(self) -> None:
        if not isinstance(self.target, SamplingConfig):
            raise ValueError(f"target must be a SamplingConfig, got {type(self.target).__name__}")
        if self.draft is not None and not isinstance(self.draft, SamplingConfig):
            raise ValueError(f"draft must be a SamplingConfig, got {type(self.draft).__name__}")
        if self.rule is not None:
            check_rule(self.rule)
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {m!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop_strings must be non-empty strings, got {s!r}")
        if self.stop_token_ids is not None:
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
        rule = self.rule
        if self.target.greedy and rule not in ("greedy", "topk", "mcns"):
            # Every lossless rule reduces to greedy when p is one-hot; say so rather than guess.
            raise ValueError(
                f"rule {rule!r} needs a sampling target; with temperature 0 use rule 'greedy' "
                "(or leave rule unset)"
            )
        if rule == "sps" and tree.max_children != 1:
            raise ValueError(
                f"rule 'sps' verifies one candidate per node, but tree {tree.describe()} has "
                f"nodes with {tree.max_children} children; use 'mcss' or 'mcss-wor'"
            )
        if self.draft_sampling.greedy and rule in RULES_WITH_Q:
            raise ValueError(
                f"rule {rule!r} needs the draft's sampling distribution q, but the draft is greedy "
                "(draft temperature 0); use rule 'topk' (deterministic candidates) instead"
            )
        return rule
