"""The verification rules: one ``Rule`` record each, in one registry every other module reads.

A rule is lossless for one way of drawing candidates (``candidates``: ``iid`` independent draws
from q, ``wor`` sequential draws without replacement, ``top`` the draft's top-k, deterministic),
reads the draft's q or not, verifies a sampling target, a greedy one or either, and has a node
function (``mcsd.verify.node``), a tree walk (``mcsd.verify.walk``) and possibly a device
verifier (``mcsd.verify.device``) that verifies every node at once with one host transfer.

The validated entry points live here too: ``verify_node`` / ``node_outcome`` (one node, by rule
name) and ``verify_tree`` (a whole tree); ``tree_verifier`` builds what the engine calls once
per step, choosing the device verifier or the host walk from the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor

from mcsd.errors import ParamError
from mcsd.tree import ROOT, TokenTree
from mcsd.verify import node
from mcsd.verify.device import GreedyTreeVerifier, SampledTreeVerifier
from mcsd.verify.node import NodeResult, NodeRule
from mcsd.verify.walk import HostTreeVerifier, TreeResult, Walk, traverse, walk_path

if TYPE_CHECKING:
    from mcsd.sampling import SamplingConfig

Candidates = Literal["iid", "wor", "top"]
Target = Literal["sampling", "greedy", "any"]
DeviceVerifier = Literal["greedy", "sampled", "sampled-wor", "one-hot"]
DISTRIBUTION_TOLERANCE = 1e-3  # |sum - 1| allowed for float32 softmax over large vocabularies


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Everything mcsd knows about one verification rule."""

    name: str
    summary: str  # one line: what the rule does (CLI help, docs)
    candidates: Candidates  # how the draft must draw a node's children for the rule
    reads_q: bool  # verification reads the draft distribution q
    target: Target  # which targets it verifies: "greedy" = temperature 0 only
    node: NodeRule  # one node's math: coins (verify) and exact outcome (outcome)
    walk: Walk = walk_path  # the tree walk on the host
    max_children: int | None = None  # sps verifies one candidate per node
    device: DeviceVerifier | None = None  # the batched verifier, if the rule has one
    device_by_default: Literal["always", "cuda"] = "cuda"  # where the engine uses it unasked
    # Trees that mix deterministic (context) candidates with drawn ones (``node.Mixed``):
    # verified by the device verifier or the host walk, or not at all (None)
    mixed_trees: Literal["device", "host"] | None = "device"

    @property
    def deterministic(self) -> bool:
        """Candidates are the draft's top-k, not samples (their q is one-hot)."""
        return self.candidates == "top"

    @property
    def replacement(self) -> bool:
        """Candidates are drawn with replacement (``iid``)."""
        return self.candidates != "wor"


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            name="sps",
            summary=(
                "one candidate per node: accept with min(1, p/q), else correct from "
                "norm(max(0, p-q))"
            ),
            candidates="iid",
            reads_q=True,
            target="sampling",
            node=node.SPECULATIVE,
            max_children=1,
            device="sampled",
        ),
        Rule(
            name="mcss",
            summary=(
                "k iid candidates: SpecInfer's rule, p <- norm(max(0, p - q)) after each rejection"
            ),
            candidates="iid",
            reads_q=True,
            target="sampling",
            node=node.SPECULATIVE,
            device="sampled",
        ),
        Rule(
            name="mcss-wor",
            summary=(
                "k candidates without replacement: the paper's rule, q renormalised after each draw"
            ),
            candidates="wor",
            reads_q=True,
            target="sampling",
            node=node.WITHOUT_REPLACEMENT,
            device="sampled-wor",
        ),
        Rule(
            name="topk",
            summary=(
                "the draft's top-k (deterministic): accept c with p(c), else zero it and "
                "renormalise"
            ),
            candidates="top",
            reads_q=False,
            target="any",
            node=node.ONE_HOT,
            device="one-hot",
        ),
        Rule(
            name="mcns",
            summary="naive: y ~ p, accept the first candidate equal to y, else emit y",
            candidates="iid",
            reads_q=False,
            target="any",
            node=node.ONE_HOT,
            device="one-hot",
        ),
        Rule(
            name="greedy",
            summary="accept the child equal to argmax p, else emit argmax p",
            candidates="top",
            reads_q=False,
            target="greedy",
            node=node.GREEDY,
            device="greedy",
            device_by_default="always",
        ),
        Rule(
            name="kseq",
            summary="SpecTr's K-SEQ: k iid candidates accepted with min(1, p / (rho q))",
            candidates="iid",
            reads_q=True,
            target="sampling",
            node=node.KSEQ,
            mixed_trees="host",
        ),
        Rule(
            name="optimal",
            summary="k iid candidates: the optimal transport plan, acceptance = alpha*",
            candidates="iid",
            reads_q=True,
            target="sampling",
            node=node.OPTIMAL,
            mixed_trees="host",
        ),
        Rule(
            name="traversal",
            summary=(
                "Traversal Verification: sequence-level, leaf to root; siblings without replacement"
            ),
            candidates="wor",
            reads_q=True,
            target="sampling",
            node=node.WITHOUT_REPLACEMENT,  # one node of a traversal is mcss-wor
            walk=traverse,
            mixed_trees=None,
        ),
    )
}
RULE_NAMES: tuple[str, ...] = tuple(RULES)


