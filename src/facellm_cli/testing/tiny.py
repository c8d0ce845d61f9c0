"""Build randomly initialised, few-MB checkpoints of real VLM families, fully offline.

Each model uses the real transformers config/model/processor classes with
shrunken sizes, a byte-level BPE tokenizer trained here on a face-description
corpus, and a chat template in the family's own format. It is saved with
``save_pretrained`` so it loads back through ``load_model_and_processor``
exactly like a hub checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FacellmError
from ..models.loader import image_only_class, require_model_extras
from ..models.processor_files import save_processor

FAMILIES = ("internvl", "qwen2_vl")

# Words the tiny tokenizer should know as whole tokens: face-description vocabulary,
# option letters and digits, so short answers are a few tokens.
_CORPUS = """
The person in this face image is smiling. The expression is neutral. The person is frowning.
What is the facial expression of the person? Answer with the option's letter from the given choices directly.
(A) smiling (B) neutral (C) frowning (D) surprised. The answer is A. The answer is B. The answer is C. The answer is D.
Are the eyes open or closed? The eyes are open. The eyes are closed. Is the person wearing glasses? Yes. No.
Is the head tilted? The head is tilted to the left. The head is tilted to the right. The head is upright.
Describe the demographic attributes: age, gender and race. A young adult woman of East Asian ethnicity, 20-29 years old.
A man of White ethnicity, 40-49 years old. A girl of Black ethnicity. A boy of Indian ethnicity. Latino Hispanic. Middle Eastern. Southeast Asian.
Facial structure: oval face, high cheekbones, strong jawline, narrow chin, broad forehead, straight nose, full lips.
Skin texture: smooth skin, visible pores, wrinkles, freckles, even skin tone, light skin, dark skin, medium skin tone.
Lighting and image quality: soft frontal lighting, shadows, overexposed, blurry, sharp, low resolution, high quality, background colour.
Face pose: frontal view, profile, yaw, pitch, roll, looking at the camera. Forensic considerations: identifying marks, scars, tattoos.
Detailed description of the face image. 0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 yes no true false real fake spoof live
"""


def _require_tokenizers() -> None:
    require_model_extras("building a tiny model")


def _train_tokenizer(specials: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [ln.strip() for ln in _CORPUS.strip().splitlines() if ln.strip()]
    tok.train_from_iterator(lines * 4, trainer)
    return tok


# Chat templates written for the tiny models in each family's prompt format (ChatML for
# both); images become the family's placeholder, which the processor expands.
_CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- IMAGE -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _chat_template(image_markup: str) -> str:
    return _CHATML.replace("IMAGE", repr(image_markup))


@dataclass(frozen=True)
class TinySizes:
    """The shape of a tiny model (``build_tiny_model``'s size arguments)."""

    image_size: int
    patch_size: int
    text_hidden: int
    vision_hidden: int
    layers: int
    vocab_size: int
    text_init_std: float


def _text_config(tok: Any, z: TinySizes) -> dict[str, Any]:
    """Qwen2-style language model sizes shared by every tiny family."""
    return dict(
        vocab_size=len(tok),
        hidden_size=z.text_hidden,
        intermediate_size=z.text_hidden * 2,
        num_hidden_layers=z.layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=z.text_init_std,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )


def _hf_tokenizer(tok: Any, extra: dict[str, str]) -> Any:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra,
        padding_side="left",
        model_max_length=2048,
    )
    return hf


def _build_internvl(z: TinySizes) -> tuple[Any, Any]:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = _hf_tokenizer(
        _train_tokenizer(specials, z.vocab_size),
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    grid = z.image_size // z.patch_size
    seq = (grid // 2) ** 2  # pixel shuffle with downsample ratio 0.5
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": z.image_size, "width": z.image_size}, crop_to_patches=False, min_patches=1, max_patches=1
    )
    processor = image_only_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=seq,
        chat_template=_chat_template("<IMG_CONTEXT>\n"),
    )
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=z.vision_hidden,
            num_hidden_layers=z.layers,
            num_attention_heads=2,
            intermediate_size=z.vision_hidden * 2,
            image_size=z.image_size,
            patch_size=z.patch_size,
        ),
        text_config=dict(model_type="qwen2", **_text_config(tok, z)),
        image_token_id=tok.context_image_token_id,
        image_seq_length=seq,
        downsample_ratio=0.5,
    )
    return InternVLForConditionalGeneration(config), processor


def _build_qwen2_vl(z: TinySizes) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = _hf_tokenizer(
        _train_tokenizer(specials, z.vocab_size), {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    )
    pixels = z.image_size * z.image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=z.patch_size,
        merge_size=2,
        temporal_patch_size=2,
    )
    processor = image_only_class(Qwen2VLProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=_chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    head_dim = z.text_hidden // 2
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=z.layers,
            embed_dim=z.vision_hidden,
            hidden_size=z.text_hidden,
            num_heads=2,
            mlp_ratio=2,
            patch_size=z.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=dict(
            **_text_config(tok, z),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
            },
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    return Qwen2VLForConditionalGeneration(config), processor


_BUILDERS = {"internvl": _build_internvl, "qwen2_vl": _build_qwen2_vl}


def build_tiny_model(
    out_dir: str | Path,
    family: str = "internvl",
    *,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 8,
    text_hidden: int = 64,
    vision_hidden: int = 32,
    layers: int = 2,
    vocab_size: int = 600,
    text_init_std: float = 0.02,
) -> Path:
    """Create and save a tiny random model of ``family``; return its folder.

    ``text_init_std`` is the language model's weight-init standard deviation
    (transformers' ``initializer_range``, 0.02 in real checkpoints).
    """
    if family not in _BUILDERS:
        raise FacellmError(f"unknown tiny-model family '{family}'; choose one of: {', '.join(FAMILIES)}")
    if image_size % (2 * patch_size):
        raise FacellmError(f"image_size {image_size} must be a multiple of 2 x patch_size ({2 * patch_size})")
    _require_tokenizers()
    import torch

    out = Path(out_dir)
    torch.manual_seed(seed)
    sizes = TinySizes(image_size, patch_size, text_hidden, vision_hidden, layers, vocab_size, text_init_std)
    model, processor = _BUILDERS[family](sizes)
    gen = model.generation_config
    gen.eos_token_id = processor.tokenizer.eos_token_id
    gen.pad_token_id = processor.tokenizer.pad_token_id
    gen.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(processor, out)  # with video_preprocessor_config.json, as hub checkpoints have
    return out
