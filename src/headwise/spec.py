"""What headwise needs to know about a model's attention: its shape, per layer.

``ModelSpec`` is computed once from a transformers config and is what plans are checked against (the
plan's *fingerprint*) and what KV-memory accounting uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Architectures whose attention modules call ``past_key_values.update`` and then the registered attention
# function with ``module.layer_idx`` set: the two extension points headwise relies on. Checked in tests with
# tiny random configs (llama, qwen2, qwen3, mistral, gemma3_text) and on real weights (llama, gemma3_text).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a model's attention.

    ``layer_windows[i]`` is the native sliding window of layer ``i`` (``None`` for global attention): a
    Gemma 3 sliding layer never looks further back than its window whatever the plan says, and its cache
    never holds more. ``rope[i]`` is layer ``i``'s RoPE inverse frequencies (``rope.rope_inv_freq``; ``None``
    where unknown), for policies that show keys at other positions (``longheads``); not part of the fingerprint.
    """

    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    layer_windows: tuple[int | None, ...] = field(default_factory=tuple)
    rope: tuple[tuple[float, ...] | None, ...] = field(default_factory=tuple, repr=False)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def num_kv_heads_total(self) -> int:
        return self.num_layers * self.num_kv_heads

    def native_window(self, layer: int) -> int | None:
        """The model's own sliding window of ``layer`` (``None``: global attention)."""
        return self.layer_windows[layer] if layer < len(self.layer_windows) else None

    def rope_inv_freq(self, layer: int) -> tuple[float, ...] | None:
        """Layer ``layer``'s RoPE inverse frequencies, or None where unknown."""
        return self.rope[layer] if layer < len(self.rope) else None

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V that one token adds to a dense cache (all layers, all KV heads)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def dense_kv_tokens(self, seq_len: int) -> int:
        """Token slots (summed over layers and KV heads) a dense cache holds after ``seq_len`` tokens."""
        total = 0
        for window in self.layer_windows:
            held = seq_len if window is None else min(seq_len, window)
            total += held * self.num_kv_heads
        return total

    def dense_kv_bytes(self, seq_len: int, dtype_bytes: int = 2) -> int:
        return self.dense_kv_tokens(seq_len) * 2 * self.head_dim * dtype_bytes

    def fingerprint(self) -> dict[str, Any]:
        """What a plan must match to run on this model."""
        return {
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_windows"] = list(self.layer_windows)
        del d["rope"]  # hundreds of floats per layer; the model's config says them
        return d

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        """Build the spec from a transformers ``PretrainedConfig`` (text config for multimodal ones)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        arch = str(getattr(config, "model_type", "unknown"))
        n_layers = int(config.num_hidden_layers)
        n_q = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_q)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_q)
        max_ctx = int(getattr(config, "max_position_embeddings", 0) or 0)
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        windows: list[int | None] = []
        for i in range(n_layers):
            ltype = layer_types[i] if layer_types else "full_attention"
            windows.append(int(window) if (ltype == "sliding_attention" and window) else None)
        if not layer_types and window and arch == "mistral":
            # Mistral configs with a sliding_window and no layer_types slide on every layer.
            windows = [int(window)] * n_layers
        from headwise.rope import rope_inv_freq

        rope = tuple(rope_inv_freq(config, layer_types[i] if layer_types else "full_attention") for i in range(n_layers))
        return cls(arch, n_layers, n_q, n_kv, head_dim, max_ctx, tuple(windows), rope)
