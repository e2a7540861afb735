"""What ``mcsd bench`` compares: mcsd's trees and the baselines a user would otherwise run.

Method names (``parse_method``):

- ``hf-ar``            the target alone through transformers ``generate`` (the speed reference);
- ``hf-assisted``      transformers assisted generation with the same draft, its default settings
                       (``num_assistant_tokens=20``, confidence threshold 0.4);
- ``hf-assisted:N``    the same with ``num_assistant_tokens=N``;
- ``hf-static``        the target alone through ``generate`` with a transformers ``StaticCache``,
                       which transformers compiles on GPUs: its fastest decoding of one model;
- ``llama-ar``         the target alone through llama.cpp's own loop and sampler (the llama.cpp
                       runtime only): what a llama.cpp user runs;
- ``llama-spec[:N[:P]]`` llama.cpp's draft-model speculative decoding ("draft-simple": a greedy
                       draft chain of up to N tokens, default 3, cut where the draft's top
                       probability falls below P, default 0), re-implemented through the same
                       bindings (``mcsd.models.llamacpp_baselines``; llama.cpp runtime only);
- ``ar``               mcsd's target alone (``autoregressive_decode``: same adapter, no draft);
- ``sps:G``            an mcsd chain of depth G (rule ``sps`` when sampling, ``greedy`` when not);
- ``tree:K[:RULE]``    an mcsd k-config tree such as ``tree:4,2,2:mcss-wor`` (default rule: the
                       natural one, see ``SpecConfig``); K may also be a JSON list of sibling-rank
                       paths, ``tree:[[0],[1],[0,0]]`` (what ``mcsd bench --sweep`` prints);
- ``ctx[:NODES]``      mcsd's context proposer alone (``mcsd.draft.context``: continuations
                       copied from the prompt and the output, no draft forward), a tree of at
                       most NODES nodes (default ``ContextConfig.max_nodes``);
- ``mixed:K[:RULE]``   the draft's tree K and the context's tree in one tree
                       (``mcsd.draft.mixed``), e.g. ``mixed:4,2,2``;
- ``hf-pld[:N]``       transformers' prompt lookup decoding (``prompt_lookup_num_tokens`` N,
                       default ``hf_baselines.PROMPT_LOOKUP_TOKENS``), no draft model.

An mcsd method may end in modifiers that make its draft cheaper (``mcsd.models.cheap``;
still lossless): ``+int8`` (int8 weights, CPU) and ``+fr=K`` (the draft scores only the K most
frequent tokens, FR-Spec; ``K`` also as ``32k``), e.g. ``sps:5+int8`` or ``tree:2,1,1+int8+fr=32k``.
A static ``sps`` / ``tree`` method may end in ``+adaptive``: each step grows its tree, a smaller
prefix of it or none, from the measured step cost and the acceptance seen so far (``mcsd.budget``).

Every method turns prompt token ids into a ``Generation``: the new tokens, the wall time and one
``StepRecord`` per target forward, so one set of metrics (``mcsd.stats.Stats``) covers them all.
transformers' own loops run in ``mcsd.models.hf_baselines`` (observed, not modified).
"""

from __future__ import annotations

import json
import time
from dataclasses import KW_ONLY, dataclass, replace

from mcsd.api import ModelPair
from mcsd.config import DEFAULT_MAX_TREE_NODES, DYNAMIC_PREFIX, DynamicTreeConfig, SpecConfig
from mcsd.draft.proposer import Drafter
from mcsd.engine import autoregressive_decode, speculative_decode
from mcsd.stats import StepRecord
from mcsd.verify.rules import RULE_NAMES, get_rule

BASELINES = ("hf-ar", "hf-static", "hf-assisted", "hf-pld", "llama-ar", "llama-spec", "ar")
MCSD_KINDS = ("sps", "tree", "ctx", "mixed")
PROPOSER_OF_KIND = {"sps": "model", "tree": "model", "ctx": "context", "mixed": "mixed"}
HF_KINDS = {"hf-ar": "generate", "hf-static": "static", "hf-assisted": "assisted", "hf-pld": "pld"}
LLAMA_KINDS = ("llama-ar", "llama-spec")


