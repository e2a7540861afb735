"""A request's spec resolved once, when the request is added: what every later step reads.

``resolve(spec)`` fixes the verification rule (``mcsd.verify.rules.Rule``), the tree (a static
``TokenTree``, a dynamic tree's budget, the context's own trees, or none) and the candidate
scheme (how the draft picks a node's children, and whether q travels with them). Nothing
downstream calls ``SpecConfig.resolved_rule`` or builds the tree again: the engine, the
proposer and the verifier read the ``Plan``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcsd.config import ContextConfig, DynamicTreeConfig, SamplingConfig, SpecConfig
from mcsd.errors import ParamError
from mcsd.tree import TokenTree
from mcsd.verify.rules import Rule, get_rule


@dataclass(frozen=True)
class Candidates:
    """How the draft picks a node's children for a rule and a draft sampling."""

    deterministic: bool  # the draft's top-k (a one-hot q), else drawn from q
    replacement: bool  # drawn with replacement (iid), else without
    prune: bool  # a dynamic tree grows wide and keeps its best nodes (deterministic only)
    return_q: bool  # the proposal carries q (the rule reads it)


def candidate_scheme(rule: Rule, draft: SamplingConfig) -> Candidates:
    """The lossless scheme for ``rule``: top-k for the deterministic rules and greedy drafts,
    else draws as the rule's record says; a dynamic tree prunes only deterministic candidates
    (pruning draws by their own probabilities would bias them)."""
    deterministic = rule.deterministic or draft.greedy
    return Candidates(
        deterministic=deterministic,
        replacement=rule.replacement,
        prune=deterministic,
        return_q=rule.reads_q,
    )


@dataclass(frozen=True)
class Plan:
    """A request's resolved spec. ``rule`` None: plain decoding (the target alone)."""

    rule: Rule | None
    proposer: str  # "model", "context", "mixed" (``SpecConfig.proposer``), "none" when plain
    tree: TokenTree | None  # the draft model's static tree ("model" / "mixed" with a k-config)
    dynamic: DynamicTreeConfig | None  # a tree grown per step by the draft ("model")
    context: ContextConfig
    target: SamplingConfig
    draft: SamplingConfig
    candidates: Candidates | None  # None when plain

    @property
    def speculative(self) -> bool:
        return self.rule is not None

    @property
    def drafts(self) -> bool:
        """The draft model proposes for this request (a static or dynamic tree, or mixed)."""
        return self.proposer in ("model", "mixed")

    @property
    def copies(self) -> bool:
        """Candidates are copied from the context ("context" or "mixed")."""
        return self.proposer in ("context", "mixed")

    @property
    def max_depth(self) -> int:
        """The deepest tree a step of this request verifies (1 when plain)."""
        depths = [1]
        if self.tree is not None:
            depths.append(self.tree.max_depth)
        if self.dynamic is not None:
            depths.append(self.dynamic.max_depth)
        if self.copies:
            depths.append(self.context.max_depth)
        return max(depths)


def resolve(spec: SpecConfig) -> Plan:
    """``spec``'s plan; raises the spec's ``ValueError`` (a ``ParamError``) for a rule that
    cannot verify its tree or sampling."""
    rule_name = spec.resolved_rule()
    if not spec.speculative:
        return Plan(
            rule=None,
            proposer="none",
            tree=None,
            dynamic=None,
            context=spec.context,
            target=spec.target,
            draft=spec.draft_sampling,
            candidates=None,
        )
    rule = get_rule(rule_name)
    dynamic = spec.dynamic
    if spec.proposer == "mixed" and dynamic is not None:
        raise ParamError(
            f"proposer 'mixed' merges the context's tree into a static draft tree; tree "
            f"{spec.describe_tree()} is grown per step: use a k-config (e.g. 4,2,2) or proposer "
            "'model'",
            param="proposer",
        )
    static = spec.proposer != "context" and dynamic is None
    return Plan(
        rule=rule,
        proposer=spec.proposer,
        tree=spec.token_tree() if static else None,
        dynamic=dynamic if spec.proposer == "model" else None,
        context=spec.context,
        target=spec.target,
        draft=spec.draft_sampling,
        candidates=candidate_scheme(rule, spec.draft_sampling),
    )
