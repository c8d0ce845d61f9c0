"""Chat-template rendering, assistant-only label masking and batching for any image-text-to-text model.

Each conversation is rendered with the checkpoint's own chat template through
its processor, so the model is trained on exactly the prompt format it sees at
inference. Labels are -100 everywhere except assistant turns (their text and
the end-of-turn token the template puts after them), found by rendering
prefixes: the template output for ``messages[:k]`` with the generation prompt
ends where assistant turn ``k`` starts, and ``messages[:k+1]`` ends where it
stops. Token positions come from re-tokenising those prefixes and checking they
are true prefixes of the full sequence, so a template or tokenizer that breaks
this assumption is an error, not silently wrong labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from ..errors import DataError
from ..images import fit_within, open_image
from .data import Sample, placeholder_mismatch_message, to_chat_messages

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage
    from transformers import BatchFeature

    from ..models.loader import Processor

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One sample ready for batching; ``tensors`` hold per-sample processor outputs."""

    id: str
    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,)
    seq_tensors: dict[str, torch.Tensor]  # other (L,) tensors: attention_mask, mm_token_type_ids...
    extra_tensors: dict[str, torch.Tensor]  # pixel_values, image_grid_thw...: concatenated on dim 0
    truncated: bool = False


@dataclass
class Dropped:
    """A sample that cannot fit ``max_length`` without cutting image tokens or all its answers."""

    id: str
    length: int
    reason: str


@dataclass
class ConversationEncoder:
    """Renders, tokenises and masks one :class:`Sample` with a model's processor."""

    processor: Processor
    max_length: int
    image_token_ids: frozenset[int]
    max_image_side: int | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"encoded": 0, "truncated": 0, "dropped": 0})

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        return cast(str, text)  # tokenize=False renders text (the tokenizer's signature also covers token ids)

    def _tokenize(self, text: str, images: list[PILImage.Image]) -> BatchFeature:
        batch = self.processor(text=[text], images=images or None, return_tensors="pt")
        batch.pop("token_type_ids", None)
        return batch

    def _prefix_ids(
        self, text: str, images: list[PILImage.Image], full_text: str, full_ids: torch.Tensor
    ) -> torch.Tensor:
        """Token ids of a rendered prefix (its images expanded by the processor)."""
        if text == full_text:
            return full_ids
        return self._tokenize(text, images)["input_ids"][0]

    def encode(self, sample: Sample) -> Encoded | Dropped:
        if sample.placeholder_count != len(sample.images):
            raise DataError(
                placeholder_mismatch_message(sample.id, sample.source, sample.placeholder_count, len(sample.images))
            )
        messages = to_chat_messages(sample)
        images = [fit_within(open_image(p), self.max_image_side) for p in sample.images]
        full_text = self.render(messages, generation_prompt=False)
        batch = self._tokenize(full_text, images)
        ids = batch["input_ids"][0]
        self._check_images_kept(sample, images, ids)
        labels = self._assistant_labels(sample, messages, images, full_text, ids)
        seq, extra = _split_tensors(batch)
        truncated = False
        if len(ids) > self.max_length:
            reason = self._drop_reason(ids, labels)
            if reason is not None:
                self.stats["dropped"] += 1
                return Dropped(sample.id, len(ids), reason)
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            seq = {k: v[: self.max_length] for k, v in seq.items()}
            truncated = True
            self.stats["truncated"] += 1
        self.stats["encoded"] += 1
        return Encoded(sample.id, ids, labels, seq, extra, truncated)

    def _check_images_kept(self, sample: Sample, images: list[PILImage.Image], ids: torch.Tensor) -> None:
        n_image_tokens = int(sum((ids == t).sum() for t in self.image_token_ids)) if self.image_token_ids else 0
        if images and self.image_token_ids and n_image_tokens == 0:
            raise DataError(
                f"record '{sample.id}' ({sample.source}): the chat template dropped its images; "
                "check the model's chat template"
            )

    def _assistant_labels(
        self,
        sample: Sample,
        messages: list[dict[str, Any]],
        images: list[PILImage.Image],
        full_text: str,
        ids: torch.Tensor,
    ) -> torch.Tensor:
        """``ids`` at the assistant turns' positions, IGNORE_INDEX elsewhere."""
        import torch

        labels = torch.full_like(ids, IGNORE_INDEX)
        images_before = 0
        for k, msg in enumerate(messages):
            if msg["role"] == "assistant":
                start, end = self._turn_span(sample, messages, k, images[:images_before], full_text, ids)
                labels[start:end] = ids[start:end]
            images_before += sum(1 for part in msg["content"] if part.get("type") == "image")
        return labels

    def _turn_span(
        self,
        sample: Sample,
        messages: list[dict[str, Any]],
        k: int,
        images: list[PILImage.Image],
        full_text: str,
        ids: torch.Tensor,
    ) -> tuple[int, int]:
        """Where assistant turn ``k`` starts and ends in ``ids``, from the token ids of the rendered prefixes."""
        import torch

        start_text = self.render(messages[:k], generation_prompt=True)
        end_text = self.render(messages[: k + 1], generation_prompt=False)
        if not (full_text.startswith(start_text) and full_text.startswith(end_text)):
            raise DataError(
                f"record '{sample.id}': the chat template does not render turn {k} as a prefix of the whole "
                "conversation, so assistant tokens cannot be located; use a template without history rewriting"
            )
        start_ids = self._prefix_ids(start_text, images, full_text, ids)
        end_ids = self._prefix_ids(end_text, images, full_text, ids)
        start, end = len(start_ids), len(end_ids)
        if end > len(ids) or not (torch.equal(end_ids, ids[:end]) and torch.equal(start_ids, ids[:start])):
            raise DataError(
                f"record '{sample.id}': tokenising the conversation up to assistant turn {k} does not give a "
                "prefix of the full token sequence (tokenizer merges across turns); cannot mask labels safely"
            )
        return start, end

    def _drop_reason(self, ids: torch.Tensor, labels: torch.Tensor) -> str | None:
        """Why a sample longer than ``max_length`` cannot be truncated to it (None when it can)."""
        import torch

        image_pos: torch.Tensor | list[int] = (
            torch.nonzero(torch.isin(ids, torch.tensor(sorted(self.image_token_ids)))).flatten()
            if self.image_token_ids
            else []
        )
        last_image = int(image_pos[-1]) if len(image_pos) else -1
        if last_image >= self.max_length:
            return f"its image tokens end at position {last_image + 1}"
        # position i predicts label i+1, so a kept answer token needs a kept position before it
        if not bool((labels[1 : self.max_length] != IGNORE_INDEX).any()):
            return "no answer token would remain"
        return None