@dataclass(frozen=True)
class Method:
    """One decoding method of a benchmark run."""

    name: str  # as written on the command line, e.g. "tree:4,2,2:mcss-wor"
    kind: str  # one of BASELINES, "sps" or "tree"
    _: KW_ONLY  # the fields below are passed by name
    tree: str | None = None  # k-config ("1,1,1,1") or JSON rank paths ("[[0],[1],[0,0]]")
    rule: str | None = None  # verification rule; None = SpecConfig's natural choice
    assistant_tokens: int | None = None  # hf-assisted's num_assistant_tokens; None = its default
    draft_vocab: int | None = None  # mcsd methods: the draft scores only this many tokens
    draft_int8: bool = False  # mcsd methods: the draft's linear layers in int8
    draft_max: int | None = None  # llama-spec: longest draft chain; None = llama.cpp's default
    draft_p_min: float | None = None  # llama-spec: draft confidence cut; None = llama.cpp's
    context_nodes: int | None = None  # ctx: the context tree's node budget; None = the default
    lookup_tokens: int | None = None  # hf-pld: prompt_lookup_num_tokens; None = the default
    adaptive: bool = False  # sps / tree: the tree budget picks each step's tree (mcsd.budget)

    @property
    def is_mcsd(self) -> bool:
        return self.kind in MCSD_KINDS

    @property
    def proposer(self) -> str | None:
        """``SpecConfig.proposer`` of an mcsd method, else None."""
        return PROPOSER_OF_KIND.get(self.kind)

    @property
    def uses_draft(self) -> bool:
        """The method runs the draft model (cheap-draft modifiers apply to it)."""
        return self.kind not in ("ctx", "hf-pld", "hf-ar", "hf-static", "ar", "llama-ar")

    @property
    def static_tree(self) -> bool:
        """An ``sps`` / ``tree`` method with a fixed tree (not dynamic): what ``+adaptive``
        can shrink."""
        return self.kind in ("sps", "tree") and not str(self.tree).startswith(DYNAMIC_PREFIX)

    def spec(self, base: SpecConfig) -> SpecConfig:
        """``base`` (sampling, lengths, seed) with this method's tree, rule and proposer."""
        if not self.is_mcsd:
            return replace(base, tree=(1,), rule=None, proposer="model")
        context = base.context
        if self.context_nodes is not None:
            context = replace(context, max_nodes=self.context_nodes)
        return replace(
            base,
            tree=parse_tree(self.tree or "1"),
            rule=self.rule,
            proposer=self.proposer,
            context=context,
        )

    def describe(self, base: SpecConfig) -> str:
        if not self.is_mcsd:
            return self.name
        spec = self.spec(base)
        if self.kind == "ctx":
            return f"{self.name} (<= {spec.context.max_nodes} nodes, {spec.resolved_rule()})"
        extra = f" + <= {spec.context.max_nodes} context" if self.kind == "mixed" else ""
        return f"{self.name} ({spec.tree_nodes}{extra} nodes, {spec.resolved_rule()})"


