"""What a codebook file must match in a model: architecture, attention geometry, identity."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch


class UnsupportedModelError(ValueError):
    """The model has no attention kvquant can quantize, or it does not route through
    ``transformers.AttentionInterface``."""


SUPPORTED = "Llama, Qwen2, Mistral, Gemma/Gemma3, GPT-2, GPT-NeoX and other decoders with AttentionInterface support"


def check_architecture(config, name: str = "") -> None:
    """Raise :class:`UnsupportedModelError` for a model config without attention heads (Mamba,
    RWKV, …) — read from the config, before any weights are loaded."""
    cfg = getattr(config, "text_config", None) or config
    missing = [k for k in ("num_attention_heads", "num_hidden_layers") if not getattr(cfg, k, None)]
    if missing:
        raise UnsupportedModelError(
            f"model {name or getattr(cfg, '_name_or_path', '')} ({getattr(cfg, 'model_type', '?')}) has no attention "
            f"heads (its config has no {' or '.join(missing)}): kvquant quantizes attention's queries and keys; "
            f"use a transformer decoder ({SUPPORTED})"
        )


@dataclass(frozen=True)
class ModelFingerprint:
    """Attention geometry and identity of a causal LM, read from its config.

    ``config_hash`` hashes the architecture fields of the config (not the weights), so a file
    calibrated on one checkpoint fits a fine-tune of the same architecture, but not a
    different model that happens to share head counts.
    """

    model_type: str
    name_or_path: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    config_hash: str

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ModelFingerprint":
        check_architecture(model.config)
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        arch = {
            k: v
            for k, v in sorted(cfg.to_dict().items())
            if k in {"model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rope_parameters",
                     "sliding_window", "layer_types", "rotary_pct", "n_embd", "n_layer", "n_head"}
        }
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cls(
            model_type=str(cfg.model_type),
            name_or_path=str(getattr(model.config, "_name_or_path", "") or ""),
            num_layers=int(cfg.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            config_hash=digest,
        )

    def differences(self, other: "ModelFingerprint") -> list[str]:
        """Human-readable mismatches that matter (the name alone does not)."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: codebooks have {a[k]!r}, model has {b[k]!r}" for k in a if k != "name_or_path" and a[k] != b[k]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "ModelFingerprint":
        return cls(**json.loads(s))
