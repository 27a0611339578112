"""What every family shares: `DecoderConfig` (the fields every decoder has, read once, rope included),
the `Family` a family module declares, and `Decoder`, the one forward loop every family runs.

A decoder is an embedding, layers of (input norm, mixer, post norm, MLP) with a fused residual
stream, a final norm and a head. The mixer is attention or a Gated DeltaNet (models/layers); the MLP
a SwiGLU, a mixture of experts or gpt-oss's experts. One forward serves prefill chunks, the verify
block and plain decoding: it takes T >= 1 tokens at the positions after the cache's committed length,
and returns logits only for the positions asked for and the residual stream only of the layers the
drafter reads. With `commit` the T tokens join the sequence at once (a prefill chunk); otherwise the
cache's `commit(plan)` decides which of them do (a verify block). A family whose layers route the
residual otherwise (Gemma 4's sandwiched norms and layer scalar) overrides `run_layers` alone; the
embedding's scale and the head's soft-cap are config fields every family has.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..cache import CommitPlan
from ..config import Fields, LayerShape
from ..rope import rope_table
from .layers.linear import Dense, Linear
from .layers.norm import RMSNorm
from .weights import Weight


@dataclass(frozen=True)
class DecoderConfig(LayerShape):
    """The fields every decoder family reads from config.json. A family's Config adds its own."""

    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    logit_softcap: float | None = field(default=None, kw_only=True)  # the head's logits: cap·tanh(z / cap)

    prefill_scratch = 0  # bytes a prefill allocates beyond its activations (memory.workspace_bytes)
    embed_scale = 1.0  # the embedding's rows times this (Gemma: √hidden, rounded to the weights' dtype)

    @property
    def activation_width(self) -> int:
        """The widest per-token activation of a forward, in elements (for the memory plan)."""
        return max(2 * self.intermediate_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)

    @staticmethod
    def shared(raw: dict, f: Fields, *, eps: float = 1e-6, max_positions: int = 4096, head_dim: int | None = None,
               intermediate: bool = True, rope_drop: tuple[str, ...] = ()) -> dict:
        """The shared fields of `raw` (a family passes its defaults), as keyword arguments."""
        shape = LayerShape.read(raw, f, eps=eps, head_dim=head_dim, intermediate=intermediate, rope_drop=rope_drop)
        return dict(vocab_size=f.req("vocab_size"), **shape,
                    max_position_embeddings=f.opt("max_position_embeddings", max_positions),
                    tie_word_embeddings=f.opt("tie_word_embeddings", False, bool))


def head_weights(c: DecoderConfig, prefix: str = "model.", norm: str = "norm",
                 norm_dtype: str = "model") -> list[Weight]:
    """Embedding, final norm and lm_head (absent when tied: the embedding serves)."""
    table = [Weight(prefix + "embed_tokens.weight", (c.vocab_size, c.hidden_size), "embed"),
             Weight(prefix + "norm.weight", (c.hidden_size,), norm, dtype=norm_dtype)]
    if not c.tie_word_embeddings:  # a checkpoint without one is tied after all (Qwen3.5-4B ships none)
        table.append(Weight("lm_head.weight", (c.vocab_size, c.hidden_size), gain=4.0,
                            fallback=prefix + "embed_tokens.weight"))
    return table


def layer_norm_weights(c: DecoderConfig, p: str, norm: str = "norm", norm_dtype: str = "model") -> list[Weight]:
    return [Weight(p + "input_layernorm.weight", (c.hidden_size,), norm, dtype=norm_dtype),
            Weight(p + "post_attention_layernorm.weight", (c.hidden_size,), norm, dtype=norm_dtype)]


def span(length: torch.Tensor, count: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(positions [count], kv_len) of `count` new tokens after the committed `length`. A step's block (up to
    ops.MAX_KERNEL_Q_LEN rows) gets both in one launch, as views of length + offsets[:count + 1] (offsets:
    0, 1, 2, ... made once); a long prefill chunk's kv_len is read back once (ops.kv_length)."""
    if count > ops.MAX_KERNEL_Q_LEN:
        return length + torch.arange(count, device=length.device), ops.kv_length(length, count)
    both = length + offsets[: count + 1]
    return both[:count], both[count]


def span_offsets(device: torch.device) -> torch.Tensor:
    """The `offsets` of `span`, made once per model."""
    return torch.arange(ops.MAX_KERNEL_Q_LEN + 1, device=device)


