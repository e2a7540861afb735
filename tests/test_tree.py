"""Tests of mcsd.tree.TokenTree: constructors, validation, and derived structure.

The attention mask and positions are compared with a brute-force ancestor closure (repeated
boolean matrix products of the parent relation) on random BFS-ordered trees.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from mcsd.config import SpecConfig
from mcsd.tree import ROOT, TokenTree


# ---------------------------------------------------------------- constructors
def test_k_config_tree() -> None:
    tree = TokenTree.from_config((4, 2, 2))
    assert tree.num_nodes == 4 + 8 + 16
    assert tree.parents[:4] == (ROOT,) * 4
    assert tree.parents[4:12] == (0, 0, 1, 1, 2, 2, 3, 3)
    assert tree.parents[12:] == tuple(p for p in range(4, 12) for _ in range(2))
    assert tree.depth == (1,) * 4 + (2,) * 8 + (3,) * 16
    assert tree.levels == (range(0, 4), range(4, 12), range(12, 28))
    assert tree.max_depth == 3
    assert tree.max_children == 4
    assert tree.describe() == "(4,2,2)"


def test_chain() -> None:
    tree = TokenTree.from_config((1, 1, 1, 1))
    assert tree.parents == (ROOT, 0, 1, 2)
    assert tree.paths == ((0, 1, 2, 3),)
    assert tree.max_children == 1


@pytest.mark.parametrize(
    "spec", ["4,2,2", " 4, 2,2 ", "(4,2,2)", "[4, 2, 2]", (4, 2, 2), [4, 2, 2]]
)
def test_k_config_spellings(spec: object) -> None:
    assert TokenTree.parse(spec) == TokenTree.from_config((4, 2, 2))


def test_from_paths() -> None:
    paths = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    tree = TokenTree.from_paths(paths)
    assert tree.parents == (ROOT, ROOT, ROOT, 0, 0, 1, 3)
    assert tree.rank_paths() == paths
    assert TokenTree.parse(paths) == tree
    shuffled = paths[:]
    random.Random(0).shuffle(shuffled)
    assert TokenTree.from_paths(shuffled) == tree  # the order of the paths does not matter
    assert TokenTree.from_paths([tuple(p) for p in paths]) == tree


def test_from_parents_and_parse_of_a_tree() -> None:
    tree = TokenTree.from_parents([ROOT, ROOT, 0, 0, 1])
    assert tree.parents == (ROOT, ROOT, 0, 0, 1)
    assert TokenTree.parse(tree) is tree
    assert TokenTree.from_paths(tree.rank_paths()) == tree


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "must not be empty"),
        ((), "must not be empty"),
        ([], "must not be empty"),
        ("()", "must not be empty"),
        ((2, 0), "k_2 must be an integer >= 1"),
        ("2,-1", "k_2 must be an integer >= 1"),
        ((0,), "k_1 must be"),
        ((2, 1.5), "k_2 must be"),
        ((True,), "k_1 must be"),
        ("4,x", "comma-separated integers"),
    ],
)
def test_bad_k_config(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenTree.parse(spec)


@pytest.mark.parametrize(
    ("parents", "message"),
    [
        ((), "at least one node"),
        ((ROOT, 2, 0), "must come before its child"),
        ((ROOT, 1), "must come before its child"),
        ((0,), "must come before its child"),
        ((ROOT, -2), r"parents\[1\] must be -1"),
        ((ROOT, 0.0), r"parents\[1\] must be -1"),
        ((ROOT, 0, ROOT), "BFS order"),
        ((ROOT, ROOT, 0, 1, 2, ROOT), "BFS order"),
    ],
)
def test_bad_parents(parents: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenTree(parents)


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        ([[0], [0, 1]], "skips sibling rank 0"),
        ([[0], [1, 0]], "has no parent path"),
        ([[0], [0]], "must not repeat"),
        ([[0], []], "non-empty"),
        ([[0], [-1]], "ranks >= 0"),
    ],
)
def test_bad_paths(paths: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenTree.from_paths(paths)


def test_node_limit() -> None:
    TokenTree.from_config((4, 4, 4), max_nodes=84)
    with pytest.raises(ValueError, match="84 nodes, more than the limit max_tree_nodes=83"):
        TokenTree.from_config((4, 4, 4), max_nodes=83)
    with pytest.raises(ValueError, match="max_tree_nodes=2"):
        TokenTree.from_paths([[0], [1], [2]], max_nodes=2)
    with pytest.raises(ValueError, match="max_tree_nodes=2"):
        TokenTree.from_parents([ROOT, ROOT, 0], max_nodes=2)
    with pytest.raises(ValueError, match="max_tree_nodes=2"):
        TokenTree.parse(TokenTree.from_config((3,)), max_nodes=2)
    # the default limit (SpecConfig's) applies to a huge k-config before any node is built
    with pytest.raises(ValueError, match="max_tree_nodes=1024"):
        SpecConfig(tree=(10, 10, 10, 10))


# ---------------------------------------------------------------- random trees vs brute force
def random_tree(rng: random.Random, shuffle_levels: bool) -> TokenTree:
    """A random tree in BFS order: each node of a level gets 0-3 children (the root at least
    one). With ``shuffle_levels`` the nodes inside each level are permuted (still valid BFS: the
    depth never decreases), so siblings need not be contiguous."""
    parents: list[int] = []
    level = [ROOT]
    for _ in range(rng.randint(1, 5)):
        children = []
        for parent in level:
            for _ in range(rng.randint(1 if parent == ROOT else 0, 3)):
                children.append(parent)
        if not children:
            break
        if shuffle_levels:
            rng.shuffle(children)
        start = len(parents)
        parents.extend(children)
        level = list(range(start, len(parents)))
    return TokenTree(tuple(parents))


def brute_force_closure(parents: tuple[int, ...]) -> torch.Tensor:
    """``closure[i, j]``: j is i or an ancestor of i, by repeated squaring of (I + parent)."""
    n = len(parents)
    step = torch.eye(n, dtype=torch.long)
    for i, parent in enumerate(parents):
        if parent != ROOT:
            step[i, parent] = 1
    closure = step
    for _ in range(n.bit_length() + 1):
        closure = ((closure @ closure) > 0).long()
    return closure.bool()


RANDOM_TREES = [
    random_tree(random.Random(seed), shuffle_levels=seed % 2 == 1) for seed in range(60)
]


@pytest.mark.parametrize("tree", RANDOM_TREES, ids=lambda t: f"{t.num_nodes}nodes")
def test_mask_and_positions_equal_brute_force(tree: TokenTree) -> None:
    closure = brute_force_closure(tree.parents)  # [N, N]
    mask = tree.ancestor_mask()
    assert mask.dtype == torch.bool and mask.shape == (tree.num_nodes, tree.num_nodes)
    assert torch.equal(mask, closure)
    positions = tree.positions()
    assert positions.dtype == torch.long
    # a node at depth d has d - 1 ancestors plus itself in view
    assert torch.equal(positions, closure.sum(dim=-1))
    assert tree.positions().tolist() == list(tree.depth)


@pytest.mark.parametrize("tree", RANDOM_TREES, ids=lambda t: f"{t.num_nodes}nodes")
def test_derived_structure(tree: TokenTree) -> None:
    n = tree.num_nodes
    # children: exactly the nodes naming it as parent, in index (= sibling rank) order
    for node in (ROOT, *range(n)):
        assert tree.children(node) == tuple(i for i in range(n) if tree.parents[i] == node)
    # rank: position among siblings
    for i in range(n):
        assert tree.children(tree.parents[i])[tree.rank[i]] == i
    # levels: contiguous, cover every node once, one depth each, depth increasing
    assert [i for level in tree.levels for i in level] == list(range(n))
    for d, level in enumerate(tree.levels, start=1):
        assert {tree.depth[i] for i in level} == {d}
    # paths: one per leaf, each root-to-leaf through parent links
    leaves = [i for i in range(n) if not tree.children(i)]
    assert [path[-1] for path in tree.paths] == leaves
    for path in tree.paths:
        assert tree.parents[path[0]] == ROOT
        for parent, child in itertools.pairwise(path):
            assert tree.parents[child] == parent
    assert {i for path in tree.paths for i in path} == set(range(n))
    # ancestors agree with the mask
    mask = tree.ancestor_mask()
    for i in range(n):
        assert tree.ancestors(i) == [j for j in range(n) if mask[i, j]]
    # rank paths describe the same tree up to numbering
    rebuilt = TokenTree.from_paths(tree.rank_paths())
    assert rebuilt.num_nodes == n
    assert sorted(rebuilt.rank_paths()) == sorted(tree.rank_paths())
    # k_config round trip whenever the tree is one
    config = tree.k_config()
    if config is not None:
        assert TokenTree.from_config(config) == tree


def test_some_random_trees_are_shuffled_within_levels() -> None:
    # guard against the generator degenerating into canonical layouts only
    assert any(tree.k_config() is None and tree.num_nodes > 3 for tree in RANDOM_TREES)
    assert any(any(b < a for a, b in itertools.pairwise(t.parents)) for t in RANDOM_TREES)


@pytest.mark.parametrize("config", [(1,), (3,), (1, 1, 1, 1), (4, 2, 2), (2, 3, 1, 2), (5, 1)])
def test_k_config_round_trip(config: tuple[int, ...]) -> None:
    tree = TokenTree.from_config(config)
    assert tree.k_config() == config
    assert tree.describe() == "(" + ",".join(map(str, config)) + ")"
    assert TokenTree.parse(tree.describe()) == tree


def test_k_config_of_other_trees_is_none() -> None:
    assert TokenTree.from_paths([[0], [1], [0, 0]]).k_config() is None  # uneven
    assert TokenTree((ROOT, ROOT, 1, 0)).k_config() is None  # a (2, 1) shape, numbered otherwise
    assert TokenTree.from_paths([[0], [1], [0, 0]]).describe() == "<3 nodes, depth 2>"


def test_tree_is_frozen_and_hashable() -> None:
    tree = TokenTree.from_config((2, 2))
    with pytest.raises(AttributeError):
        tree.parents = (ROOT,)  # type: ignore[misc]
    assert len({tree, TokenTree.from_config("2,2")}) == 1
