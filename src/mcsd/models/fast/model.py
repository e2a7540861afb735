"""mcsd's own Llama-family model: one file, packed projections, a slot-written static KV cache.

The whole family in one module (``mcsd.models.fast.arch.Architecture`` says which variant):
RMSNorm, rotary embeddings (default / linear / llama3 frequencies, half-rotation as in the
Hugging Face checkpoints), one packed QKV projection (Qwen2's biases packed with it; Qwen3's
per-head q/k norms after it), grouped-query attention over the cache slots with an additive
mask (``torch.nn.functional.scaled_dot_product_attention``), one packed gate-up projection, and
the output head kept apart (``head``) so that callers compute logits only for the rows they need.

``TransformerLM.forward`` runs embedding -> layers -> final norm and writes every layer's new
keys and values into the cache at given slots; nothing is allocated per call except the
activations, so the function can be compiled (``torch.compile(fullgraph=True)``) and captured
in a CUDA graph.

Weights load from the checkpoint directories the ``hf`` runtime loads (safetensors, the mcsd
cache's converted models too): ``load_weights`` maps the Hugging Face names onto the packed
layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcsd.models.fast.arch import Architecture, Rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # In float32, then back: the same order of operations as the checkpoints' own code.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def inverse_frequencies(rope: Rope, head_dim: int) -> Tensor:
    """float32 ``[head_dim / 2]`` rotary frequencies, scaled as ``rope.kind`` says."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        d = arch.hidden_size
        self.wqkv = nn.Linear(d, arch.qkv_size, bias=arch.qkv_bias)
        self.wo = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None

    def forward(
        self,
        x: Tensor,  # [B, n, D]
        cos: Tensor,  # [B, 1, n, hd]
        sin: Tensor,  # [B, 1, n, hd]
        mask: Tensor,  # [B, 1, G * n, A] additive, repeated for the G query heads of a KV head
        slots: Tensor,  # [n] long, where the new keys/values go
        keys: Tensor,  # [B, KV, L, hd] this layer's cache
        values: Tensor,  # [B, KV, L, hd]
        explicit: bool = False,  # attention as plain matrix products (TransformerLM.forward)
    ) -> Tensor:
        b, n, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split(
            [self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1
        )
        q = q.view(b, n, self.heads, hd)  # [B, n, H, hd]
        k = k.view(b, n, self.kv_heads, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # [B, H, n, hd]
        k = k.transpose(1, 2)  # [B, KV, n, hd]
        v = v.view(b, n, self.kv_heads, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys.index_copy_(2, slots, k)
        values.index_copy_(2, slots, v)
        # Grouped-query attention without repeating the cache: the G = H / KV query heads of one
        # key/value head attend as G * n rows of that head (the mask comes repeated G times).
        groups = self.heads // self.kv_heads
        attend = mask.shape[-1]
        grouped = q.reshape(b, self.kv_heads, groups * n, hd)
        window_keys, window_values = keys[:, :, :attend], values[:, :, :attend]
        if explicit:  # matmul, softmax, matmul: every kernel spreads over the whole GPU
            scores = torch.matmul(grouped, window_keys.transpose(-1, -2)) * hd**-0.5
            weights = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, window_values)  # [B, KV, G * n, hd]
        else:
            out = F.scaled_dot_product_attention(
                grouped,
                window_keys,
                window_values,
                attn_mask=mask,  # [B, 1, G * n, A]
            )  # [B, KV, G * n, hd]
        out = out.reshape(b, self.heads, n, hd).transpose(1, 2)  # [B, n, H, hd]
        return self.wo(out.reshape(b, n, self.heads * hd))


class MLP(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.w13 = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.w2 = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.attention = Attention(arch)
        self.mlp_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x, cos, sin, mask, slots, keys, values, explicit=False) -> Tensor:
        h = x + self.attention(
            self.attention_norm(x), cos, sin, mask, slots, keys, values, explicit
        )
        return h + self.mlp(self.mlp_norm(h))


class TransformerLM(nn.Module):
    """Embedding -> blocks -> final norm; ``head`` apart (see the module docstring)."""

    def __init__(self, arch: Architecture, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.max_positions = max_positions
        self.embed = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(Block(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)
        self.init_rope()

    def init_rope(self) -> None:
        """The float32 cos/sin tables ``[max_positions, hd]`` on the model's device (again after
        the module was moved out of the meta device)."""
        arch, device = self.arch, self.embed.weight.device
        inv = inverse_frequencies(arch.rope, arch.head_dim).to(device)
        positions = torch.arange(self.max_positions, device=device).float()
        freqs = positions[:, None] * inv[None, :]  # [positions, hd / 2], as position * inv_freq
        table = torch.cat([freqs, freqs], dim=-1)  # [positions, hd]
        self.cos_table, self.sin_table = table.cos(), table.sin()

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights (benchmarks of model sizes without a checkpoint): normal linear and
        embedding weights, unit norms, zero biases."""
        generator = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.fill_(1.0)
                elif name.endswith("bias"):
                    parameter.zero_()
                else:
                    parameter.normal_(0.0, std, generator=generator)

    def forward(
        self,
        tokens: Tensor,  # [B, n] long
        positions: Tensor,  # [B, n] long
        mask: Tensor,  # [B, 1, n, A] additive, in the model dtype
        slots: Tensor,  # [n] long
        kv: Tensor,  # [layers, 2, B, KV, L, hd] the cache
        explicit: bool = False,
    ) -> Tensor:
        """Final hidden states ``[B, n, D]``; the new keys/values are in ``kv`` at ``slots``.

        ``explicit``: attention as matmul, softmax (float32), matmul, as the checkpoints' own
        "eager" attention computes it: for the few query rows of a decoding or tree step every
        one of these kernels spreads over the whole GPU, where SDPA's fused kernels give each
        key/value head one thread block (measured on an H200: docs/benchmarks.md). A prefill
        (many rows, whose scores would be large) uses SDPA."""
        return self.states(tokens, positions, mask, slots, kv, explicit)[0]

    def states(
        self,
        tokens: Tensor,  # [B, n] long
        positions: Tensor,  # [B, n] long
        mask: Tensor,  # [B, 1, n, A] additive, in the model dtype
        slots: Tensor,  # [n] long
        kv: Tensor,  # [layers, 2, B, KV, L, hd] the cache
        explicit: bool = False,
        layers: tuple[int, ...] = (),  # hidden states to keep, indices in [0, num_layers]
    ) -> tuple[Tensor, Tensor | None]:
        """``forward``'s final hidden states ``[B, n, D]`` and, for ``layers``, the hidden
        states ``[len(layers), B, n, D]`` at those indices, numbered as transformers'
        ``hidden_states``: 0 the embeddings, i < L after block i, L after the final norm."""
        x = self.embed(tokens)
        kept = {0: x} if 0 in layers else {}
        cos = self.cos_table[positions].to(x.dtype)[:, None]  # [B, 1, n, hd]
        sin = self.sin_table[positions].to(x.dtype)[:, None]
        b, _, n, length = mask.shape
        groups = self.arch.num_heads // self.arch.num_kv_heads
        grouped = mask[:, :, None].expand(b, 1, groups, n, length).reshape(b, 1, groups * n, length)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, grouped, slots, kv[i, 0], kv[i, 1], explicit)
            if i + 1 in layers:
                kept[i + 1] = x
        x = self.norm(x)
        if not layers:
            return x, None
        kept[len(self.layers)] = x
        return x, torch.stack([kept[i] for i in layers])  # [len(layers), B, n, D]


# ---------------------------------------------------------------- weights
def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in files]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"no safetensors weights in {directory} (model.safetensors or an index)")


def load_weights(model: TransformerLM, directory: str | Path) -> None:
    """Fill ``model`` from a Hugging Face checkpoint directory (``load_state``)."""
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    for shard in _shards(Path(directory)):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = handle.get_tensor(name)
    load_state(model, tensors, str(directory))


def load_state(model: TransformerLM, tensors: dict[str, Tensor], source: str = "state") -> None:
    """Fill ``model`` from Hugging Face-named tensors (a checkpoint's, or a live transformers
    model's ``state_dict()``), packing q/k/v and gate/up. Every parameter must be written
    exactly once; anything missing or left over is an error naming ``source``."""
    arch = model.arch
    prefix = "model." if any(name.startswith("model.") for name in tensors) else ""
    take = _Taker(tensors)
    target: dict[str, Tensor] = {
        "embed.weight": take(f"{prefix}embed_tokens.weight"),
        "norm.weight": take(f"{prefix}norm.weight"),
    }
    if arch.tied_embeddings:
        take.optional("lm_head.weight")  # some tied checkpoints store the copy as well
        target["head.weight"] = target["embed.weight"]
    else:
        target["head.weight"] = take("lm_head.weight")
    for i in range(arch.num_layers):
        p, out = f"{prefix}layers.{i}.", f"layers.{i}."
        attn = f"{p}self_attn."
        target[f"{out}attention.wqkv.weight"] = torch.cat(
            [take(f"{attn}{x}_proj.weight") for x in "qkv"]
        )
        if arch.qkv_bias:
            target[f"{out}attention.wqkv.bias"] = torch.cat(
                [take(f"{attn}{x}_proj.bias") for x in "qkv"]
            )
        if arch.qk_norm:
            target[f"{out}attention.q_norm.weight"] = take(f"{attn}q_norm.weight")
            target[f"{out}attention.k_norm.weight"] = take(f"{attn}k_norm.weight")
        target[f"{out}attention.wo.weight"] = take(f"{attn}o_proj.weight")
        target[f"{out}mlp.w13.weight"] = torch.cat(
            [take(f"{p}mlp.gate_proj.weight"), take(f"{p}mlp.up_proj.weight")]
        )
        target[f"{out}mlp.w2.weight"] = take(f"{p}mlp.down_proj.weight")
        target[f"{out}attention_norm.weight"] = take(f"{p}input_layernorm.weight")
        target[f"{out}mlp_norm.weight"] = take(f"{p}post_attention_layernorm.weight")
    left = sorted(set(tensors) - take.used)
    if left:
        raise ValueError(f"{source} has weights the fast model does not use: {left[:4]}")
    state = model.state_dict()
    missing = sorted(set(state) - set(target) - {"cos_table", "sin_table"})
    if missing:
        raise ValueError(f"{source} lacks weights: {missing[:4]}")
    with torch.no_grad():
        for name, value in target.items():
            if state[name].shape != value.shape:
                raise ValueError(
                    f"{source}: {name} has shape {tuple(value.shape)}, the config "
                    f"says {tuple(state[name].shape)}"
                )
            state[name].copy_(value)


def tie(model: TransformerLM) -> None:
    """The output head reads the input embedding (one tensor, read once per forward)."""
    model.head.weight = model.embed.weight


class _Taker:
    """Hands out checkpoint tensors by name, remembering which were used."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def __call__(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise ValueError(f"the checkpoint has no weight {name!r}")
        self.used.add(name)
        return self.tensors[name]

    def optional(self, name: str) -> None:
        if name in self.tensors:
            self.used.add(name)