class Taps(dict):
    """The residual streams the drafter reads, by layer (`wanted[i] = stream` as a forward passes layer i),
    each copied as it is set into its columns of one [T, len(layers)·H] buffer, in the order the layers were
    given: one copy per layer, and the features need no concatenation afterwards."""

    def __init__(self, layers: Sequence[int]):
        super().__init__({layer: None for layer in layers})
        self._column = {layer: j for j, layer in enumerate(self)}
        self._buffer: torch.Tensor | None = None

    def __setitem__(self, layer: int, stream: torch.Tensor) -> None:
        h = stream.shape[-1]
        if self._buffer is None:
            self._buffer = stream.new_empty(stream.shape[0], len(self._column) * h)
        j = self._column[layer]
        out = self._buffer[:, j * h:(j + 1) * h]
        out.copy_(stream)
        super().__setitem__(layer, out)

    def features(self) -> torch.Tensor:
        """[T, len(layers)·H]: every layer's stream, side by side."""
        assert all(v is not None for v in self.values()), "a feature layer the forward did not pass"
        return self._buffer


@dataclass
class StepPlan:
    """What every mixer of one forward shares: where the new tokens sit, and whether they are a prefill
    chunk or a verify block (a tree verify will add its ancestor mask here)."""

    positions: torch.Tensor  # [T]: the new tokens' positions
    kv_len: torch.Tensor | int  # keys attended to (ops.kv_length)
    cos_sin: torch.Tensor  # the rope table
    commit: bool  # a prefill chunk (write through) rather than a verify block
    # A tree verify (dflash_cli/tree.py): `positions` are then anchor + depth, the K/V go to cache `rows`
    # (after the committed length, in node order), and attention is masked by `mask` [T, capacity]
    # (committed keys and each node's ancestors), with `key_positions` [capacity] for sliding windows.
    rows: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None


@dataclass
class Layer:
    input_norm: RMSNorm
    mixer: Callable  # (h, cache, step) -> [T, H]: layers.attention.Attention or layers.gated_delta.GatedDeltaNet
    post_norm: RMSNorm
    mlp: Callable  # h [T, H] -> [T, H]: layers.mlp.SwiGLU, MoE or GptOssExperts