def parse_method(text: str) -> Method:
    """A ``Method`` from its command-line name; ``ValueError`` naming the accepted forms."""
    name = text.strip()
    body, *modifiers = name.split("+")
    if modifiers:
        method = replace(parse_method(body), name=name)
        for modifier in modifiers:
            key, _, value = modifier.partition("=")
            if key == "adaptive":
                if value or not method.static_tree:
                    raise ValueError(
                        f"method {name!r}: +adaptive goes on sps:G and tree:K-CONFIG methods "
                        "(a static tree the budget can shrink)"
                    )
                method = replace(method, adaptive=True)
                continue
            bad = key not in ("fr", "int8") or (key == "int8" and bool(value))
            if not method.is_mcsd or not method.uses_draft or bad:
                raise ValueError(
                    f"method {name!r}: modifiers are +int8 and +fr=K, on sps/tree/mixed methods, "
                    "and +adaptive on sps/tree methods"
                )
            if key == "int8":
                method = replace(method, draft_int8=True)
            else:
                method = replace(method, draft_vocab=parse_count(value, name))
        return method
    kind, _, rest = name.partition(":")
    if kind in ("hf-ar", "hf-static", "ar", "llama-ar") and not rest:
        return Method(name, kind)
    if kind == "llama-spec":
        return _llama_spec(name, rest)
    if kind == "hf-pld":
        if not rest:
            return Method(name, kind)
        if rest.isdigit() and int(rest) >= 1:
            return Method(name, kind, lookup_tokens=int(rest))
        raise ValueError(f"method {name!r}: hf-pld:N needs an integer N >= 1")
    if kind == "ctx":
        if not rest:
            return Method(name, kind)
        if rest.isdigit() and 1 <= int(rest) <= DEFAULT_MAX_TREE_NODES:
            return Method(name, kind, context_nodes=int(rest))
        raise ValueError(
            f"method {name!r}: ctx:NODES needs a node budget in 1..{DEFAULT_MAX_TREE_NODES}"
        )
    if kind == "hf-assisted":
        if not rest:
            return Method(name, kind)
        if rest.isdigit() and int(rest) >= 1:
            return Method(name, kind, assistant_tokens=int(rest))
        raise ValueError(f"method {name!r}: hf-assisted:N needs an integer N >= 1")
    if kind == "sps":
        if rest.isdigit() and 1 <= int(rest) <= 64:
            return Method(name, kind, tree=",".join(["1"] * int(rest)))
        raise ValueError(f"method {name!r}: sps:G needs a depth G in 1..64, e.g. sps:4")
    if kind == DYNAMIC_PREFIX and rest:
        DynamicTreeConfig.parse(name)  # a bad budget fails here, clearly
        return Method(name, "tree", tree=name)
    if kind in ("tree", "mixed") and rest:
        shape, _, rule = rest.partition(":")
        if rule and rule not in RULE_NAMES:
            raise ValueError(f"method {name!r}: rule must be one of {', '.join(RULE_NAMES)}")
        if kind == "mixed" and rule and get_rule(rule).mixed_trees is None:
            raise ValueError(f"method {name!r}: rule {rule!r} cannot verify mixed trees")
        SpecConfig(tree=parse_tree(shape), rule=None)  # a bad shape fails here, clearly
        return Method(name, kind, tree=shape, rule=rule or None)
    raise ValueError(
        f"unknown method {name!r}; use hf-ar, hf-static, hf-assisted, hf-assisted:N, hf-pld, "
        "hf-pld:N, llama-ar, llama-spec, llama-spec:N, llama-spec:N:P, ar, sps:G, tree:K-CONFIG, "
        "tree:K-CONFIG:RULE (e.g. tree:4,2,2:mcss-wor), dynamic:BUDGET[:WIDTH[:DEPTH]], ctx, "
        "ctx:NODES or mixed:K-CONFIG[:RULE]"
    )


def _llama_spec(name: str, rest: str) -> Method:
    """``llama-spec``, ``llama-spec:N`` or ``llama-spec:N:P``."""
    if not rest:
        return Method(name, "llama-spec")
    n, _, p = rest.partition(":")
    problem = f"method {name!r}: llama-spec:N[:P] needs a draft length N in 1..64 and P in [0, 1]"
    if not n.isdigit() or not 1 <= int(n) <= 64:
        raise ValueError(problem)
    p_min = None
    if p:
        try:
            p_min = float(p)
        except ValueError:
            raise ValueError(problem) from None
        if not 0.0 <= p_min <= 1.0:
            raise ValueError(problem)
    return Method(name, "llama-spec", draft_max=int(n), draft_p_min=p_min)


