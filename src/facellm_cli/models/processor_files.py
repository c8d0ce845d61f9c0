"""Save a processor as a hub checkpoint has it: with ``video_preprocessor_config.json``.

transformers 5 multimodal processors (InternVL, Qwen2-VL, ...) carry a video processor. A
checkpoint without its config loads only where torchvision is missing (facellm then builds
the processor image-only); wherever torchvision imports — most GPU machines, and vLLM,
which always builds the full processor — loading fails with "Can't load video processor".
facellm builds processors image-only on CPU, so every save goes through :func:`save_processor`,
which adds the video processor's config: copied from the checkpoint the processor came from
when it has one, else derived from the image processor (same size, mean, std, resampling),
as the family's own ``<Family>VideoProcessor`` would read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VIDEO_CONFIG = "video_preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"


def has_video_config(folder: str | Path) -> bool:
    """True when ``folder`` holds a video processor config (its own file, or nested in processor_config.json)."""
    root = Path(folder)
    if (root / VIDEO_CONFIG).is_file():
        return True
    nested = root / PROCESSOR_CONFIG
    if nested.is_file():
        try:
            return "video_processor" in json.loads(nested.read_text(encoding="utf-8"))
        except ValueError:
            return False
    return False


def _source_video_config(source: str | Path, subfolder: str | None = None) -> dict[str, Any] | None:
    """The video processor config of the checkpoint a processor was loaded from (local folder or hub cache)."""
    try:
        from transformers.utils import cached_file
    except ImportError:
        return None
    kwargs: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
    for name, key in ((VIDEO_CONFIG, None), (PROCESSOR_CONFIG, "video_processor")):
        try:
            path = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False, **kwargs)
        except OSError:
            path = None
        if not path:
            continue
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if key is None:
            return data
        if key in data:
            return dict(data[key])
    return None


def derived_video_config(processor: Any) -> dict[str, Any] | None:
    """The video processor config for ``processor``'s family, from its image processor; None when it has none."""
    import transformers

    name = type(processor).__name__
    if not name.endswith("Processor"):
        return None
    video_cls = name[: -len("Processor")] + "VideoProcessor"
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or not hasattr(transformers, video_cls):
        return None
    data = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    data["video_processor_type"] = video_cls
    data["processor_class"] = name
    return data


def save_processor(
    processor: Any, out_dir: str | Path, *, source: str | Path | None = None, subfolder: str | None = None
) -> None:
    """``processor.save_pretrained(out_dir)`` plus the video processor config hub checkpoints carry."""
    out = Path(out_dir)
    processor.save_pretrained(str(out))
    if has_video_config(out):
        return
    data = _source_video_config(source, subfolder) if source is not None else None
    if data is None:
        data = derived_video_config(processor)
    if data is not None:
        (out / VIDEO_CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