def _split_tensors(batch: BatchFeature) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The processor's outputs besides input_ids: per-token (L,) tensors, and the rest (pixel values...)."""
    seq = {
        k: v[0]
        for k, v in batch.items()
        if k != "input_ids" and hasattr(v, "dim") and v.dim() == 2 and v.shape == batch["input_ids"].shape
    }
    extra = {k: v for k, v in batch.items() if k != "input_ids" and k not in seq}
    return seq, extra


class ConversationDataset:
    """A map-style dataset that encodes lazily (so dataloader workers do the image work).

    With ``cache=True`` each sample is encoded once and kept in memory (pixel
    values included), so later epochs skip image decoding, chat-template
    rendering and tokenisation. In dataloader worker processes each worker keeps
    its own cache (the Trainer keeps workers alive across epochs for this).
    """

    def __init__(self, samples: list[Sample], encoder: ConversationEncoder, *, cache: bool = False) -> None:
        self.samples = samples
        self.encoder = encoder
        self.cache: dict[int, Encoded | Dropped] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Encoded | Dropped:
        if self.cache is None:
            return self.encoder.encode(self.samples[i])
        item = self.cache.get(i)
        if item is None:
            item = self.cache[i] = self.encoder.encode(self.samples[i])
        return item


@dataclass
class Collator:
    """Right-pads a list of encoded samples into one batch; dropped samples are counted and left out."""

    pad_token_id: int
    dropped: list[Dropped] = field(default_factory=list)
    on_drop: Callable[[Dropped], None] | None = None  # called with each Dropped (for logging)

    def __call__(self, items: list[Encoded | Dropped]) -> dict[str, Any]:
        import torch

        kept = [x for x in items if isinstance(x, Encoded)]
        for x in items:
            if isinstance(x, Dropped):
                self.dropped.append(x)
                if self.on_drop is not None:
                    self.on_drop(x)
        if not kept:
            ids = ", ".join(f"'{d.id}' ({d.length} tokens)" for d in items if isinstance(d, Dropped))
            raise DataError(
                "every sample in a batch is longer than the max sequence length and cannot be truncated safely: "
                f"{ids}; raise data.max_seq_length or lower data.max_image_side"
            )
        width = max(len(x.input_ids) for x in kept)

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - len(t)), value=value)

        batch: dict[str, Any] = {
            "input_ids": torch.stack([pad(x.input_ids, self.pad_token_id) for x in kept]),
            "labels": torch.stack([pad(x.labels, IGNORE_INDEX) for x in kept]),
        }
        for key in kept[0].seq_tensors:
            batch[key] = torch.stack([pad(x.seq_tensors[key], 0) for x in kept])
        for key in kept[0].extra_tensors:
            batch[key] = torch.cat([x.extra_tensors[key] for x in kept], dim=0)
        batch["sample_ids"] = [x.id for x in kept]
        return batch


def image_token_ids(model: torch.nn.Module, processor: Processor) -> frozenset[int]:
    """Token ids that stand for image features (never cut by truncation)."""
    ids: set[int] = set()
    conf = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index", "video_token_id"):
        value = getattr(conf, name, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    token = getattr(processor, "image_token", None)
    tok = getattr(processor, "tokenizer", None)
    if token and tok is not None:
        tid = tok.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id:
            ids.add(tid)
    return frozenset(ids)
