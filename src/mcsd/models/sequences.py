"""Tree attention as llama.cpp sequence ids: pure bookkeeping for ``mcsd.models.llamacpp``.

llama.cpp has no attention-mask input. In its unified KV cache every cell holds a position and a
set of sequence ids, and a token attends to exactly the cells that hold the token's FIRST
sequence id at a position <= its own (``llama_kv_cache::set_input_kq_mask``); the token's own
cell gets all of its ids. The runtime protocol instead describes the pending block with boolean
masks, one forward at a time. ``SequenceMap`` turns those masks into sequence ids:

- a row owns the ids ``base .. base + sequences - 1`` (a context of several rows gives each its
  own block: rows never share an id, so they never see each other's cells); its first id
  ``base`` holds exactly the committed tokens (positions ``0 .. committed - 1``);
- every mask must describe a forest over the pending block: each new token sees the committed
  tokens, one pending entry (its parent, or none: a root) and all of that entry's ancestors, and
  its position is ``committed + depth`` (depth 0 for a root), so positions grow by one along
  every path;
- every leaf of the forest owns one sequence id whose cells are the committed tokens plus its
  root-to-leaf path, so a token carries the ids of all the leaves below it. On the path of a
  token's first id, the cells at positions <= its own are then exactly the committed tokens, its
  ancestors and itself: its descendants on that path sit deeper, other branches hold other ids.

A forward that attaches new tokens below an existing entry ``e`` either extends the sequence
that ends at ``e`` (``e`` was a leaf) or starts a new id as a copy of the cells of one of ``e``'s
ids at positions <= pos(e) (``llama_memory_seq_cp``, which in a unified cache only adds the id to
those cells: nothing is recomputed). A new root starts a copy of the committed id. Committing a
path adds the committed id to its cells (one more copy, bounded by the path's last position) and
then drops the row's other ids (``branches``: ``llama_memory_seq_rm`` each, or
``llama_memory_seq_keep`` when the context holds one row), which frees the rejected cells.

A forward that skips a row (``LlamaCppModel.forward_rows``) still appends to that row's pending
block, as the protocol's padding does: ``skip(n)`` adds ``n`` *padding* entries that hold no
cell and no id; a later token may not see one and a commit may not keep one.

These rules also satisfy llama.cpp's batch checks: for each id, the positions of its tokens in a
batch start right after its last position in the cache and have no gaps, and the ids a token
carries have identical extents in the cache before the batch (they all branch off at the same
entry). ``tests/test_llamacpp_sequences.py`` checks all of this against a model of llama.cpp's
rules on random forests built over several forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROOT = -1  # parent of a forest root: the committed tokens
PADDING = -2  # parent of a padding entry (``skip``): no cell, no id, seen by nothing
COMMITTED = 0  # the sequence id of the committed tokens of a row whose block starts at 0


@dataclass(frozen=True)
class Copy:
    """``llama_memory_seq_cp(source, target, -1, end)``: add ``target`` to the cells of
    ``source`` at positions < ``end`` (``end = -1``: all of them)."""

    source: int
    target: int
    end: int


@dataclass
class _State:
    committed: int = 0
    parents: list[int] = field(default_factory=list)  # per pending entry: ROOT, PADDING or one
    depths: list[int] = field(default_factory=list)  # per pending entry, 0 for a root
    seqs: list[list[int]] = field(default_factory=list)  # per pending entry, first = attention
    ends: dict[int, int] = field(default_factory=dict)  # sequence id -> the leaf it ends at

    def copy(self) -> _State:
        return _State(
            self.committed,
            list(self.parents),
            list(self.depths),
            [list(s) for s in self.seqs],
            dict(self.ends),
        )


@dataclass(frozen=True)
class Plan:
    """How to run one forward: the copies to make first, then each new token's position and
    sequence ids. ``SequenceMap.apply`` adopts it once the decode succeeded."""

    positions: tuple[int, ...]  # per new token
    seqs: tuple[tuple[int, ...], ...]  # per new token, first = the one its attention uses
    copies: tuple[Copy, ...]
    state: _State


class SequenceMap:
    """The pending forest of one row of a llama.cpp context and the sequence ids of its paths:
    ids ``base .. base + sequences - 1``, ``base`` for the committed tokens. ``setting`` names
    the configuration field that bounds ``sequences`` (for the error when a forest outgrows it)."""

    def __init__(
        self, sequences: int, *, base: int = 0, setting: str = "LlamaCppConfig.sequences"
    ) -> None:
        if sequences < 2:
            raise ValueError(
                f"sequences must be >= 2 (one id is the committed tokens), got {sequences}"
            )
        if base < 0:
            raise ValueError(f"base must be >= 0, got {base}")
        self.sequences = sequences
        self.base = base  # the committed tokens' id; the tree ids follow it
        self.setting = setting
        self._state = _State()

    @property
    def committed(self) -> int:
        return self._state.committed

    @property
    def pending(self) -> int:
        return len(self._state.parents)

    def parent(self, entry: int) -> int:
        return self._state.parents[entry]

    def path_ids(self, entry: int) -> list[int]:
        """The sequence ids whose path passes through pending ``entry``."""
        return list(self._state.seqs[entry])

    @property
    def branches(self) -> tuple[int, ...]:
        """The ids the pending block uses besides ``base`` (what a commit drops)."""
        return tuple(sorted(self._state.ends))

    def skip(self, n: int) -> None:
        """Append ``n`` padding entries: a forward that ran other rows only."""
        state = self._state
        state.parents += [PADDING] * n
        state.depths += [0] * n
        state.seqs += [[] for _ in range(n)]

    # ------------------------------------------------------------------ forwards
    def parents_from_mask(self, rows: list[list[bool]]) -> list[int]:
        """Each new token's parent (a pending index, or ``ROOT``) from its mask row over
        [pending block, new tokens]; ``ValueError`` for a mask that is not a forest."""
        state = self._state
        pending = len(state.parents)
        parents = list(state.parents)
        depths = list(state.depths)
        result = []
        for i, row in enumerate(rows):
            me = pending + i
            if not row[me] or any(row[me + 1 :]):
                raise ValueError(
                    f"tree_mask row {i}: a new token must see itself and nothing after it"
                )
            seen = [j for j in range(me) if row[j]]
            padding = [j for j in seen if j < pending and parents[j] == PADDING]
            if padding:
                raise ValueError(
                    f"tree_mask row {i} sees pending entries {padding}, padding of a forward "
                    "that ran other rows only: they hold nothing to attend to"
                )
            parent = max(seen, key=depths.__getitem__) if seen else ROOT
            chain = []
            node = parent
            while node != ROOT:
                chain.append(node)
                node = parents[node]
            if len(chain) != len(seen) or set(chain) != set(seen):
                raise ValueError(
                    f"tree_mask row {i} sees pending entries {seen}, which are not one entry and "
                    "all of its ancestors: llama.cpp scores a tree (each token sees a chain of "
                    "ancestors), not an arbitrary mask"
                )
            parents.append(parent)
            depths.append(len(seen))
            result.append(parent)
        return result

    def chain_parents(self, n: int) -> list[int] | None:
        """The parents of ``n`` new tokens that continue the pending block as one chain, when the
        pending block is itself one chain (what a chain mask means then); else None."""
        pending = len(self._state.parents)
        if PADDING in self._state.parents:
            return None
        if pending and self._state.depths[-1] != pending - 1:
            return None
        return [pending - 1 + i if pending + i else ROOT for i in range(n)]

    def plan(self, parents: list[int], positions: list[int]) -> Plan:
        """Sequence ids for new tokens with these parents (pending indices, ``ROOT``, or earlier
        new tokens as ``pending + i``) at these positions; ``ValueError`` when a position is not
        ``committed + depth`` or the forest would need more ids than there are."""
        state = self._state.copy()
        first = len(state.parents)
        n = len(parents)
        for i, parent in enumerate(parents):
            if not ROOT <= parent < first + i or (
                parent != ROOT and state.parents[parent] == PADDING
            ):
                raise ValueError(f"new token {i}: parent {parent} is not an earlier entry")
            depth = 0 if parent == ROOT else state.depths[parent] + 1
            if positions[i] != state.committed + depth:
                raise ValueError(
                    f"new token {i} has position {positions[i]}, but it sees {state.committed} "
                    f"committed tokens and {depth} pending ones: llama.cpp masks attention by "
                    f"position, so its position must be {state.committed + depth}"
                )
            state.parents.append(parent)
            state.depths.append(depth)
            state.seqs.append([])
        has_new_child = [False] * n
        for parent in parents:
            if parent >= first:
                has_new_child[parent - first] = True
        used = set(state.ends) | {self.base}
        ids = range(self.base + 1, self.base + self.sequences)
        claimed: set[int] = set()
        copies: list[Copy] = []
        by_end = {leaf: seq for seq, leaf in state.ends.items()}
        for i in range(n):
            if has_new_child[i]:
                continue
            leaf = first + i
            path = [leaf]  # the new tokens from the leaf up to the topmost new ancestor
            while state.parents[path[-1]] >= first:
                path.append(state.parents[path[-1]])
            anchor = state.parents[path[-1]]  # an old pending entry or ROOT
            seq = by_end.get(anchor) if anchor != ROOT else None
            if seq is None or seq in claimed:
                seq = next((s for s in ids if s not in used), None)
                if seq is None:
                    raise ValueError(
                        f"the pending block would have more than {self.sequences - 1} "
                        f"root-to-leaf paths; raise {self.setting} (llama.cpp allows up to 256 "
                        f"ids in all) or use a tree with fewer leaves"
                    )
                used.add(seq)
                if anchor == ROOT:
                    copies.append(Copy(self.base, seq, -1))
                else:
                    end = state.committed + state.depths[anchor] + 1
                    copies.append(Copy(state.seqs[anchor][0], seq, end))
                    node = anchor
                    while node != ROOT:  # the copy put ``seq`` on every old ancestor's cell
                        state.seqs[node].append(seq)
                        node = state.parents[node]
            claimed.add(seq)
            state.ends[seq] = leaf  # a claimed id moves down from the anchor to this leaf
            for node in path:
                state.seqs[node].append(seq)
        seqs = tuple(tuple(state.seqs[first + i]) for i in range(n))
        return Plan(tuple(positions), seqs, tuple(copies), state)

    def apply(self, plan: Plan) -> None:
        """Adopt ``plan`` after its decode succeeded."""
        self._state = plan.state

    # ------------------------------------------------------------------ commits
    def check_path(self, keep: list[int]) -> None:
        """``ValueError`` unless ``keep`` is a root-to-entry path of the pending block (possibly
        empty) without padding entries."""
        state = self._state
        previous = ROOT
        for i, entry in enumerate(keep):
            if state.parents[entry] == PADDING:
                raise ValueError(
                    f"keep: entry {entry} is padding of a forward that ran other rows only; "
                    "keep none of it"
                )
            if state.parents[entry] != previous:
                raise ValueError(
                    f"keep must be a path from a root of the pending tree (each kept entry the "
                    f"parent of the next); entry {entry} at index {i} does not continue it"
                )
            previous = entry

    def commit(self, keep: list[int]) -> Copy | None:
        """Validate ``keep`` (``check_path``) and forget the pending block. Returns the copy
        that adds ``base`` to the kept cells (None for an empty path); the caller then drops
        the ``branches`` ids (read them first)."""
        self.check_path(keep)
        state = self._state
        copy = None
        if keep:
            last = keep[-1]
            copy = Copy(state.seqs[last][0], self.base, state.committed + state.depths[last] + 1)
        self._state = _State(committed=state.committed + len(keep))
        return copy

    def whole_block(self) -> list[int]:
        """The pending block as a path (what ``commit(None)`` keeps); ``ValueError`` if it is
        not one chain."""
        state = self._state
        if any(d != i for i, d in enumerate(state.depths)) or PADDING in state.parents:
            raise ValueError(
                "commit(None) keeps the whole pending block, which must then be one chain "
                "without padding; pass the path to keep instead"
            )
        return list(range(len(state.depths)))

    def reset(self) -> None:
        self._state = _State()