def norm_then_mixer(layer: Layer, x: torch.Tensor, residual: torch.Tensor | None, cache, step: StepPlan
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The input norm (with the residual add; the first layer has none, and its residual is x), then the
    mixer: (out, new residual). A mixer that can fuse the norm into its first projection
    (layers.attention.Attention.after_norm) is handed both."""
    fused = getattr(layer.mixer, "after_norm", None)
    if fused is not None:
        out, new = fused(layer.input_norm, x, residual, cache, step)
    else:
        h, new = layer.input_norm(x, residual)
        out = layer.mixer(h, cache, step)
    return out, x if residual is None else new


def norm_then_mlp(layer: Layer, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The post-attention norm, then the MLP: (out, new residual). An MLP that can fuse the norm into its
    first projection (layers.mlp.SwiGLU.after_norm) is handed both."""
    fused = getattr(layer.mlp, "after_norm", None)
    if fused is not None:
        return fused(layer.post_norm, x, residual)
    h, residual = layer.post_norm(x, residual)
    return layer.mlp(h), residual


class Decoder:
    """A target model: `forward` over its cache, `new_cache`, and `commit(cache, plan)`."""

    def __init__(self, cfg: DecoderConfig, w: dict[str, torch.Tensor], max_positions: int, *, norm_style: str,
                 mixer: Callable, mlp: Callable, cache: Callable, prefix: str = "model.",
                 rotary_dim: int | None = None):
        """Assemble a decoder from the checkpoint's tensors `w` (consumed): `mixer(i, p)` and `mlp(i, p)`
        take layer i's (p: its name prefix); `cache(decoder, capacity, block_size)` makes its cache.
        max_positions: the rope table's length, the most cache slots any engine will use; rotary_dim: the
        leading dims of each head that are rotated (default: all)."""
        eps = cfg.rms_norm_eps
        self.cfg, self.max_positions, self._cache = cfg, max_positions, cache
        self.embed = w.pop(prefix + "embed_tokens.weight")
        self.norm = RMSNorm.take(w, prefix + "norm.weight", eps, norm_style)
        self.lm_head = w.pop("lm_head.weight", self.embed)  # the embedding when tied
        self.embed_scale = float(torch.tensor(cfg.embed_scale, dtype=self.embed.dtype))  # as transformers rounds it
        self.head: Linear = Dense(self.lm_head)
        self.layers: list[Layer] = []
        for i in range(cfg.num_layers):
            p = f"{prefix}layers.{i}."
            self.layers.append(Layer(RMSNorm.take(w, p + "input_layernorm.weight", eps, norm_style), mixer(i, p),
                                     RMSNorm.take(w, p + "post_attention_layernorm.weight", eps, norm_style),
                                     mlp(i, p)))
        self.cos_sin = rope_table(rotary_dim or cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions,
                                  self.embed.device)
        self.offsets = span_offsets(self.embed.device)

    def new_cache(self, capacity: int, block_size: int = 1):
        """A cache for `capacity` tokens, whose verify blocks are at most `block_size` rows."""
        return self._cache(self, capacity, block_size)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The input rows of `ids`, times the config's `embed_scale` (a family whose embedding is more than
        that overrides it)."""
        x = F.embedding(ids, self.embed)
        return x if self.embed_scale == 1.0 else x * self.embed_scale

    def forward(self, ids: torch.Tensor, cache, *, logits_from: int | None = None,
                feature_layers: Sequence[int] = (), commit: bool = False, tree=None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ids: [T]. Returns (logits [T - logits_from, V] or None, features [T, len(layers)·H] or None).

        Features are the outputs of decoder layers `feature_layers` (the residual stream before the
        final norm), concatenated in the order given: the drafter's context input.

        tree: a `tree.Tree` whose tokens are `ids` (a verify block): node i at position length + depth,
        attending to the committed tokens and its ancestors only (`commit` with the accepted path's rows)."""
        t = ids.shape[0]
        if not commit:
            cache.verify_rows(t)
        if tree is None:
            step = StepPlan(*span(cache.length, t, self.offsets), self.cos_sin, commit)
        else:  # rows length.., kv_len on the device at any budget (a tree is a verify, never a prefill chunk)
            from ..tree import attention_mask

            mask, keys = attention_mask(tree, cache.length, cache.kv.capacity)
            rows, kv_len = span(cache.length, t, self.offsets) if t <= ops.MAX_KERNEL_Q_LEN else \
                (cache.length + torch.arange(t, device=ids.device), cache.length + t)
            step = StepPlan(cache.length + tree.depths, kv_len, self.cos_sin, False, rows, mask, keys)
        wanted = Taps(feature_layers)
        x = self.embedding(ids)
        h = self.run_layers(x, cache, step, wanted)
        if commit:
            cache.prefilled(t)
        logits = None if logits_from is None else self.logits(h[logits_from:])
        features = wanted.features() if wanted else None
        return logits, features

    def run_layers(self, x: torch.Tensor, cache, step: StepPlan, wanted: dict[int, torch.Tensor | None]
                   ) -> torch.Tensor:
        """The embedded tokens x [T, H] through every layer and the final norm; fills `wanted[i]` with
        layer i's output (a family with another residual flow overrides this)."""
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = norm_then_mixer(layer, x, residual, cache, step)
            if i > 0 and i - 1 in wanted:  # layer i - 1's output: the stream after this layer's residual add
                wanted[i - 1] = residual  # copied into the features buffer (Taps)
            x, residual = norm_then_mlp(layer, x, residual)
        h, residual = self.norm(x, residual)
        if len(self.layers) - 1 in wanted:
            wanted[len(self.layers) - 1] = residual
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head's logits of final hidden states h, soft-capped where the config says."""
        logits = self.head(h)
        cap = self.cfg.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def commit(self, cache, plan: CommitPlan | int | torch.Tensor) -> None:
        """The plan's tokens of the last forward join the sequence (the cache's own commit)."""
        cache.commit(CommitPlan.of(plan))


@dataclass(frozen=True)
class Family:
    """What a family module declares, as `FAMILY`: every member is here, with the defaults of a family
    that does not need it (models/__init__.py reads nothing else; tests/test_families.py checks them)."""

    model_types: tuple[str, ...]  # the config.json `model_type` values it reads
    Config: type  # with `from_raw(raw, directory)`: its config, checked at the boundary (one-line errors)
    weight_table: Callable  # (cfg, layout=None) -> list[Weight]: every tensor it loads, by checkpoint name
    build: Callable  # (cfg, tensors, max_positions) -> Decoder (tensors consumed)
    cache_bytes: Callable  # (cfg, dtype, block_size) -> (bytes per token of context, fixed bytes)
    layout_of: Callable = lambda names: None  # the checkpoint's layout (experts fused or not), from its names
    drafter_defaults: Callable = lambda raw: raw  # a drafter config.json of this model_type as transformers reads it


def kv_cache_bytes(c: DecoderConfig, dtype: torch.dtype, block_size: int, layers: int | None = None) -> tuple[int, int]:
    """(bytes per token of context, fixed bytes) of a K/V cache over `layers` (default: all) layers."""
    size = torch.tensor([], dtype=dtype).element_size()
    return 2 * (c.num_layers if layers is None else layers) * c.num_kv_heads * c.head_dim * size, 0
