"""Tree masks as llama.cpp sequence ids (``mcsd.models.sequences``), checked without llama.cpp.

``FakeCache`` models the rules of llama.cpp's unified KV cache that the mapping relies on (read
from the vendored llama.cpp of llama-cpp-python 0.3.36): a token attends to the cells holding its
FIRST sequence id at positions <= its own; ``seq_cp`` adds an id to the cells of another id in a
position range; ``seq_keep`` keeps one id and frees the cells without it; and a batch is refused
unless, for every id, its positions continue the cache by one and have no gaps, the ids one
token carries have the same extent in the cache, and every id's tokens share some id.

Random forests grown over several forwards (target-style whole trees, draft-style levels that
attach to earlier forwards, chains), with random commits of root-to-node paths, must give every
new token exactly the committed tokens, its ancestors and itself, and leave sequence 0 holding
exactly the committed tokens. The real llama.cpp runs the same mapping in test_llamacpp.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from mcsd.models.sequences import COMMITTED, ROOT, SequenceMap


@dataclass
class Cell:
    label: int  # which token this is (a unique id given by the test)
    pos: int
    seqs: set[int]


class FakeCache:
    """llama.cpp's unified KV cache, as far as masking, copying and batch checks go."""

    def __init__(self) -> None:
        self.cells: list[Cell] = []

    def seq_cp(self, source: int, target: int, end: int) -> None:
        stop = end if end >= 0 else 1 << 30
        for cell in self.cells:
            if source in cell.seqs and cell.pos < stop:
                cell.seqs.add(target)

    def seq_keep(self, seq: int) -> None:
        self.cells = [Cell(c.label, c.pos, {seq}) for c in self.cells if seq in c.seqs]

    def seq_rm(self, seq: int) -> None:
        """``llama_memory_seq_rm(seq, -1, -1)``: a cell left without ids is freed."""
        for cell in self.cells:
            cell.seqs.discard(seq)
        self.cells = [c for c in self.cells if c.seqs]

    def extent(self, seq: int) -> tuple[int, int]:
        positions = [c.pos for c in self.cells if seq in c.seqs]
        return (min(positions), max(positions)) if positions else (-1, -1)

    def decode(self, batch: list[tuple[int, int, tuple[int, ...]]]) -> list[set[int]]:
        """Check the batch as llama_batch_allocr does, store it, return what each token sees."""
        for seq in {s for _, _, seqs in batch for s in seqs}:
            positions = [p for _, p, seqs in batch if seq in seqs]
            last = self.extent(seq)[1]
            if last >= 0:
                assert min(positions) == last + 1, f"seq {seq}: Y = X + 1 violated"
            assert max(positions) - min(positions) + 1 <= len(set(positions)), f"seq {seq} gaps"
            assert positions == sorted(positions), f"seq {seq} positions decrease"
            shared = set.intersection(*(set(seqs) for _, _, seqs in batch if seq in seqs))
            assert shared, f"seq {seq} belongs to incompatible sequence sets"
        for _, _, seqs in batch:
            for other in seqs[1:]:
                assert self.extent(other) == self.extent(seqs[0]), "coupled ids diverged"
        self.cells += [Cell(label, pos, set(seqs)) for label, pos, seqs in batch]
        return [
            {c.label for c in self.cells if seqs[0] in c.seqs and c.pos <= pos}
            for _, pos, seqs in batch
        ]


