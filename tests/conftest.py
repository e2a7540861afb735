"""Fixtures and builders shared by several test files (import the builders with
``from conftest import ...``; pytest puts this directory on ``sys.path``).

- ``tiny_causal_lm``: a tiny random transformers causal LM (Qwen2 or Llama), with a sharpened
  head so that greedy argmaxes are far from ties;
- ``save_tiny_lm``: the same, saved with a tokenizer into a directory ``load_pair`` can load;
- ``greedy_reference``: transformers' own greedy ``generate()``, the reference mcsd must match;
- ``spec_decode``: the tokens of one speculative generation through the engine, with the
  draft-model proposer;
- ``cpu_dtype``: ``"bfloat16"`` where this CPU computes it natively, else ``"float32"`` (for
  tests that do not need bf16 itself: emulated bf16 is several times slower than float32).

Under pytest-xdist (``-n 2``, README command 2 and ``.ci/run``) each worker runs torch on one
thread, so that N workers fill N cores without oversubscribing them (a statistical tree walk took
40 s at torch's default two threads on a busy 2-core machine, 5 s on one); tests that must share a
worker (one module fixture that is expensive to build, a process group) carry an
``xdist_group`` mark, which ``--dist loadgroup`` (pyproject.toml) honours.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

ARCHITECTURES = ("qwen2", "llama")
DTYPE_ENV = "MCSD_TEST_DTYPE"  # "float32": run as on a CPU without native bf16 (Zen 1, ...)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # processes the tests start: servers, TP ranks

if os.environ.get(DTYPE_ENV) == "float32":
    # mcsd's own "auto" dtype (models.factory.default_dtype) asks torch; say no there too
    torch.cpu._is_avx512_bf16_supported = lambda: False
elif os.environ.get(DTYPE_ENV, "") not in ("", "auto"):
    raise pytest.UsageError(f"{DTYPE_ENV} must be float32 or auto, got {os.environ[DTYPE_ENV]!r}")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make ``--dist loadgroup`` group again under pytest 9.2: pytest-xdist (3.8, the newest)
    marks a grouped test by appending ``@group`` to ``item._nodeid``, which pytest 9.2 no longer
    reads (``nodeid`` comes from ``item._id``), so every group was spread over the workers.
    Nothing to do where the two agree (pytest 8, or a fixed xdist)."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers only
        return
    for item in items:
        grouped = getattr(item, "_nodeid", None)
        if grouped is not None and grouped != item.nodeid:
            from _pytest.nodes import coerce_node_id  # pytest 9.2's node id parser

            item._id = coerce_node_id(grouped)


def cpu_dtype() -> str:
    """``"bfloat16"`` where this CPU computes it natively (AVX-512 BF16 or AMX: mcsd's own
    ``auto`` rule), else ``"float32"``: on a CPU without it (a first-generation EPYC) bf16
    matmuls are emulated and several times slower. ``MCSD_TEST_DTYPE=float32`` forces float32
    (and mcsd's ``auto``), to run the float32 path on a machine that has bf16."""
    from mcsd.models.factory import default_dtype

    return str(default_dtype(torch.device("cpu"))).removeprefix("torch.")


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: with tiny models and tensors thread hand-offs cost more
    than the work, and two spinning threads crawl on a shared 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_causal_lm(
    arch: str = "qwen2",
    *,
    seed: int = 0,
    vocab: int = 96,
    layers: int = 2,
    hidden: int = 64,
    attn: str = "sdpa",
    max_positions: int = 256,
    sharpen: float | None = 8.0,
    **config: Any,
) -> Any:
    """A random ``arch`` model (float32, eval mode) of ``layers`` layers, 4 heads, 2 KV heads.
    ``sharpen`` scales the output head: random init is nearly uniform, and a sharper head puts
    greedy argmaxes far from ties. ``config`` overrides any config field."""
    import transformers

    classes = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }
    config_class, model_class = classes[arch]
    fields: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        attn_implementation=attn,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = model_class(config_class(**(fields | config))).eval()
    if sharpen is not None:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(sharpen)
    return model


def save_tiny_lm(directory: Path, tokenizer: Any, **options: Any) -> Path:
    """``tiny_causal_lm(**options)`` sized to ``tokenizer``, its special tokens set from it,
    saved with the tokenizer into ``directory``."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    model = tiny_causal_lm(
        vocab=len(tokenizer),
        eos_token_id=eos,
        bos_token_id=bos,
        pad_token_id=eos,
        **options,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def greedy_reference(
    model: Any, prompt: list[int], new_tokens: int, *, eos: tuple[int, ...] = ()
) -> list[int]:
    """transformers' greedy ``generate()``: exactly ``new_tokens`` tokens, or up to the first
    of ``eos`` when given."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stops: dict[str, Any] = (
            dict(eos_token_id=list(eos), pad_token_id=eos[0])
            if eos
            else dict(min_new_tokens=new_tokens)
        )
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            **stops,
        )
    return out[0, len(prompt) :].tolist()


def spec_decode(target: Any, draft: Any, prompt: list[int], spec: Any, vocab: int, **kw: Any):
    """The steps of one speculative generation (a ``Drafter`` around ``draft``)."""
    from mcsd.draft.proposer import Drafter
    from mcsd.engine import speculative_decode

    proposer = Drafter(draft, vocab_size=vocab)
    return speculative_decode(target, proposer, prompt, spec, vocab_size=vocab, **kw)


def spec_tokens(target: Any, draft: Any, prompt: list[int], spec: Any, vocab: int) -> list[int]:
    """The tokens of one speculative generation."""
    return [t for step in spec_decode(target, draft, prompt, spec, vocab) for t in step.tokens]


def one_sequence(plan: Any) -> Any:
    """A deliberately wrong ``mcsd.models.sequences.Plan``: every new token in the sequence of
    the first one (siblings see each other, as if the tree mask were a chain), only that
    sequence prepared, and the bookkeeping saying so (a commit then keeps the siblings too)."""
    from dataclasses import replace

    first = plan.seqs[0][0]
    n = len(plan.seqs)
    state = plan.state.copy()
    state.seqs[-n:] = [[first] for _ in range(n)]
    state.ends = {first: len(state.parents) - 1}
    copies = tuple(c for c in plan.copies if c.target == first)
    return replace(plan, seqs=((first,),) * n, copies=copies, state=state)


@pytest.fixture
def wrong_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ``SequenceMap.plan`` put all new tokens in one sequence (``one_sequence``)."""
    from mcsd.models.sequences import SequenceMap

    original = SequenceMap.plan
    monkeypatch.setattr(SequenceMap, "plan", lambda self, *a: one_sequence(original(self, *a)))