def get_rule(name: object) -> Rule:
    """The rule called ``name``, else a ``ParamError`` (a ``ValueError``) naming the rules."""
    if not isinstance(name, str) or name not in RULES:
        raise ParamError(
            f"rule must be one of {', '.join(RULE_NAMES)}; got {name!r}",
            param="rule",
            allowed=", ".join(RULE_NAMES),
        )
    return RULES[name]


# ---------------------------------------------------------------- one step of the engine
class TreeVerifier(Protocol):
    """One step's verification in two halves, so that the caller can time the device work
    without adding a host synchronisation."""

    def launch(
        self, tokens: Tensor, logits: Tensor, q: Tensor | None, generator: torch.Generator | None
    ) -> Any:
        """``tokens`` ``[N]`` node tokens, ``logits`` ``[N+1, V]`` the target's (cut to the
        common vocabulary), ``q`` ``[N+1, V]`` or None: queue what runs on the device."""
        ...

    def finish(self, launched: Any) -> tuple[TreeResult, list[int]]:
        """Read the result back (the step's host synchronisation): the ``TreeResult`` and the
        accepted tokens."""
        ...


def device_verifier(
    tree: TokenTree,
    rule: str | Rule,
    device: torch.device | str,
    target: SamplingConfig,
    dtype: torch.dtype | None = None,
) -> TreeVerifier:
    """The rule's batched verifier; ``ValueError`` for a rule without one. ``dtype`` of the
    sampled rules' residual work: default float32 on CUDA, float64 elsewhere."""
    record = rule if isinstance(rule, Rule) else get_rule(rule)
    if record.device is None:
        with_one = ", ".join(r.name for r in RULES.values() if r.device is not None)
        raise ValueError(f"rule must be one of {with_one} (rules with a device verifier)")
    if record.device == "greedy":
        return GreedyTreeVerifier(tree, device)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cuda" else torch.float64
    make = partial(SampledTreeVerifier, tree, device, target, dtype=dtype)
    if record.device == "one-hot":
        return make(one_hot=True)
    return make(without_replacement=record.device == "sampled-wor")