class Scenario:
    """A SequenceMap (one row: ids ``base ..``), the fake cache (shared by the rows of one
    context: ``shared``), and what every pending entry should see."""

    def __init__(
        self, sequences: int = 64, *, base: int = 0, cache: FakeCache | None = None
    ) -> None:
        self.map = SequenceMap(sequences, base=base)
        self.shared = cache is not None
        self.cache = FakeCache() if cache is None else cache
        self.committed: list[int] = []  # labels of the committed tokens, in order
        self.pending: list[int] = []  # labels of the pending entries, in block order
        self.ancestry: list[set[int]] = []  # per pending entry: itself and its ancestors' labels
        self.next_label = base * 1000  # labels unique across the rows of one cache

    def forward(self, parents: list[int]) -> None:
        """New tokens below ``parents`` (pending indices, ROOT, or pending + i for earlier new
        tokens); checks the mask route (rows) and what llama.cpp would let each token see."""
        batch = self.prepare(parents)
        self.finish(self.cache.decode(batch))

    def prepare(self, parents: list[int]) -> list[tuple[int, int, tuple[int, ...]]]:
        """The plan of ``forward`` and its copies; returns the tokens for the batch."""
        first = len(self.pending)
        labels = list(range(self.next_label, self.next_label + len(parents)))
        self.next_label += len(parents)
        block = self.pending + labels  # the columns of the mask
        rows = []
        ancestry = list(self.ancestry)
        for label, parent in zip(labels, parents, strict=True):
            ancestry.append((set() if parent == ROOT else ancestry[parent]) | {label})
            rows.append([column in ancestry[-1] for column in block])
        assert self.map.parents_from_mask(rows) == parents
        depths = [len(ancestry[first + i]) - 1 for i in range(len(parents))]
        positions = [len(self.committed) + d for d in depths]
        plan = self.map.plan(parents, positions)
        for copy in plan.copies:
            self.cache.seq_cp(copy.source, copy.target, copy.end)
        self._planned = (plan, labels, ancestry, first)
        return list(zip(labels, plan.positions, plan.seqs, strict=True))

    def finish(self, seen: list[set[int]]) -> None:
        """Adopt the prepared plan once decoded; each token saw what ``seen`` says."""
        plan, labels, ancestry, first = self._planned
        self.map.apply(plan)
        for i, visible in enumerate(seen):
            assert visible == set(self.committed) | ancestry[first + i], i
        self.pending += labels
        self.ancestry = ancestry

    def skip(self, n: int) -> None:
        """A forward of the other rows: ``n`` padding entries here."""
        self.map.skip(n)
        self.pending += [-1] * n
        self.ancestry += [set() for _ in range(n)]

    def commit(self, keep: list[int]) -> None:
        branches = self.map.branches
        copy = self.map.commit(keep)
        if copy is not None:
            self.cache.seq_cp(copy.source, copy.target, copy.end)
        if self.shared:  # seq_keep would drop the other rows' ids
            for seq in branches:
                self.cache.seq_rm(seq)
        else:
            self.cache.seq_keep(COMMITTED)
        self.committed += [self.pending[i] for i in keep]
        base = self.map.base
        mine = sorted((c for c in self.cache.cells if base in c.seqs), key=lambda c: c.pos)
        assert [c.label for c in mine] == self.committed
        assert [c.pos for c in mine] == list(range(len(self.committed)))
        assert all(c.seqs == {base} for c in mine)  # no branch id survives the commit
        self.pending, self.ancestry = [], []


def _random_path(scenario: Scenario, rng: random.Random) -> list[int]:
    """A random root-to-entry path of the pending block (possibly empty)."""
    real = [i for i, label in enumerate(scenario.pending) if label != -1]  # not padding
    if not real or rng.random() < 0.15:
        return []
    node = rng.choice(real)
    path = []
    while node != ROOT:
        path.append(node)
        node = scenario.map.parent(node)
    return path[::-1]


@pytest.mark.parametrize("seed", range(200))
def test_random_forests_see_exactly_their_ancestors(seed: int) -> None:
    rng = random.Random(seed)
    scenario = Scenario()
    scenario.forward([ROOT, *range(rng.randrange(0, 6))])  # a prefill chain
    scenario.commit(list(range(len(scenario.pending))))
    for _ in range(rng.randrange(2, 6)):
        for _ in range(rng.randrange(1, 4)):  # one to three forwards before each commit
            pending = len(scenario.pending)
            parents: list[int] = []
            for i in range(rng.randrange(1, 7)):
                choices = [ROOT, *range(pending + i)]
                parents.append(
                    rng.choice(choices[-4:]) if rng.random() < 0.7 else rng.choice(choices)
                )
            scenario.forward(parents)
        scenario.commit(_random_path(scenario, rng))


def _random_parents(scenario: Scenario, rng: random.Random) -> list[int]:
    """New tokens below random real (not padding) entries, mostly recent ones."""
    pending = len(scenario.pending)
    real = [i for i in range(pending) if scenario.pending[i] != -1]
    parents: list[int] = []
    for i in range(rng.randrange(1, 5)):
        choices = [ROOT, *real, *range(pending, pending + i)]
        parents.append(rng.choice(choices[-4:]) if rng.random() < 0.7 else rng.choice(choices))
    return parents


@pytest.mark.parametrize("seed", range(100))
def test_rows_of_one_cache_see_exactly_their_own_ancestors(seed: int) -> None:
    """Three rows on one cache (ids 0.., 8.., 16..): each forward puts the tokens of a random
    subset of the rows in ONE batch (the others get padding entries), commits drop each row's
    own branch ids; every token sees its row's committed tokens and its ancestors only, and no
    row's commit disturbs another's cells."""
    rng = random.Random(seed)
    cache = FakeCache()
    rows = [Scenario(8, base=8 * r, cache=cache) for r in range(3)]
    for row in rows:
        row.forward([ROOT, *range(rng.randrange(0, 4))])  # prefills of different lengths
        row.commit(list(range(len(row.pending))))
    for _ in range(rng.randrange(2, 5)):
        for _ in range(rng.randrange(1, 4)):
            running = [row for row in rows if rng.random() < 0.7] or rows[:1]
            n = rng.randrange(1, 4)
            parents = {id(row): _random_parents(row, rng)[:n] for row in running}
            n = min(len(p) for p in parents.values())
            batch, spans = [], []
            for row in running:
                tokens = row.prepare(parents[id(row)][:n])
                spans.append((row, len(batch), len(batch) + len(tokens)))
                batch += tokens
            seen = cache.decode(batch)
            for row, start, stop in spans:
                row.finish(seen[start:stop])
            for row in rows:
                if row not in running:
                    row.skip(n)
        for row in rows:
            row.commit(_random_path(row, rng))


