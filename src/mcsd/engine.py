"""The engine (DESIGN section 1): requests in, one speculative step of every running row at a
time, out their steps.

``add_request`` resolves a request's spec once (``mcsd.plan.resolve``), checks it against the
models' contexts and queues it (``mcsd.request.Request``); ``step`` admits waiting requests into
free rows (each prompt read in a forward of its own), then runs one step of every running row:

1. PROPOSE  the proposer (``mcsd.draft.base.Proposer``) builds each speculating row's tree below
            its pending token, whatever its plan (a static, dynamic, context or mixed tree): node
            tokens, and the q each node's children were drawn from.
2. VERIFY   one target forward over every speculating row's [pending, nodes...] (trees of
            different shapes padded into one ``[b, M, M]`` block, padding seeing only itself:
            a 64-token forward of the fast runtime costs 1.06-1.13x a one-token one on the
            H200, docs/benchmarks.md, so padding costs a few percent where a forward per
            shape would cost a whole forward) gives p for every node; each row's rule
            verifier (``mcsd.verify.rules.tree_verifier``) accepts a path and draws the
            correction or bonus token, with one host synchronisation for all rows.
3. COMMIT   the target keeps each row's pending token and accepted path, the proposer commits
            the step; a row stops at a stop token or its ``max_new_tokens`` without overshooting,
            and its row is free for the next waiting request.

Rows that do not speculate (``tree="none"``, or a row an adaptive budget decodes plainly this
step) share one plain forward. Invariants between steps (``committed`` = prompt + generated
tokens): the target's committed cache of a row holds ``committed[:-1]``; the last token is
*pending* (position ``L - 1``).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mcsd.budget import AdaptiveTree, TreeBudget, computed_rows
from mcsd.config import VERIFIER_CACHE, SamplingConfig, SpecConfig
from mcsd.draft.base import Proposal, Proposer, RowStep
from mcsd.errors import ParamError
from mcsd.models.base import Runtime, chain_mask, keep_rows, reset_row, rows_forward, to_device
from mcsd.plan import Plan, resolve
from mcsd.request import Request
from mcsd.sampling import draw_children, warp
from mcsd.stats import StepRecord
from mcsd.tree import ROOT, TokenTree
from mcsd.verify.rules import TreeVerifier, tree_verifier


@dataclass(frozen=True)
class Step:
    tokens: tuple[int, ...]  # tokens committed by this step
    record: StepRecord
    finish_reason: str | None  # "stop" (a stop token), "length", or None (not finished)


class Engine:
    """Speculative decoding of requests in the rows of ``target`` (continuous batching; see the
    module docstring). ``proposer``: builds every speculating row's tree (``mcsd.draft.proposer.
    Drafter``; None: plain decoding only). ``budget`` (``mcsd.budget.TreeBudget``): the rows whose
    plan grows the budget's tree with the draft model grow, each step, the tree an
    ``AdaptiveTree`` picks for the rows the forward computes (``mcsd.budget.computed_rows``) and
    the acceptance seen so far, down to plain decoding with a re-probe now and then; the choice
    is made before the step draws anything, so it stays lossless. Each request draws from its
    own seeded generator in the order a batch of one would, so its output does not depend on
    the rows beside it (under a budget: but through the tree it is given, which follows every
    row's past acceptance). ``speculative_decode`` is this engine with one request."""

    def __init__(
        self,
        target: Runtime,
        proposer: Proposer | None,
        *,
        vocab_size: int,
        device_verify: bool | None = None,
        verify_dtype: torch.dtype | None = None,
        budget: TreeBudget | None = None,
    ) -> None:
        if proposer is not None and proposer.batch_size not in (None, target.batch_size):
            raise ValueError(
                f"proposer holds {proposer.batch_size} rows and the target "
                f"{target.batch_size}: build both with the same batch_size"
            )
        self.target = target
        self.proposer = proposer
        self.budget = budget
        self.adaptive = None if budget is None else AdaptiveTree(budget)  # learns the acceptance
        self.vocab_size = vocab_size
        self.device_verify, self.verify_dtype = device_verify, verify_dtype
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # row -> its request
        # per (tree shape, deterministic flags, rule, target sampling), least recently used
        # first: dynamic and context trees have a new shape most steps
        self._verifiers: OrderedDict[tuple, tuple[TreeVerifier, Tensor, Tensor]] = OrderedDict()
        self._clock = StepClock(target.device)

    @property
    def max_batch(self) -> int:
        return self.target.batch_size

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def free_rows(self) -> list[int]:
        return [row for row in range(self.max_batch) if row not in self.running]

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_ids: Sequence[int],
        spec: SpecConfig,
        *,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> Request:
        """Queue a request (it joins a free row at the next ``step``). Everything about it is
        checked here: a bad spec or a prompt beyond the context raises ``ValueError`` now."""
        plan = resolve(spec)
        limits = [self.target.max_context]
        if plan.speculative:
            if self.proposer is None:
                raise ParamError(
                    f"tree {spec.describe_tree()} needs a proposer: this engine decodes plainly "
                    "only (tree 'none')",
                    param="tree",
                    allowed="none",
                )
            self.proposer.check(plan)
            limits.append(self.proposer.max_context(plan))
        if plan.tree is not None and plan.tree.max_children > self.vocab_size:
            raise ParamError(
                f"tree {plan.tree.describe()} has more children per node than {self.vocab_size} "
                "tokens",
                param="tree",
            )
        prompt_ids = list(prompt_ids)
        usable = _check_lengths(prompt_ids, spec.max_new_tokens, plan.max_depth, limits)
        generator = torch.Generator(self.target.device)
        generator.manual_seed(spec.seed if spec.seed is not None else int(torch.seed()))
        request = Request(
            prompt_ids=prompt_ids,
            spec=spec,
            plan=plan,
            stop_token_ids=stop_token_ids,
            max_new_tokens=usable,
            generator=generator,
            committed=list(prompt_ids),
        )
        self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        """End ``request`` (between steps): forgotten if it waits, its row freed if it runs."""
        if request.finish_reason is not None:
            return
        if request.row is None:
            self.waiting.remove(request)
        else:
            self._free(request)
        request.finish_reason = "abort"

    def _admit(self) -> None:
        """Waiting requests into free rows, first come first served: each prompt is read into
        the target in a forward of its own (the draft reads it when it first drafts)."""
        free = self.free_rows()
        while self.waiting and free:
            request = self.waiting.popleft()
            request.row = free.pop(0)
            started = self._clock.mark()
            self.running[request.row] = request
            _prefill(self.target, request.row, request.prompt_ids[:-1])
            if request.plan.speculative:
                assert self.proposer is not None
                self.proposer.start(request)
            request.prefill_time = self._clock.host_seconds(started, self._clock.mark())

    def _free(self, request: Request) -> None:
        assert request.row is not None
        del self.running[request.row]
        reset_row(self.target, request.row)
        if request.cursor is not None and self.proposer is not None:
            self.proposer.remove(request)
        request.row = None

    # ------------------------------------------------------------------ steps
    def step(self) -> list[tuple[Request, Step]]:
        """Admit what waits into free rows, then one step of every running request
        (speculative, or plain for those that do not speculate); finished requests free their
        rows. Returns each stepped request with its step, in row order."""
        self._admit()
        requests = [self.running[row] for row in sorted(self.running)]
        trees = self._trees(requests)
        speculative = [r for r in requests if trees.get(id(r), r.plan.rule) is not None]
        plain = [r for r in requests if trees.get(id(r), r.plan.rule) is None]
        steps: dict[int, Step] = {}
        if speculative:
            steps |= self._speculative_step(speculative, [trees.get(id(r)) for r in speculative])
        if plain:
            steps |= self._plain_step(plain)
        done = [(r, steps[id(r)]) for r in requests]
        for request, step in done:
            if step.finish_reason is not None:
                self._free(request)
                request.finish_reason = step.finish_reason
        return done

    def _trees(self, requests: list[Request]) -> dict[int, TokenTree | None]:
        """The adaptive budget's choice for the requests growing its tree (by ``id``): a tree
        for this step, or None (plain decoding); other requests are not listed."""
        if self.adaptive is None:
            return {}
        assert self.budget is not None
        budgeted = [r for r in requests if _budgeted(r.plan, self.budget.tree)]
        if not budgeted:
            return {}
        chosen = self.adaptive.choose(computed_rows(self.target, [r.row for r in budgeted]))
        return {id(r): chosen for r in budgeted}

    def _plain_step(self, requests: list[Request]) -> dict[int, Step]:
        """The target alone: one forward of every row's pending token, one token drawn per row
        from its warped p (its argmax when greedy), one host transfer."""
        started = time.perf_counter()
        device, target = self.target.device, self.target
        rows = [r.row for r in requests]
        tokens = to_device([[r.committed[-1], len(r.committed) - 1] for r in requests], device)
        logits = rows_forward(
            target, rows, tokens[:, :1], tokens[:, 1:], chain_mask(1, device=device), logits="last"
        )  # [B, 1, V']
        target.commit(keep_rows(self.max_batch, {row: [0] for row in rows}))
        draws = []
        for r in requests:
            row_logits = logits[r.row, -1, : self.vocab_size]  # [V]
            if r.plan.target.greedy:  # argmax of the one-hot p is the argmax of the logits
                draws.append(row_logits.argmax()[None])
            else:
                p = warp(row_logits, r.plan.target)
                draws.append(draw_children(p[None], 1, replacement=True, generator=r.generator)[0])
        drawn = torch.cat(draws).tolist()  # the step's host synchronisation
        elapsed = time.perf_counter() - started
        steps = {}
        for r, token in zip(requests, drawn, strict=True):
            if r.cursor is not None:  # a speculating request decoded plainly this step
                assert self.proposer is not None
                self.proposer.extend(r, [token])
            record = StepRecord(
                accepted=0,
                emitted=1,
                attempted=0,
                ranks=(),
                tree_size=0,
                draft_time=0.0,
                target_time=elapsed,
            )
            steps[id(r)] = _commit(r, [token], record)
        return steps

    def _speculative_step(
        self, requests: list[Request], trees: list[TokenTree | None]
    ) -> dict[int, Step]:
        """Propose every request's tree (``trees[i]``: the budget's choice, None: its plan's
        own), verify them all in one target forward, commit."""
        assert self.proposer is not None
        clock = self._clock
        started = clock.mark()
        proposals = self.proposer.propose(requests, trees)
        drafted = clock.mark()
        verifiers = [
            self._verifier(p.tree, p.deterministic, r)
            for p, r in zip(proposals, requests, strict=True)
        ]
        logits = self._target_logits(requests, proposals, verifiers)
        launched = [
            verifier.launch(p.tokens, row_logits, p.q, r.generator)
            for (verifier, _, _), p, r, row_logits in zip(
                verifiers, proposals, requests, logits, strict=True
            )
        ]
        outcomes = [
            verifier.finish(fetched)
            for (verifier, _, _), fetched in zip(verifiers, _fetch(launched), strict=True)
        ]  # the step's host synchronisation
        keep = {
            r.row: [0, *(1 + a for a in result.accepted)]
            for r, (result, _) in zip(requests, outcomes, strict=True)
        }
        self.target.commit(keep_rows(self.max_batch, keep))
        row_steps = [
            RowStep(accepted=list(result.accepted), tokens=[*accepted_tokens, result.token])
            for result, accepted_tokens in outcomes
        ]
        self.proposer.commit(requests, row_steps)
        ended = clock.mark()
        draft_time = clock.device_seconds(started, drafted)
        target_time = clock.host_seconds(started, ended) - draft_time
        steps = {}
        for r, p, (result, _), row_step in zip(
            requests, proposals, outcomes, row_steps, strict=True
        ):
            accepted = len(result.accepted)
            flags = p.deterministic
            record = StepRecord(
                accepted=accepted,
                emitted=0,
                attempted=accepted + (0 if result.bonus else 1),
                ranks=result.ranks,
                tree_size=p.tree.num_nodes,
                accepted_context=sum(flags[a] for a in result.accepted) if flags else 0,
                draft_time=draft_time,
                target_time=target_time,
            )
            steps[id(r)] = _commit(r, list(row_step.tokens), record)
        if self.adaptive is not None and self.budget is not None:
            ranks = [
                steps[id(r)].record.ranks
                for r, tree in zip(requests, trees, strict=True)
                if tree is not None
            ]
            chosen = next((tree for tree in trees if tree is not None), None)
            if chosen is not None:
                self.adaptive.observe(chosen, ranks)
        return steps

    def _target_logits(
        self,
        requests: list[Request],
        proposals: list[Proposal],
        verifiers: list[tuple[TreeVerifier, Tensor, Tensor]],
    ) -> list[Tensor]:
        """The target forward of every request's tree, ``[pending, nodes...]``: trees of
        different sizes are padded to the largest (``M`` tokens; a padding entry sees only itself
        and nobody sees it). Each request's logits ``[N+1, V]``, cut to the common vocabulary."""
        device = self.target.device
        sizes = [p.tree.num_nodes + 1 for p in proposals]
        m = max(sizes)
        pending = to_device([len(r.committed) - 1 for r in requests], device)  # [b]
        roots = to_device([[r.committed[-1]] for r in requests], device)  # [b, 1]
        if all(size == m for size in sizes):  # one tree shape: one mask for every row
            _, mask, offsets = verifiers[0]
            tokens = torch.cat([roots, torch.stack([p.tokens for p in proposals])], dim=1)
            positions = pending[:, None] + offsets  # [b, M]
        else:
            b = len(requests)
            tokens = torch.zeros(b, m, dtype=torch.long, device=device)  # [b, M]
            offsets_all = torch.zeros(b, m, dtype=torch.long, device=device)  # [b, M]
            mask = torch.eye(m, dtype=torch.bool, device=device).repeat(b, 1, 1)  # [b, M, M]
            for i, (p, (_, tree_mask, offsets), size) in enumerate(
                zip(proposals, verifiers, sizes, strict=True)
            ):
                tokens[i, 0] = roots[i, 0]
                tokens[i, 1:size] = p.tokens
                offsets_all[i, :size] = offsets
                mask[i, :size, :size] = tree_mask
            positions = pending[:, None] + offsets_all  # [b, M]
        rows = [r.row for r in requests]
        logits = rows_forward(self.target, rows, tokens, positions, mask)  # [B, M, V']
        return [
            logits[r.row, :size, : self.vocab_size] for r, size in zip(requests, sizes, strict=True)
        ]

    def _verifier(
        self, tree: TokenTree, deterministic: tuple[bool, ...] | None, request: Request
    ) -> tuple[TreeVerifier, Tensor, Tensor]:
        """The verifier of ``tree`` (with its nodes' ``deterministic`` flags) under the
        request's rule and target sampling, from the bounded cache (``VERIFIER_CACHE``)."""
        plan = request.plan
        assert plan.rule is not None
        key = (tree, deterministic, plan.rule.name, plan.target)
        if key not in self._verifiers:
            self._verifiers[key] = _verifier(
                tree,
                plan,
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


def _budgeted(plan: Plan, tree: TokenTree) -> bool:
    """A request whose steps the adaptive budget picks: the draft model's static budget tree."""
    return plan.proposer == "model" and plan.tree == tree


def _commit(request: Request, tokens: list[int], record: StepRecord) -> Step:
    """Append a step's ``tokens`` to a request (cut at a stop token or its budget)."""
    new_tokens, finish_reason = _truncate(
        tokens, request.max_new_tokens - request.produced, request.stop_token_ids
    )
    if finish_reason is None and request.produced + len(new_tokens) >= request.max_new_tokens:
        finish_reason = "length"
    request.committed += new_tokens
    request.produced += len(new_tokens)
    record = replace(record, emitted=len(new_tokens), prefill_time=request.prefill_time)
    request.prefill_time = 0.0
    request.stats.add(record)
    return Step(tuple(new_tokens), record, finish_reason)


def speculative_decode(
    target: Runtime,
    proposer: Proposer,
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
    ``Engine`` with one request (``tree="none"``: run ``autoregressive_decode``).
    ``budget``: ``spec``'s tree is picked per step from the ladder and plain decoding
    (``mcsd.budget``; the acceptance estimate starts from its prior).

    ``vocab_size`` is the common vocabulary: logits are cut to it, so padding ids beyond the
    tokenizer are never sampled. ``device_verify``: verify every node at once on the device
    with one host transfer when the rule has a device verifier; ``None`` leaves the choice to
    the rule's record (greedy always; the sampled rules on CUDA). ``verify_dtype``: of the device
    verifiers' residual work (default float32 on CUDA, float64 elsewhere)."""
    if not spec.speculative:
        raise ValueError("tree 'none' is plain decoding: run autoregressive_decode")
    engine = Engine(
        target,
        proposer,
        vocab_size=vocab_size,
        device_verify=device_verify,
        verify_dtype=verify_dtype,
        budget=budget,
    )
    yield from _one_request(engine, prompt_ids, spec, stop_token_ids)


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
    plan: Plan,
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
    assert plan.rule is not None
    verifier = tree_verifier(
        tree, plan.rule, plan.target, device, device_verify, verify_dtype, deterministic
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
    ``Engine``'s plain steps on one row, through the same runtime, warping and stopping as
    ``speculative_decode``."""
    spec = SpecConfig(tree="none", target=sampling, max_new_tokens=max_new_tokens, seed=seed)
    engine = Engine(target, None, vocab_size=vocab_size)
    yield from _one_request(engine, prompt_ids, spec, stop_token_ids)


def _one_request(
    engine: Engine, prompt_ids: list[int], spec: SpecConfig, stop_token_ids: frozenset[int]
) -> Iterator[Step]:
    """One request's steps through ``engine`` until it finishes; it is aborted (its row freed)
    even when the caller stops early."""
    request = engine.add_request(prompt_ids, spec, stop_token_ids=stop_token_ids)
    try:
        while request.finish_reason is None:
            for stepped, step in engine.step():
                if stepped is request:
                    yield step
    finally:
        engine.abort(request)


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
    prompt_ids: list[int], max_new_tokens: int, depth: int, limits: list[int | None]
) -> int:
    """Validate the prompt against the context ``limits`` (the target's, and the proposer's
    for a speculating request; a step reaches ``depth`` positions past the pending token);
    return the usable max_new_tokens."""
    if not prompt_ids:
        raise ParamError("prompt must contain at least one token", param="prompt")
    known = [limit for limit in limits if limit is not None]
    if not known:
        return max_new_tokens
    context = min(known)
    if len(prompt_ids) >= context:
        raise ParamError(
            f"prompt has {len(prompt_ids)} tokens, at or beyond the model context of {context}",
            param="prompt",
        )
    # Each step needs positions up to (committed - 1) + max_depth.
    room = context - len(prompt_ids) - depth
    if room < 1:
        raise ParamError(
            f"prompt of {len(prompt_ids)} tokens leaves no room for tree depth {depth} "
            f"within the model context of {context}",
            param="prompt",
        )
    return min(max_new_tokens, room)