def tree_verifier(
    tree: TokenTree,
    rule: Rule,
    target: SamplingConfig,
    device: torch.device,
    on_device: bool | None = None,
    dtype: torch.dtype | None = None,
    deterministic: tuple[bool, ...] | None = None,
) -> TreeVerifier:
    """What the engine verifies each step's tree with: the rule's device verifier when it has
    one and ``on_device`` asks for it (``None``: where the record says, always for greedy and
    on CUDA for the sampled rules, since on a CPU the walk, which visits only the accepted path,
    does less work), else the host walk.

    ``deterministic`` (per node, ``Proposal.deterministic``): the tree mixes deterministic
    candidates with ones drawn from q; a rule that reads q verifies the deterministic ones with
    the one-hot rule first (``node.Mixed``), the others treat every candidate alike already."""
    fixed = mixed_counts(tree, rule, deterministic)
    if on_device is None:
        on_device = rule.device_by_default == "always" or device.type == "cuda"
    if on_device and rule.device is not None and (fixed is None or rule.mixed_trees == "device"):
        if fixed is None:
            return device_verifier(tree, rule, device, target, dtype)
        if dtype is None:
            dtype = torch.float32 if device.type == "cuda" else torch.float64
        return SampledTreeVerifier(
            tree,
            device,
            target,
            without_replacement=rule.device == "sampled-wor",
            deterministic=deterministic,
            dtype=dtype,
        )
    walk = rule.walk if fixed is None else partial(walk_path, fixed=fixed)
    return HostTreeVerifier(tree, walk, rule.node, target, reads_q=rule.reads_q)


def mixed_counts(
    tree: TokenTree, rule: Rule, deterministic: tuple[bool, ...] | None
) -> tuple[int, ...] | None:
    """Per row (0 the root, u + 1 node u): how many of its first children are deterministic
    candidates among drawn ones; None when the rule treats every candidate alike (it does not
    read q) or none is deterministic. ``ValueError`` for a rule that cannot mix or for
    deterministic candidates after drawn siblings."""
    if deterministic is None or not rule.reads_q or not any(deterministic):
        return None
    if len(deterministic) != tree.num_nodes:
        raise ValueError(
            f"deterministic must have one flag per tree node ({tree.num_nodes}), "
            f"got {len(deterministic)}"
        )
    if rule.mixed_trees is None:
        mixing = ", ".join(r.name for r in RULES.values() if r.mixed_trees is not None)
        raise ValueError(
            f"rule {rule.name!r} cannot verify trees that mix context and draft candidates; "
            f"rule must be one of {mixing}"
        )
    counts = []
    for parent in (ROOT, *range(tree.num_nodes)):
        flags = [deterministic[c] for c in tree.children(parent)]
        fixed = flags.index(False) if False in flags else len(flags)
        if any(flags[fixed:]):
            raise ValueError("deterministic candidates must come before drawn siblings")
        counts.append(fixed)
    return tuple(counts)


# ---------------------------------------------------------------- validated entry points
def verify_node(
    rule: str,
    p: Tensor,  # [V] target distribution at the node
    q: Tensor | None,  # [V] draft distribution the candidates were drawn from
    candidates: Tensor,  # [k] long, in the order they were sampled
    generator: torch.Generator | None = None,
) -> NodeResult:
    """Run ``rule`` at one node: accept one candidate or emit a correction token."""
    record = get_rule(rule)
    return record.node.verify(p, q, _check_inputs(record, p, q, candidates), generator)


def node_outcome(
    rule: str,
    p: Tensor,  # [V]
    q: Tensor | None,  # [V]
    candidates: Tensor,  # [k] long
) -> tuple[Tensor, Tensor]:
    """Exact outcome distribution of ``verify_node`` for fixed candidates.

    Returns ``accept`` ``[k]`` float64 (probability that candidate i is the accepted one) and
    ``correction`` ``[V]`` float64 (probability of each correction token, times the probability
    that every candidate was rejected).
    """
    record = get_rule(rule)
    return record.node.outcome(p, q, _check_inputs(record, p, q, candidates))


