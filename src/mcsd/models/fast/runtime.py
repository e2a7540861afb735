"""Runtime ``fast``: mcsd's own Llama-family model on the shared static slot cache.

``FastModel`` is ``mcsd.models.slots.SlotCacheRuntime`` (slots, padded buckets, CUDA graphs,
commit by gather) around ``mcsd.models.fast.model.TransformerLM``. Differences from
``hf-static``:

- the forward that is captured (and, with ``compile=True``, compiled with
  ``torch.compile(fullgraph=True)``, one compilation per token bucket) stops at the final norm;
  the head runs after it, on the rows the caller wants (all, the last, none): a prefill skips
  the head's largest matrix product, and a reduced-vocabulary draft (``restricted``) multiplies
  by its own rows of the head only;
- attention spans the whole cache (one attention length), so the only shapes are the token
  buckets: ``warmup`` runs each of them once (capture, and compilation when asked), after which a
  run never compiles again;
- it returns hidden states (``forward_hidden``, ``TransformerLM.states``), eagerly.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import Tensor

from mcsd.config import ATTENTION_BLOCK, MAX_GRAPH_TOKENS, STATIC_MAX_LENGTH
from mcsd.models.base import Rows, chain_mask, row_buckets
from mcsd.models.fast.arch import Architecture, read_architecture
from mcsd.models.fast.model import TransformerLM, load_state, load_weights, tie
from mcsd.models.slots import SlotCacheRuntime, bucket


class FastModel(SlotCacheRuntime):
    kind = "fast"
    resizable = True
    returns_hidden = True

    def __init__(
        self,
        lm: TransformerLM,
        *,
        label: str = "model",
        batch_size: int = 1,
        cuda_graphs: bool = True,
        compile: bool = False,
        max_graph_tokens: int = MAX_GRAPH_TOKENS,
        tree_reserve: int | None = None,
        head_rows: Tensor | None = None,
        attention_block: int = ATTENTION_BLOCK,
    ) -> None:
        weight = lm.embed.weight
        max_length = lm.max_positions
        super().__init__(
            device=weight.device,
            dtype=weight.dtype,
            max_length=max_length,
            batch_size=batch_size,
            cuda_graphs=cuda_graphs,
            max_graph_tokens=max_graph_tokens,
            attention_block=attention_block,
            tree_reserve=tree_reserve,
            label=label,
        )
        self.lm = lm.eval()
        self.label = label
        self.options = dict(
            attention_block=attention_block,
            label=label,
            batch_size=batch_size,
            cuda_graphs=cuda_graphs,
            compile=compile,
            max_graph_tokens=max_graph_tokens,
            tree_reserve=tree_reserve,
        )
        arch = lm.arch
        self._allocate(arch.num_layers, arch.num_kv_heads, arch.head_dim, weight.dtype)
        # [V', D]: the head's rows this runtime scores (a reduced vocabulary: a copy of some)
        self._head = lm.head.weight if head_rows is None else lm.head.weight[head_rows].clone()
        self._run = self._hidden
        if compile:
            # Dynamic shapes: one compilation for any number of tokens and attention length (a
            # single token stays specialised: two compilations per model), all in ``warmup``.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 1024)
            self._run = torch.compile(self._hidden, fullgraph=True, dynamic=True)

    def restricted(self, head_rows: Tensor) -> FastModel:
        """A runtime of its own (own cache) sharing these weights, whose head scores only the
        token ids ``head_rows`` (``mcsd.models.cheap``)."""
        return FastModel(self.lm, head_rows=head_rows.to(self.device), **self.options)

    # ------------------------------------------------------------------ protocol
    @property
    def name(self) -> str:
        return f"{self.kind}:{self.label}"

    @property
    def vocab_size(self) -> int:
        return int(self._head.shape[0])

    @property
    def num_layers(self) -> int:
        return self.lm.arch.num_layers

    # ------------------------------------------------------------------ SlotCacheRuntime
    def _hidden(
        self, tokens: Tensor, positions: Tensor, mask: Tensor, slots: Tensor, explicit: bool
    ) -> Tensor:
        assert self._kv is not None
        kv = self._kv[:, :, : tokens.shape[0]]  # the first b rows (a row bucket, or all B)
        return self.lm(tokens, positions, mask, slots, kv, explicit)  # [b, n_pad, D]

    def _body(self, tokens, positions, mask, slots, attend: int, *, compiled: bool) -> Tensor:
        # The captured shapes (decoding and tree steps) attend explicitly; prefills by SDPA.
        run = self._run if compiled else self._hidden
        return run(tokens, positions, mask, slots, compiled)

    def _body_hidden(
        self, tokens, positions, mask, slots, attend: int, *, explicit: bool, layers
    ) -> tuple[Tensor, Tensor]:
        assert self._kv is not None
        kv = self._kv[:, :, : tokens.shape[0]]  # the first b rows
        out, hidden = self.lm.states(tokens, positions, mask, slots, kv, explicit, layers)
        assert hidden is not None
        return out, hidden  # [b, n_pad, D], [len(layers), b, n_pad, D]

    def _logits(self, out: Tensor, n: int, rows: Rows) -> Tensor:
        hidden = out[:, n - 1 : n] if rows == "last" else out[:, :n]  # [B, n | 1, D]
        return torch.nn.functional.linear(hidden, self._head).float()  # [B, n | 1, V']

    def with_rows(self, batch_size: int) -> FastModel:
        """The same model and settings with a cache of ``batch_size`` rows (weights shared)."""
        copy = FastModel(self.lm, **(self.options | {"batch_size": batch_size}))
        copy._head = self._head  # a reduced vocabulary's rows, if any
        return copy

    @torch.inference_mode()
    def warmup(self, token_counts: tuple[int, ...]) -> list[int]:
        """Run every bucket the counts fall into, at every row bucket, at two attention lengths
        (compiling with
        ``compile=True``: the second length makes the compiled code generic in it, so a run's
        growing context never compiles again; each (bucket, length) graph is captured when first
        met, which costs milliseconds), then empty the cache. Returns the buckets. Prefills
        need no warm-up: they run eagerly."""
        buckets = sorted({bucket(n, self.max_graph_tokens) for n in token_counts})
        device, rows, block = self.device, self.batch_size, self.attention_block
        self.reset()
        for offset in (0, block):
            if offset and offset + max(buckets) > self.max_context:
                break  # one attention length is all this cache has
            if offset:  # fill the first block (an eager prefill) so attention spans two
                filler = torch.zeros(rows, offset, dtype=torch.long, device=device)
                positions = torch.arange(offset, device=device).expand(rows, offset)
                self.forward(filler, positions, chain_mask(offset, device=device), logits="none")
                self.commit()
            for size, batch in itertools.product(buckets, row_buckets(rows)):
                if size > self.max_graph_tokens:
                    continue
                tokens = torch.zeros(batch, size, dtype=torch.long, device=device)
                positions = torch.arange(offset, offset + size, device=device).expand(batch, size)
                mask = chain_mask(size, device=device)
                self.forward_rows(list(range(batch)), tokens, positions, mask, logits="last")
                self.commit([[]] * rows)
        self.reset()
        return buckets


def load_fast(
    directory: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_length: int | None = None,
    compile: bool = False,
    label: str | None = None,
) -> FastModel:
    """A ``FastModel`` from a checkpoint directory (config.json + safetensors). An unsupported
    architecture is refused before any weight is read."""
    arch = read_architecture(directory)
    return FastModel(
        build(arch, dtype=dtype, device=device, max_length=max_length, directory=directory),
        label=label or Path(directory).name,
        compile=compile,
    )


def build(
    arch: Architecture,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_length: int | None = None,
    directory: str | Path | None = None,
    state: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> TransformerLM:
    """The model on ``device`` in ``dtype``: weights from ``directory`` or Hugging Face-named
    ``state`` tensors, else random (seeded)."""
    length = max_length or min(arch.max_positions, STATIC_MAX_LENGTH)
    with torch.device("meta"):
        lm = TransformerLM(arch, length)
    lm = lm.to_empty(device=device).to(dtype)  # cast while empty: no full-precision copy
    if arch.tied_embeddings:
        tie(lm)
    if directory is not None:
        load_weights(lm, directory)
    elif state is not None:
        load_state(lm, state)
    else:
        lm.init_random(seed)
    lm.init_rope()
    return lm