def test_padding_entries_are_neither_seen_nor_kept() -> None:
    sequences = SequenceMap(8, base=8)
    sequences.apply(sequences.plan([ROOT], [0]))
    sequences.skip(2)
    assert sequences.pending == 3 and sequences.branches == (9,)
    assert sequences.chain_parents(1) is None  # a block with padding is no chain
    with pytest.raises(ValueError, match=r"sees pending entries \[1\], padding"):
        sequences.parents_from_mask([[True, True, False, True]])
    assert sequences.parents_from_mask([[True, False, False, True]]) == [0]
    with pytest.raises(ValueError, match="keep: entry 2 is padding"):
        sequences.commit([2])
    with pytest.raises(ValueError, match="without padding"):
        sequences.whole_block()
    copy = sequences.commit([0])
    assert copy is not None and (copy.source, copy.target, copy.end) == (9, 8, 1)
    assert sequences.committed == 1 and sequences.branches == ()


def test_draft_levels_attach_to_earlier_forwards() -> None:
    """The draft's pattern: uncached chain, then one forward per tree level (4, 2, 2)."""
    scenario = Scenario()
    scenario.forward([ROOT, 0, 1])  # prefill
    scenario.commit([0, 1, 2])
    scenario.forward([ROOT, 0])  # uncached tokens
    scenario.forward([1, 1, 1, 1])  # level 1: children of the last uncached token
    scenario.forward([2, 2, 3, 3, 4, 4, 5, 5])  # level 2
    scenario.commit([0, 1, 3, 8])  # a path through the second level-1 node


def test_whole_tree_then_commit_of_a_later_branch() -> None:
    scenario = Scenario()
    scenario.forward([ROOT])
    scenario.commit([0])
    scenario.forward([ROOT, 0, 0, 0, 1, 1, 2, 3])  # root, 3 children, 4 grandchildren
    scenario.commit([0, 3, 7])
    scenario.forward([ROOT, 0])
    scenario.commit([0, 1])


def test_refuses_masks_that_are_not_forests() -> None:
    sequences = SequenceMap(8)
    with pytest.raises(ValueError, match="itself and nothing after it"):
        sequences.parents_from_mask([[False, False], [True, True]])
    with pytest.raises(ValueError, match="itself and nothing after it"):
        sequences.parents_from_mask([[True, True], [True, True]])
    # token 2 sees token 1 but not token 1's parent 0: not an ancestor chain
    with pytest.raises(ValueError, match="not one entry and all of its ancestors"):
        sequences.parents_from_mask(
            [[True, False, False], [True, True, False], [False, True, True]]
        )
    # token 2 sees two siblings
    with pytest.raises(ValueError, match="not one entry and all of its ancestors"):
        sequences.parents_from_mask(
            [[True, False, False], [False, True, False], [True, True, True]]
        )


def test_refuses_positions_that_are_not_committed_plus_depth() -> None:
    sequences = SequenceMap(8)
    with pytest.raises(ValueError, match="its position must be 1"):
        sequences.plan([ROOT, 0], [0, 2])


def test_refuses_more_leaves_than_sequence_ids() -> None:
    sequences = SequenceMap(4)  # ids 1..3 for paths
    sequences.plan([ROOT, 0, 0, 0], [0, 1, 1, 1])
    with pytest.raises(
        ValueError, match=r"more than 3 root-to-leaf paths.*LlamaCppConfig\.sequences"
    ):
        sequences.plan([ROOT, 0, 0, 0, 0], [0, 1, 1, 1, 1])


def test_refuses_commits_that_are_not_paths() -> None:
    sequences = SequenceMap(8)
    sequences.apply(sequences.plan([ROOT, 0, 0], [0, 1, 1]))
    with pytest.raises(ValueError, match="path from a root"):
        sequences.commit([1, 2])
    with pytest.raises(ValueError, match="must then be one chain"):
        sequences.whole_block()
    assert sequences.commit([0, 2]) is not None
    assert sequences.committed == 2


@pytest.mark.usefixtures("wrong_sequences")
def test_the_model_catches_a_tree_put_in_one_sequence() -> None:
    """The control: with every node in one sequence, siblings see each other."""
    scenario = Scenario()
    scenario.forward([ROOT])
    scenario.commit([0])
    with pytest.raises(AssertionError):
        scenario.forward([ROOT, 0, 0])
