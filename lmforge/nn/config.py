"""Fields every Transformer stack shares; each model family's config extends this dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from lmforge.config import check, check_choice

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("learned", "sinusoidal", "rotary", "none")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")  # out = c_proj(act(gate) * up), Shazeer 2020


@dataclass
class TransformerConfig:
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain MHA)
    n_embd: int = 128
    # None: n_embd // n_head. Set apart by T5 (its d_kv: v1.1 small has 6 heads of 64 in 512) and
    # by head pruning, which drops heads but keeps their size
    head_size: int | None = None
    mlp_hidden: int | None = None  # None: 4*n_embd, or ~8/3*n_embd for gated (SwiGLU) MLPs
    dropout: float = 0.0
    bias: bool = True
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = "pre"
    norm_eps: float = 1e-5
    position: Literal["learned", "sinusoidal", "rotary", "none"] = "learned"
    rope_theta: float = 10000.0
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu"] = "gelu"

    # the position schemes a model family implements; a family's config may narrow or widen them
    position_choices: ClassVar[tuple[str, ...]] = POSITIONS

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        check(
            1 <= self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0,
            f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}",
        )
        self._check_head_size()
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        check_choice("norm", self.norm, NORMS)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("position", self.position, self.position_choices)
        check_choice("activation", self.activation, ACTIVATIONS)
        if self.position == "rotary":
            check(self.head_dim % 2 == 0, f"rotary positions need an even head size, got {self.head_dim}")
        if self.mlp_hidden is None:
            if self.activation in GATED_ACTIVATIONS:
                # keeps the parameter count of a 4x MLP (Shazeer 2020), rounded for fast matmuls
                self.mlp_hidden = 32 * -(-int(8 * self.n_embd / 3) // 32)
            else:
                self.mlp_hidden = 4 * self.n_embd
        check(self.mlp_hidden >= 1, f"mlp_hidden must be >= 1, got {self.mlp_hidden}")

    def _check_head_size(self) -> None:
        """Heads split n_embd evenly, unless `head_size` sets their size apart; attention then
        works in n_head * head_size dimensions and `c_proj` maps them back to n_embd."""
        if self.head_size is not None:
            check(self.head_size >= 1, f"head_size must be >= 1 or None, got {self.head_size}")
            return
        check(
            self.n_embd % self.n_head == 0,
            f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set head_size)",
        )

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head
