"""Tiny random GGUF language models, written with the ``gguf`` package, for the llama.cpp runtime.

A few-token vocabulary keeps the exact distribution of short continuations enumerable (score
every prefix with the runtime itself), so the whole-engine losslessness check can run THROUGH
llama.cpp: its tree batches, sequence ids, commits and logits. The model is a 2-layer Llama
(grouped-query attention, RoPE, SwiGLU) in float32; its output head is scaled so that next-token
distributions are neither uniform nor one-hot.

The vocabulary is GPT-2-style byte-level BPE over single letters ``a``, ``b``, ... (llama.cpp
needs a tokenizer to load a model; the checks work on ids). The last id is the EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, kw_only=True)
class TinyGGUF:
    """Shape and seed of one tiny model."""

    vocab: int = 4
    seed: int = 0
    layers: int = 2
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 64
    context: int = 64  # the model's training context (llama.cpp caps its context there)
    head_scale: float = 2.0  # output head scale: logits spread ~ N(0, head_scale^2)

    def __post_init__(self) -> None:
        if not 2 <= self.vocab <= 26:
            raise ValueError(f"vocab must be in 2..26 (one letter per token), got {self.vocab}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide into heads, heads into kv_heads")

    def write(self, path: str | Path) -> Path:
        """Write the model to ``path`` (a ``.gguf`` file) and return the path."""
        import gguf

        path = Path(path)
        rng = np.random.default_rng(self.seed)
        head_dim = self.hidden // self.heads
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_name(f"tiny-{self.vocab}-{self.seed}")
        writer.add_context_length(self.context)
        writer.add_embedding_length(self.hidden)
        writer.add_block_count(self.layers)
        writer.add_feed_forward_length(self.ffn)
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_vocab_size(self.vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([chr(ord("a") + i) for i in range(self.vocab)])
        writer.add_token_types([gguf.TokenType.NORMAL] * self.vocab)
        writer.add_token_merges(["a b"])  # llama.cpp refuses a BPE vocabulary without merges
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(self.vocab - 1)
        writer.add_add_bos_token(False)

        def dense(name: str, rows: int, cols: int, scale: float | None = None) -> None:
            scale = 1.0 / np.sqrt(cols) if scale is None else scale
            weights = rng.standard_normal((rows, cols)) * scale
            writer.add_tensor(name, weights.astype(np.float32))

        ones = np.ones(self.hidden, dtype=np.float32)
        kv = self.kv_heads * head_dim
        dense("token_embd.weight", self.vocab, self.hidden, scale=1.0)
        for i in range(self.layers):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
            dense(f"blk.{i}.attn_q.weight", self.hidden, self.hidden)
            dense(f"blk.{i}.attn_k.weight", kv, self.hidden)
            dense(f"blk.{i}.attn_v.weight", kv, self.hidden)
            dense(f"blk.{i}.attn_output.weight", self.hidden, self.hidden)
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
            dense(f"blk.{i}.ffn_gate.weight", self.ffn, self.hidden)
            dense(f"blk.{i}.ffn_up.weight", self.ffn, self.hidden)
            dense(f"blk.{i}.ffn_down.weight", self.hidden, self.ffn)
        writer.add_tensor("output_norm.weight", ones)
        head = self.head_scale / np.sqrt(self.hidden)
        dense("output.weight", self.vocab, self.hidden, scale=head)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path