def parse_count(text: str, name: str) -> int:
    """``32768`` or ``32k`` (= 32768)."""
    scale = 1024 if text.lower().endswith("k") else 1
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"method {name!r}: +fr=K needs a token count like 32768 or 32k")
    return int(digits) * scale


def parse_tree(shape: str) -> str | list:
    """A k-config string as is, or the rank paths of a JSON list."""
    if not shape.lstrip().startswith("["):
        return shape
    try:
        paths = json.loads(shape)
    except json.JSONDecodeError as error:
        raise ValueError(f"tree {shape!r} is not a JSON list of rank paths: {error.msg}") from None
    if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
        raise ValueError(f"tree {shape!r} must be a list of paths like [[0],[1],[0,0]]")
    return paths


@dataclass(kw_only=True)
class Generation:
    """One answer produced by one method."""

    tokens: list[int]  # new tokens (after the prompt)
    wall_time: float  # seconds, prefill included
    records: list[StepRecord]  # one per target forward while decoding
    finish_reason: str


def run_method(
    method: Method, pair: ModelPair, prompt_ids: list[int], base: SpecConfig
) -> Generation:
    """Generate one answer to ``prompt_ids`` with ``method``; sampling, length and seed from
    ``base`` (its tree and rule are ignored except for mcsd methods)."""
    stop = frozenset(base.stop_token_ids if base.stop_token_ids is not None else pair.eos_token_ids)
    if method.kind in HF_KINDS:
        from mcsd.models import hf_baselines

        tokens, wall, records = hf_baselines.run(
            HF_KINDS[method.kind],
            pair.target,
            pair.draft,
            prompt_ids,
            base.target,
            stop,
            base.max_new_tokens,
            seed=base.seed,
            assistant_tokens=method.assistant_tokens,
            lookup_tokens=method.lookup_tokens,
        )
        finish = "stop" if tokens and tokens[-1] in stop else "length"
        return Generation(tokens=tokens, wall_time=wall, records=records, finish_reason=finish)
    if method.kind in LLAMA_KINDS:
        from mcsd.models import llamacpp_baselines as llama

        options = dict(vocab_size=pair.vocab_size, seed=base.seed)
        if method.kind == "llama-ar":
            tokens, wall, records = llama.autoregressive(
                pair.target, prompt_ids, base.target, stop, base.max_new_tokens, **options
            )
        else:
            tokens, wall, records = llama.speculative(
                pair.target,
                pair.draft,
                prompt_ids,
                base.target,
                stop,
                base.max_new_tokens,
                n_max=method.draft_max or llama.DRAFT_MAX,
                p_min=llama.DRAFT_P_MIN if method.draft_p_min is None else method.draft_p_min,
                **options,
            )
        finish = "stop" if tokens and tokens[-1] in stop else "length"
        return Generation(tokens=tokens, wall_time=wall, records=records, finish_reason=finish)
    tokens: list[int] = []
    records: list[StepRecord] = []
    finish = "length"
    started = time.perf_counter()
    spec = method.spec(base)
    if method.kind == "ar" or not spec.speculative:
        steps = autoregressive_decode(
            pair.target,
            prompt_ids,
            base.target,
            base.max_new_tokens,
            vocab_size=pair.vocab_size,
            stop_token_ids=stop,
            seed=base.seed,
        )
    else:
        steps = speculative_decode(
            pair.target,
            Drafter(pair.draft, vocab_size=pair.vocab_size, device=pair.target.device),
            prompt_ids,
            spec,
            vocab_size=pair.vocab_size,
            stop_token_ids=stop,
            budget=pair.tree_budget(spec.token_tree()) if method.adaptive else None,
        )
    for step in steps:
        tokens += step.tokens
        records.append(step.record)
        finish = step.finish_reason or finish
    return Generation(
        tokens=tokens,
        wall_time=time.perf_counter() - started,
        records=records,
        finish_reason=finish,
    )
