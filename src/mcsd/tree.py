"""Token trees: the shape of the candidates a draft proposes in one step.

A tree is data: ``parents[N]`` in BFS order, where ``parents[i]`` is the index of node ``i``'s
parent or ``ROOT = -1`` for children of the root. The root itself is not a node: it stands for
the pending token (the last committed token, not yet in the target's KV cache). Node ``i`` sits
at depth ``depth[i] >= 1``; siblings are ordered by the rank in which they were drawn.

Three ways to build one:
- a k-config ``(k_1, ..., k_g)`` / ``"k_1,...,k_g"``: every node at depth d-1 gets k_d children;
  ``(1, 1, 1, 1)`` is a chain (standard speculative decoding), ``(4, 2, 2)`` has 4 + 8 + 16 nodes;
- a list of paths (Medusa style): each path lists sibling ranks from the root, e.g.
  ``[[0], [1], [0, 0], [0, 1]]``; every prefix of a path must be a path too;
- a parent array.

It never sees a model, a cache or a tokenizer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

ROOT = -1  # parent index of the root's children


@dataclass(frozen=True)
class TokenTree:
    """A token tree in BFS order (see the module docstring)."""

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        parents = tuple(self.parents)
        object.__setattr__(self, "parents", parents)
        if not parents:
            raise ValueError("tree must have at least one node")
        depth: list[int] = []
        for i, parent in enumerate(parents):
            if isinstance(parent, bool) or not isinstance(parent, int) or parent < ROOT:
                raise ValueError(f"parents[{i}] must be -1 (root) or a node index, got {parent!r}")
            if parent >= i:
                raise ValueError(
                    f"parents[{i}] = {parent}: a parent must come before its child (BFS order)"
                )
            d = 1 if parent == ROOT else depth[parent] + 1
            if depth and d < depth[-1]:
                raise ValueError(
                    f"node {i} at depth {d} follows a node at depth {depth[-1]}: "
                    "nodes must be in BFS order (depth never decreases)"
                )
            depth.append(d)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_config(cls, config: Sequence[int] | str, *, max_nodes: int | None = None) -> TokenTree:
        """Every node at depth d-1 gets ``config[d-1]`` children."""
        if isinstance(config, str):
            text = config.strip().strip("()[]")
            try:
                config = [int(part) for part in text.split(",") if part.strip()]
            except ValueError:
                raise ValueError(
                    f"tree k-config must be comma-separated integers like '4,2,2', got {text!r}"
                ) from None
        ks = list(config)
        if not ks:
            raise ValueError("tree k-config must not be empty (e.g. '4,2,2' or '1,1,1,1')")
        for d, k in enumerate(ks, start=1):
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"tree k-config entry k_{d} must be an integer >= 1, got {k!r}")
        total = sum(itertools.accumulate(ks, lambda a, b: a * b))
        _check_size(total, max_nodes)
        parents: list[int] = []
        level = [ROOT]
        for k in ks:
            next_level = []
            for parent in level:
                for _ in range(k):
                    next_level.append(len(parents))
                    parents.append(parent)
            level = next_level
        return cls(tuple(parents))

    @classmethod
    def from_paths(
        cls, paths: Sequence[Sequence[int]], *, max_nodes: int | None = None
    ) -> TokenTree:
        """Build from Medusa-style paths of sibling ranks (every prefix must be present)."""
        keys = []
        for path in paths:
            key = tuple(path)
            if not key or not all(isinstance(r, int) and r >= 0 for r in key):
                raise ValueError(f"each tree path must be a non-empty list of ranks >= 0: {path!r}")
            keys.append(key)
        if not keys:
            raise ValueError("tree paths must not be empty")
        unique = set(keys)
        if len(unique) != len(keys):
            raise ValueError("tree paths must not repeat")
        _check_size(len(unique), max_nodes)
        ordered = sorted(unique, key=lambda key: (len(key), key))
        index = {}
        parents = []
        for key in ordered:
            if len(key) > 1 and key[:-1] not in index:
                raise ValueError(f"tree path {list(key)} has no parent path {list(key[:-1])}")
            rank = key[-1]
            if rank > 0 and (*key[:-1], rank - 1) not in unique:
                raise ValueError(f"tree path {list(key)} skips sibling rank {rank - 1}")
            index[key] = len(parents)
            parents.append(index[key[:-1]] if len(key) > 1 else ROOT)
        return cls(tuple(parents))

    @classmethod
    def from_parents(cls, parents: Sequence[int], *, max_nodes: int | None = None) -> TokenTree:
        _check_size(len(parents), max_nodes)
        return cls(tuple(parents))

    @classmethod
    def parse(cls, spec: object, *, max_nodes: int | None = None) -> TokenTree:
        """Accept a TokenTree, a k-config (tuple / list of ints / string) or a list of paths."""
        if isinstance(spec, TokenTree):
            _check_size(spec.num_nodes, max_nodes)
            return spec
        if isinstance(spec, str):
            return cls.from_config(spec, max_nodes=max_nodes)
        if isinstance(spec, Sequence) and spec and all(isinstance(s, Sequence) for s in spec):
            return cls.from_paths(spec, max_nodes=max_nodes)  # type: ignore[arg-type]
        if isinstance(spec, Sequence):
            return cls.from_config(spec, max_nodes=max_nodes)  # type: ignore[arg-type]
        raise ValueError(
            f"tree must be a k-config like '4,2,2', a list of paths or a TokenTree, got {spec!r}"
        )

    # ------------------------------------------------------------------ derived structure
    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @cached_property
    def depth(self) -> tuple[int, ...]:
        """Depth of every node (children of the root have depth 1)."""
        depth: list[int] = []
        for parent in self.parents:
            depth.append(1 if parent == ROOT else depth[parent] + 1)
        return tuple(depth)

    @property
    def max_depth(self) -> int:
        return self.depth[-1]

    @cached_property
    def levels(self) -> tuple[range, ...]:
        """Node indices of each depth, as contiguous ranges (BFS order)."""
        starts = [0] + [i for i in range(1, self.num_nodes) if self.depth[i] != self.depth[i - 1]]
        ends = [*starts[1:], self.num_nodes]
        return tuple(range(s, e) for s, e in zip(starts, ends, strict=True))

    @cached_property
    def _children(self) -> dict[int, tuple[int, ...]]:
        children: dict[int, list[int]] = {ROOT: []}
        for i, parent in enumerate(self.parents):
            children.setdefault(parent, []).append(i)
        return {node: tuple(kids) for node, kids in children.items()}

    def children(self, node: int) -> tuple[int, ...]:
        """Children of ``node`` (``ROOT`` for the root) in sibling-rank order."""
        return self._children.get(node, ())

    @property
    def max_children(self) -> int:
        return max(len(kids) for kids in self._children.values())

    @cached_property
    def rank(self) -> tuple[int, ...]:
        """Sibling rank of every node (0 = its parent's first child)."""
        ranks = [0] * self.num_nodes
        for kids in self._children.values():
            for r, child in enumerate(kids):
                ranks[child] = r
        return tuple(ranks)

    def ancestors(self, node: int) -> list[int]:
        """``node`` and its ancestors, root side first (the root itself excluded)."""
        chain = []
        while node != ROOT:
            chain.append(node)
            node = self.parents[node]
        return chain[::-1]

    @cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """Root-to-leaf node-index paths, one per leaf, in BFS order of the leaves."""
        leaves = [i for i in range(self.num_nodes) if not self.children(i)]
        return tuple(tuple(self.ancestors(leaf)) for leaf in leaves)

    def rank_paths(self) -> list[list[int]]:
        """Medusa-style description: the sibling-rank path of every node."""
        return [[self.rank[a] for a in self.ancestors(i)] for i in range(self.num_nodes)]

    def ancestor_mask(self, device: torch.device | str = "cpu") -> Tensor:
        """Boolean ``[N, N]``: ``mask[i, j]`` is true when node ``i`` may attend to node ``j``
        (``j`` is ``i`` or one of its ancestors)."""
        return self._ancestor_mask.to(device, copy=True)

    @cached_property
    def _ancestor_mask(self) -> Tensor:
        n = self.num_nodes
        mask = torch.eye(n, dtype=torch.bool)
        for i, parent in enumerate(self.parents):
            if parent != ROOT:
                mask[i] |= mask[parent]
        return mask

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """Position offsets ``[N]`` of the nodes relative to the root (= depth)."""
        return torch.tensor(self.depth, dtype=torch.long, device=device)

    def describe(self) -> str:
        """Short human-readable name: the k-config when the tree is one, else a node count."""
        config = self.k_config()
        if config is not None:
            return "(" + ",".join(map(str, config)) + ")"
        return f"<{self.num_nodes} nodes, depth {self.max_depth}>"

    def k_config(self) -> tuple[int, ...] | None:
        """The k-config this tree was built from, or None if it is not a full k-ary tree laid
        out as ``from_config`` lays it out (siblings contiguous, parents in order)."""
        if any(b < a for a, b in itertools.pairwise(self.parents)):
            return None  # same shape as a k-config tree, but numbered differently
        ks = []
        for level in self.levels:
            parents_of_level = [self.parents[i] for i in level]
            groups = {p: parents_of_level.count(p) for p in parents_of_level}
            sizes = set(groups.values())
            previous = range(0) if not ks else self.levels[len(ks) - 1]
            expected_parents = {ROOT} if not ks else set(previous)
            if len(sizes) != 1 or set(groups) != expected_parents:
                return None
            ks.append(sizes.pop())
        return tuple(ks)


def _check_size(num_nodes: int, max_nodes: int | None) -> None:
    """``max_nodes``: the caller's limit (``SpecConfig.max_tree_nodes``); None for no limit."""
    if max_nodes is None:
        return
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1:
        raise ValueError(f"max_tree_nodes must be an integer >= 1, got {max_nodes!r}")
    if num_nodes > max_nodes:
        raise ValueError(
            f"tree has {num_nodes} nodes, more than the limit max_tree_nodes={max_nodes}"
        )
