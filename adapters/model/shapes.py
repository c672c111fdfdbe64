"""Model shapes from real architecture configs (sizes as in each model's config.json), built without a download.

Used by the benchmark (random-initialised models of these shapes) and by the planner (a config when the hub cannot
be reached).
"""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
_TINY = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters=_LLAMA3_ROPE,
            hidden_act="silu",
        ),
    ),
    "llama-3.1-8b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters={**_LLAMA3_ROPE, "factor": 8.0},
            hidden_act="silu",
        ),
    ),
    "qwen2.5-1.5b": (
        "qwen2",
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            hidden_act="silu",
        ),
    ),
    "gemma-3-270m": (
        "gemma3_text",
        dict(
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=262144,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            sliding_window=512,
        ),
    ),
    # CPU shapes: Llama/Qwen2 blocks, small enough for a CI run of a few steps on two cores
    "tiny-llama": ("llama", _TINY),
    "tiny-qwen2": ("qwen2", _TINY),
}


def known_config(name: str, **extra: Any) -> dict[str, Any]:
    """``{"model_type": ..., **sizes, **extra}`` for ``AutoConfig.for_model``."""
    kind, kw = ARCHS[name]
    return {"model_type": kind, **kw, **extra}
