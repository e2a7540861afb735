"""The decoding loop (DESIGN section 1): propose a token tree, verify it in one target forward,
accept a path losslessly, commit it.

Invariants between steps (``committed`` = prompt + generated tokens): the target's committed
cache holds ``committed[:-1]``; the last token is *pending* (position ``L - 1``). One step:

1. PROPOSE  the proposer builds a tree below the pending token: node tokens, and the q each
            node's children were drawn from (``mcsd.draft``).
2. VERIFY   one target forward over [pending, nodes...] with the tree mask gives p for every
            node; the rule's tree verifier (``mcsd.verify.rules.tree_verifier``: a device
            verifier or the host walk, as the rule's record says) accepts a path and draws the
            correction or bonus token.
3. COMMIT   the target keeps the pending token and the accepted path, the proposer commits the
            step; stop at a stop token or ``max_new_tokens`` without overshooting.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mcsd.budget import AdaptiveTree, TreeBudget, computed_rows
from mcsd.config import VERIFIER_CACHE, SamplingConfig, SpecConfig
from mcsd.draft.base import BatchProposer, OneRow, Proposer, as_batch_proposer
from mcsd.models.base import Runtime, chain_mask, keep_rows, reset_row, rows_forward, to_device
from mcsd.sampling import draw_children, warp
from mcsd.stats import StepRecord
from mcsd.tree import ROOT, TokenTree
from mcsd.verify.rules import Rule, TreeVerifier, get_rule, tree_verifier


@dataclass(frozen=True)
class Step:
    tokens: tuple[int, ...]  # tokens committed by this step
    record: StepRecord
    finish_reason: str | None  # "stop" (a stop token), "length", or None (not finished)


@dataclass
class _Row:
    """One sequence of the batch: its own committed tokens, config, randomness and stop rules."""

    committed: list[int]  # prompt + generated tokens; the last one is pending
    spec: SpecConfig  # read every step (``tree="none"``: a plain step)
    generator: torch.Generator
    stop_token_ids: frozenset[int]
    max_new_tokens: int  # usable budget (the context may cut the asked one)
    prefill_time: float
    drafted: bool  # the proposer follows this row (it may speculate)
    produced: int = 0
    # ``planned``'s rule and tree: the tree it asked for, None when the proposer grows its own
    # each step (a dynamic tree, the context's or a mixed one)
    planned: SpecConfig | None = None
    rule: Rule | None = None
    tree: TokenTree | None = None


class BatchEngine:
    """Speculative decoding over the rows of ``target`` and ``proposer`` (continuous batching):
    ``add`` a sequence to a free row between steps (its prompt is read in a forward of its
    own), ``step`` every row once, ``remove`` a row (a finished row frees itself). The rows that
    grow the same tree share one draft forward per level and one target forward, each row with
    its own positions, cache length and accepted path (ragged acceptance), and one host
    synchronisation for every row's verification where the rule has a device verifier; a row
    asking for its own tree gets forwards of its own, and rows with ``tree="none"`` share a
    plain decoding forward (a proposer over rows follows their tokens, a one-row one never sees
    them). A one-row proposer (dynamic trees,
    the context's or mixed ones: ``mcsd.draft.base.OneRow``) grows the tree of each step
    itself, with per-step shapes. ``budget`` (``mcsd.budget.TreeBudget``): the rows growing the
    budget's tree grow, each step, the tree an ``AdaptiveTree`` picks for the rows the forward
    computes (``mcsd.budget.computed_rows``) and the acceptance seen so far, down to plain
    decoding with a re-probe now and then; the choice is made before the step draws anything,
    so it stays lossless. Each row draws from its own seeded generator in the order a batch of
    one would, so a row's output does not depend on the rows beside it (under a budget: but
    through the tree it is given, which follows every row's past acceptance).
    ``proposer=None``: plain decoding only. ``speculative_decode`` is this engine with one row."""

    def __init__(
        self,
        target: Runtime,
        proposer: Proposer | BatchProposer | None,
        *,
        vocab_size: int,
        device_verify: bool | None = None,
        verify_dtype: torch.dtype | None = None,
        budget: TreeBudget | None = None,
    ) -> None:
        self.target = target
        self.budget = budget
        self.adaptive = None if budget is None else AdaptiveTree(budget)  # learns the acceptance
        self.proposer = None if proposer is None else as_batch_proposer(proposer)
        if self.proposer is not None and self.proposer.batch_size != target.batch_size:
            raise ValueError(
                f"proposer holds {self.proposer.batch_size} rows and the target "
                f"{target.batch_size}: build both with the same batch_size"
            )
        self.vocab_size = vocab_size
        self.device_verify, self.verify_dtype = device_verify, verify_dtype
        self.rows: dict[int, _Row] = {}
        # per (tree shape, deterministic flags, rule, target sampling), least recently used
        # first: dynamic and context trees have a new shape most steps
        self._verifiers: OrderedDict[tuple, tuple[TreeVerifier, Tensor, Tensor]] = OrderedDict()
        self._clock = StepClock(target.device)

    @property
    def max_batch(self) -> int:
        return self.target.batch_size

    def free_rows(self) -> list[int]:
        return [row for row in range(self.max_batch) if row not in self.rows]

    def add(
        self,
        prompt_ids: list[int],
        spec: SpecConfig,
        *,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> int:
        """Start ``prompt_ids`` in a free row (between steps); returns the row."""
        free = self.free_rows()
        if not free:
            raise ValueError(f"every row of the batch is busy (max_batch {self.max_batch})")
        row = free[0]
        if spec.speculative:
            if self.proposer is None:
                raise ValueError(
                    f"tree {spec.describe_tree()} needs a proposer: this engine decodes plainly "
                    "only (tree 'none')"
                )
            self.proposer.check_spec(spec)
        # A proposer over rows follows every row (a row may speculate later); a one-row one
        # only a row that speculates.
        drafted = self.proposer is not None and (
            spec.speculative or not isinstance(self.proposer, OneRow)
        )
        state = _Row(
            list(prompt_ids),
            spec,
            torch.Generator(self.target.device),
            stop_token_ids,
            0,
            0.0,
            drafted,
        )
        rule, tree = self._plan(state)
        proposer = self.proposer if rule is not None else None
        depth = 1
        if proposer is not None:
            depth = max(tree.max_depth if tree is not None else 1, proposer.max_depth)
        state.max_new_tokens = _check_lengths(
            self.target, proposer, prompt_ids, spec.max_new_tokens, depth
        )
        state.generator.manual_seed(spec.seed if spec.seed is not None else int(torch.seed()))
        started = self._clock.mark()
        _prefill(self.target, row, list(prompt_ids[:-1]))
        if drafted:
            assert self.proposer is not None
            self.proposer.start_row(row, prompt_ids)
        state.prefill_time = self._clock.host_seconds(started, self._clock.mark())
        self.rows[row] = state
        return row

    def _plan(self, r: _Row) -> tuple[Rule | None, TokenTree | None]:
        """``r``'s rule (None: a plain step) and tree, for its current spec."""
        if r.planned is not r.spec:
            spec = r.spec
            r.rule = get_rule(spec.resolved_rule()) if spec.speculative else None
            # the proposer's own trees (dynamic, context, mixed) vary per step: None
            own = not spec.speculative or spec.dynamic is not None
            r.tree = None if own or isinstance(self.proposer, OneRow) else spec.token_tree()
            r.planned = spec
            assert r.rule is None or r.drafted, "a row the proposer does not follow speculates"
        return r.rule, r.tree

    def remove(self, row: int) -> None:
        """Free ``row`` (between steps): its caches are emptied for the next sequence."""
        removed = self.rows.pop(row, None)
        if removed is not None:
            reset_row(self.target, row)
            if self.proposer is not None and removed.drafted:
                self.proposer.remove_row(row)

    def step(self) -> dict[int, Step]:
        """One step of every row (speculative, or plain for the rows that do not speculate);
        finished rows are freed."""
        rows = sorted(self.rows)
        speculative = [row for row in rows if self._plan(self.rows[row])[0] is not None]
        plain = [row for row in rows if self.rows[row].rule is None]
        budgeted = set()  # the rows growing the budget's tree: the load and acceptance decide
        if self.budget is not None:
            budgeted = {row for row in speculative if self.rows[row].tree == self.budget.tree}
        chosen = None
        if self.adaptive is not None and budgeted:  # before this step draws anything
            chosen = self.adaptive.choose(computed_rows(self.target, sorted(budgeted)))
        # rows growing the same tree: one forward each (None: the proposer's own trees)
        groups: dict[TokenTree | None, list[int]] = {}
        for row in speculative:
            tree = self.rows[row].tree
            if row in budgeted:
                if chosen is None:
                    plain.append(row)
                    continue
                tree = chosen
            groups.setdefault(tree, []).append(row)
        steps = {}
        for tree, group in groups.items():
            done = self._speculative_step(group, tree)
            if self.adaptive is not None and tree is not None and tree == chosen:
                ranks = [done[row].record.ranks for row in group if row in budgeted]
                self.adaptive.observe(tree, ranks)
            steps |= done
        if plain:
            plain.sort()
            steps |= self._plain_step(plain)
        for row, step in steps.items():
            if step.finish_reason is not None:
                self.remove(row)
        return steps

    def _plain_step(self, rows: list[int]) -> dict[int, Step]:
        """The target alone: one forward of every row's pending token, one token drawn per row
        from its warped p (its argmax when greedy), one host transfer."""
        started = time.perf_counter()
        device, target = self.target.device, self.target
        state = [self.rows[row] for row in rows]
        tokens = to_device([[r.committed[-1], len(r.committed) - 1] for r in state], device)
        logits = rows_forward(
            target, rows, tokens[:, :1], tokens[:, 1:], chain_mask(1, device=device), logits="last"
        )  # [B, 1, V']
        target.commit(keep_rows(self.max_batch, {row: [0] for row in rows}))
        draws = []
        for row, r in zip(rows, state, strict=True):
            row_logits = logits[row, -1, : self.vocab_size]  # [V]
            if r.spec.target.greedy:  # argmax of the one-hot p is the argmax of the logits
                draws.append(row_logits.argmax()[None])
            else:
                p = warp(row_logits, r.spec.target)
                draws.append(draw_children(p[None], 1, replacement=True, generator=r.generator)[0])
        drawn = torch.cat(draws).tolist()  # the step's host synchronisation
        elapsed = time.perf_counter() - started
        steps = {}
        for row, r, token in zip(rows, state, drawn, strict=True):
            if self.proposer is not None and r.drafted:  # it may speculate again
                self.proposer.extend_row(row, [token])
            steps[row] = self._commit_row(r, [token], StepRecord(0, 1, 0, (), 0, 0.0, elapsed))
        return steps

    def _commit_row(self, r: _Row, tokens: list[int], record: StepRecord) -> Step:
        """Append a step's ``tokens`` to a row (cut at a stop token or its budget)."""
        new_tokens, finish_reason = _truncate(
            tokens, r.max_new_tokens - r.produced, r.stop_token_ids
        )
        if finish_reason is None and r.produced + len(new_tokens) >= r.max_new_tokens:
            finish_reason = "length"
        r.committed += new_tokens
        r.produced += len(new_tokens)
        record = replace(record, emitted=len(new_tokens), prefill_time=r.prefill_time)
        r.prefill_time = 0.0
        return Step(tuple(new_tokens), record, finish_reason)

    def _speculative_step(self, rows: list[int], tree: TokenTree | None) -> dict[int, Step]:
        """Propose ``tree`` (None: the proposer's own) for every row, verify every row's tree
        in one target forward (the other rows padded), commit."""
        assert self.proposer is not None
        clock, device, target = self._clock, self.target.device, self.target
        state = [self.rows[row] for row in rows]
        started = clock.mark()
        proposals = self.proposer.propose_rows(
            rows, [r.committed for r in state], [r.generator for r in state], tree
        )
        drafted = clock.mark()

        tree = proposals[0].tree
        verifiers = [
            self._verifier(tree, p.deterministic, r) for p, r in zip(proposals, state, strict=True)
        ]
        _, mask, offsets = verifiers[0]
        roots = to_device([[r.committed[-1]] for r in state], device)  # [b, 1]
        tokens = torch.cat([roots, torch.stack([p.tokens for p in proposals])], dim=1)  # [b, N+1]
        pending = to_device([len(r.committed) - 1 for r in state], device)  # [b]
        logits = self._target_logits(rows, tokens, pending[:, None] + offsets, mask)
        launched = [
            verifier.launch(p.tokens, row_logits, p.q, r.generator)
            for (verifier, _, _), p, r, row_logits in zip(
                verifiers, proposals, state, logits, strict=True
            )
        ]
        outcomes = [
            verifier.finish(fetched)
            for (verifier, _, _), fetched in zip(verifiers, _fetch(launched), strict=True)
        ]  # the step's host synchronisation

        keep = {
            row: [0, *(1 + a for a in result.accepted)]
            for row, (result, _) in zip(rows, outcomes, strict=True)
        }
        target.commit(keep_rows(self.max_batch, keep))
        committed = {
            row: (list(result.accepted), [*accepted_tokens, result.token])
            for row, (result, accepted_tokens) in zip(rows, outcomes, strict=True)
        }
        self.proposer.commit_rows(committed)
        ended = clock.mark()
        draft_time = clock.device_seconds(started, drafted)
        target_time = clock.host_seconds(started, ended) - draft_time
        steps = {}
        for row, r, p, (result, _) in zip(rows, state, proposals, outcomes, strict=True):
            accepted = len(result.accepted)
            flags = p.deterministic
            record = StepRecord(
                accepted=accepted,
                emitted=0,
                attempted=accepted + (0 if result.bonus else 1),
                ranks=result.ranks,
                tree_size=tree.num_nodes,
                accepted_context=sum(flags[a] for a in result.accepted) if flags else 0,
                draft_time=draft_time,
                target_time=target_time,
            )
            steps[row] = self._commit_row(r, committed[row][1], record)
        return steps

    def _target_logits(
        self, rows: list[int], tokens: Tensor, positions: Tensor, mask: Tensor
    ) -> list[Tensor]:
        """The target forward of the step's trees (``tokens`` / ``positions`` ``[b, N+1]``):
        each row's logits ``[N+1, V]`` cut to the common vocabulary."""
        logits = rows_forward(self.target, rows, tokens, positions, mask)  # [B, N+1, V']
        return [logits[row, :, : self.vocab_size] for row in rows]

    def _verifier(
        self, tree: TokenTree, deterministic: tuple[bool, ...] | None, row: _Row
    ) -> tuple[TreeVerifier, Tensor, Tensor]:
        """The verifier of ``tree`` (with its nodes' ``deterministic`` flags) under ``row``'s
        rule and target sampling, from the bounded cache (``VERIFIER_CACHE``)."""
        assert row.rule is not None
        key = (tree, deterministic, row.rule.name, row.spec.target)
        if key not in self._verifiers:
            self._verifiers[key] = _verifier(
                tree,
                row.rule,
                row.spec,
                self.target.device,
                self.device_verify,
                self.verify_dtype,
                self.vocab_size,
                deterministic,
            )
            if len(self._verifiers) > VERIFIER_CACHE:
                self._verifiers.popitem(last=False)
        self._verifiers.move_to_end(key)
        return self._verifiers[key]


def speculative_decode(
    target: Runtime,
    proposer: Proposer | BatchProposer,
    prompt_ids: list[int],
    spec: SpecConfig,
    *,
    vocab_size: int,
    stop_token_ids: frozenset[int] = frozenset(),
    device_verify: bool | None = None,
    verify_dtype: torch.dtype | None = None,
    budget: TreeBudget | None = None,
) -> Iterator[Step]:
    """Yield one ``Step`` per target forward until a stop token or ``max_new_tokens``: the
    ``BatchEngine`` with one row (``tree="none"``: run ``autoregressive_decode``). ``budget``:
    ``spec``'s tree is picked per step from the ladder and plain decoding (``mcsd.budget``;
    the acceptance estimate starts from its prior).

    ``vocab_size`` is the common vocabulary: logits are cut to it, so padding ids beyond the
    tokenizer are never sampled. ``device_verify``: verify every node at once on the device
    with one host transfer when the rule has a device verifier; ``None`` leaves the choice to
    the rule's record (greedy always; the sampled rules on CUDA). ``verify_dtype``: of the device
    verifiers' residual work (default float32 on CUDA, float64 elsewhere)."""
    if not spec.speculative:
        raise ValueError("tree 'none' is plain decoding: run autoregressive_decode")
    engine = BatchEngine(
        target,
        proposer,
        vocab_size=vocab_size,
        device_verify=device_verify,
        verify_dtype=verify_dtype,
        budget=budget,
    )
    yield from _one_row(engine, prompt_ids, spec, stop_token_ids)


def _fetch(launched: list) -> list:
    """Every row's launched verification brought to the host in one transfer: the device
    verifiers' tensors concatenated, copied once and split again (host walks pass through)."""
    tensors = [i for i, item in enumerate(launched) if isinstance(item, Tensor)]
    if len(tensors) < 2:
        return launched
    host = torch.cat([launched[i].flatten() for i in tensors]).cpu()  # the one synchronisation
    pieces = iter(host.split([launched[i].numel() for i in tensors]))
    fetched = list(launched)
    for i in tensors:
        fetched[i] = next(pieces).view(launched[i].shape)
    return fetched


class StepClock:
    """Times the parts of a step. A mark is the host time and, on CUDA, an event recorded on
    the stream (read after the step's one host synchronisation: no synchronisation of its own).
    The draft's share is its device time on CUDA (its kernels are queued, so a host clock would
    bill them to whatever waits for them next: the target), the host time elsewhere; the
    target's share is the rest of the step's wall time (forward, verification, commit)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> tuple[float, torch.cuda.Event | None]:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return time.perf_counter(), event

    def device_seconds(self, start, end) -> float:
        """Between two marks: device time on CUDA (both behind a synchronisation already)."""
        if self.cuda:
            return start[1].elapsed_time(end[1]) / 1e3
        return end[0] - start[0]

    @staticmethod
    def host_seconds(start, end) -> float:
        return end[0] - start[0]


def _verifier(
    tree: TokenTree,
    rule: Rule,
    spec: SpecConfig,
    device: torch.device,
    device_verify: bool | None,
    verify_dtype: torch.dtype | None,
    vocab_size: int,
    deterministic: tuple[bool, ...] | None,
) -> tuple[TreeVerifier, torch.Tensor, torch.Tensor]:
    """For one tree: its verifier, the target's tree mask ``[N+1, N+1]`` over [pending root,
    nodes] (everyone sees the root, nodes see their ancestors and themselves) and the position
    offsets ``[N+1]`` after the root."""
    if max(len(tree.children(u)) for u in (ROOT, *range(tree.num_nodes))) > vocab_size:
        raise ValueError(
            f"tree {tree.describe()} has more children per node than {vocab_size} tokens"
        )
    n = tree.num_nodes
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool, device=device)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask(device)
    offsets = torch.tensor([0, *tree.depth], device=device)
    verifier = tree_verifier(
        tree, rule, spec.target, device, device_verify, verify_dtype, deterministic
    )
    return verifier, mask, offsets


def autoregressive_decode(
    target: Runtime,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    max_new_tokens: int,
    *,
    vocab_size: int,
    stop_token_ids: frozenset[int] = frozenset(),
    seed: int | None = None,
) -> Iterator[Step]:
    """The target alone, one token per forward (the baseline ``ar`` of ``mcsd bench``): the
    ``BatchEngine``'s plain steps on one row, through the same runtime, warping and stopping as
    ``speculative_decode``."""
    spec = SpecConfig(tree="none", target=sampling, max_new_tokens=max_new_tokens, seed=seed)
    engine = BatchEngine(target, None, vocab_size=vocab_size)
    yield from _one_row(engine, prompt_ids, spec, stop_token_ids)


def _one_row(
    engine: BatchEngine, prompt_ids: list[int], spec: SpecConfig, stop_token_ids: frozenset[int]
) -> Iterator[Step]:
    """One row's steps through ``engine`` until it finishes; the row is removed even when the
    caller stops early."""
    row = engine.add(prompt_ids, spec, stop_token_ids=stop_token_ids)
    try:
        while row in engine.rows:
            yield engine.step()[row]
    finally:
        engine.remove(row)


def _prefill(model: Runtime, row: int, tokens: list[int]) -> None:
    """Empty ``row`` and read ``tokens`` into it, in a forward of its own."""
    reset_row(model, row)
    if not tokens:
        return
    device = model.device
    ids = to_device([tokens], device)  # [1, T]
    positions = torch.arange(len(tokens), device=device)[None]  # [1, T]
    mask = chain_mask(len(tokens), device=device)
    rows_forward(model, [row], ids, positions, mask, logits="none")
    model.commit(keep_rows(model.batch_size, {row: list(range(len(tokens)))}))


def _truncate(
    tokens: list[int], budget: int, stop_token_ids: frozenset[int]
) -> tuple[list[int], str | None]:
    """Cut ``tokens`` after the first stop token (kept, as Hugging Face does) or at ``budget``."""
    for i, token in enumerate(tokens[:budget]):
        if token in stop_token_ids:
            return tokens[: i + 1], "stop"
    if len(tokens) >= budget:
        return tokens[:budget], "length"
    return tokens, None


def _check_lengths(
    target: Runtime,
    proposer: Proposer | BatchProposer | None,
    prompt_ids: list[int],
    max_new_tokens: int,
    depth: int = 1,
) -> int:
    """Validate the prompt against the context limits (a step reaches ``depth`` positions past
    the pending token); return the usable max_new_tokens."""
    if not prompt_ids:
        raise ValueError("prompt must contain at least one token")
    limits = [m.max_context for m in (target, proposer) if m is not None]
    limits = [limit for limit in limits if limit is not None]
    if not limits:
        return max_new_tokens
    context = min(limits)
    if len(prompt_ids) >= context:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens, at or beyond the model context of {context}"
        )
    # Each step needs positions up to (committed - 1) + max_depth.
    room = context - len(prompt_ids) - depth
    if room < 1:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens leaves no room for tree depth {depth} "
            f"within the model context of {context}"
        )
    return min(max_new_tokens, room)