def verify_tree(
    tree: TokenTree,
    tokens: Tensor,  # [N] long, the candidate token of every node
    p: Tensor,  # [N+1, V] target distribution at the root (row 0) and after every node
    q: Tensor | None,  # [N+1, V] draft distribution each row's children were drawn from
    rule: str,
    generator: torch.Generator | None = None,
) -> TreeResult:
    """Walk ``tree`` from the root, verifying each node's children with ``rule``."""
    record = get_rule(rule)
    n = tree.num_nodes
    _check_distributions(record, p, None, rows=n + 1, need_q=False)
    if q is not None:
        if not isinstance(q, Tensor) or q.dim() != 2 or len(q) != n + 1:
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"q must have shape [{n + 1}, V], got {shape}")
        # Only rows whose children were drawn are read (the engine leaves leaf rows empty).
        inner = [0] + [u + 1 for u in range(n) if tree.children(u)]
        _check_distributions(record, p[inner], q[inner], rows=len(inner))
    elif record.reads_q:
        raise ValueError(f"rule {rule!r} needs the draft distribution q (got None)")
    if record.max_children is not None and tree.max_children > record.max_children:
        raise ValueError(
            f"rule {rule!r} verifies one candidate per node, but tree {tree.describe()} has nodes "
            f"with {tree.max_children} children"
        )
    if not isinstance(tokens, Tensor) or tokens.shape != (n,):
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must have shape [{n}] (one per tree node), got {shape}")
    node_tokens = _check_token_ids("tokens", tokens, p.shape[-1])
    return record.walk(tree, node_tokens, p, q, record.node, generator)


# ---------------------------------------------------------------- validation
# verify_node runs once per tree node and per Monte Carlo trial of ``mcsd check``, so the checks
# below use few tensor reductions (each costs a few microseconds of dispatch on small vectors).
def _check_inputs(rule: Rule, p: Tensor, q: Tensor | None, candidates: Tensor) -> list[int]:
    """Validate one node's inputs; return the candidates as a list of ints."""
    _check_distributions(rule, p, q, rows=None)
    if not isinstance(candidates, Tensor) or candidates.dim() != 1 or candidates.numel() < 1:
        raise ValueError("candidates must be a non-empty LongTensor[k]")
    tokens = _check_token_ids("candidates", candidates, p.shape[-1])
    if rule.max_children is not None and len(tokens) > rule.max_children:
        raise ValueError(f"rule {rule.name!r} takes exactly one candidate, got k={len(tokens)}")
    return tokens


def _check_token_ids(name: str, ids: Tensor, vocab: int) -> list[int]:
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    values = ids.tolist()
    if values and (min(values) < 0 or max(values) >= vocab):
        raise ValueError(f"{name} must be token ids in [0, {vocab}), got {values}")
    return values


def _check_distributions(
    rule: Rule, p: Tensor, q: Tensor | None, rows: int | None, need_q: bool = True
) -> None:
    expected = "[V]" if rows is None else f"[{rows}, V]"
    dims = 1 if rows is None else 2
    for name, x in (("p", p), ("q", q)):
        if x is None:
            if name == "q" and need_q and rule.reads_q:
                raise ValueError(f"rule {rule.name!r} needs the draft distribution q (got None)")
            continue
        if (
            not isinstance(x, Tensor)
            or x.dim() != dims
            or x.shape[-1] == 0
            or (rows is not None and len(x) != rows)
        ):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape {expected}, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point probability tensor, got {x.dtype}")
        if x.shape[-1] != p.shape[-1]:
            raise ValueError(
                f"p and q must share the vocabulary size: {p.shape[-1]} vs {x.shape[-1]}"
            )
        # min and sum propagate NaN; an infinite entry makes the sum infinite.
        lowest = float(x.min())
        sums = x.sum(dim=-1, dtype=torch.float64)  # [] or [rows]
        worst = abs(float(sums) - 1.0) if rows is None else float((sums - 1.0).abs().max())
        if not lowest >= 0.0 or not math.isfinite(worst):
            raise ValueError(f"{name} must have finite, non-negative entries")
        if worst > DISTRIBUTION_TOLERANCE:
            raise ValueError(f"{name} must sum to 1 (probability vectors); off by {worst:.6f}")
