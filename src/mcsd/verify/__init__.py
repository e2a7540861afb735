"""Verification: accept a path of the draft's token tree so that the output follows the target.

- ``rules``     one ``Rule`` record per rule in one registry; the validated entry points
                ``verify_node``, ``node_outcome``, ``verify_tree`` and the engine's
                ``tree_verifier``;
- ``node``      one node's math for every rule (coins and exact outcome distributions);
- ``residual``  the acceptance ratio and residual updates, written once, on ``[..., V]`` tensors;
- ``walk``      the host tree walks (root to leaf; Traversal Verification);
- ``device``    batched verifiers: every node at once, one host transfer per step;
- ``optimal``   alpha* (the acceptance bound), K-SEQ's rho and the optimal transport plan.

Nothing here sees a model, a cache or a tokenizer.
"""

from mcsd.verify.node import NONE_ACCEPTED, NodeResult
from mcsd.verify.rules import (
    RULE_NAMES,
    RULES,
    Rule,
    get_rule,
    node_outcome,
    tree_verifier,
    verify_node,
    verify_tree,
)
from mcsd.verify.walk import TreeResult

__all__ = [
    "NONE_ACCEPTED",
    "RULES",
    "RULE_NAMES",
    "NodeResult",
    "Rule",
    "TreeResult",
    "get_rule",
    "node_outcome",
    "tree_verifier",
    "verify_node",
    "verify_tree",
]
