"""The sizes of the real InternVL3-hf checkpoints, for benchmarks that need real compute with random weights.

From the config.json of OpenGVLab/InternVL3-{1B,8B}-hf: an InternViT-300M vision tower and a Qwen2.5
language model. One place, so every benchmark measures the same shapes.
"""

from __future__ import annotations

from typing import Any

SHAPES = ("internvl3-1b", "internvl3-8b")
VOCAB = 151_674
IMAGE_TOKEN_ID = 151_667

VISION_300M: dict[str, Any] = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    image_size=448,
    patch_size=14,
    use_qk_norm=False,
    layer_scale_init_value=0.1,
)
TEXT: dict[str, dict[str, Any]] = {
    "internvl3-1b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
    ),
    "internvl3-8b": dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944
    ),
}


def real_shape_config(
    shape: str,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    image_token_id: int = IMAGE_TOKEN_ID,
) -> Any:
    """An ``InternVLConfig`` with the real sizes of ``shape`` (256 image tokens per 448-px tile)."""
    from transformers import InternVLConfig

    if shape not in TEXT:
        raise ValueError(f"unknown shape '{shape}'; choose one of: {', '.join(SHAPES)}")
    return InternVLConfig(
        vision_config=dict(VISION_300M),
        text_config=dict(
            model_type="qwen2",
            vocab_size=VOCAB,
            max_position_embeddings=32768,
            rope_theta=1e6,
            tie_word_embeddings=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            bos_token_id=None,
            **TEXT[shape],
        ),
        image_token_id=image_token_id,
        image_seq_length=256,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
