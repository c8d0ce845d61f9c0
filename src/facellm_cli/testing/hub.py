"""Checkpoints laid out like the hub's, made from a tiny model but not by our own save path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _split_processor_config(folder: Path, image_type: str, video_type: str, processor_class: str) -> None:
    """Rewrite our single processor_config.json into the hub's three files.

    Hub repos keep the image processor in preprocessor_config.json naming the
    torchvision-backed fast class, a separate video_preprocessor_config.json,
    and a slim processor_config.json: exactly what makes a plain AutoProcessor
    fail without torchvision.
    """
    proc = json.loads((folder / "processor_config.json").read_text())
    image = proc.pop("image_processor")
    image.update({"image_processor_type": image_type, "processor_class": processor_class})
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    video = {"video_processor_type": video_type, "processor_class": processor_class, "do_resize": True}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video))
    slim = {k: v for k, v in proc.items() if k == "image_seq_length"}
    (folder / "processor_config.json").write_text(json.dumps({**slim, "processor_class": processor_class}))


def hub_style_internvl(src: Path, repo: Path) -> Path:
    """The layout of OpenGVLab/InternVL3-*-hf, inside a model/ subfolder as in Idiap/FaceLLM-*."""
    shutil.copytree(src, repo / "model")
    _split_processor_config(repo / "model", "GotOcr2ImageProcessorFast", "InternVLVideoProcessor", "InternVLProcessor")
    return repo


def hub_style_qwen2_vl(src: Path, repo: Path) -> Path:
    """The layout of Qwen/Qwen2-VL-*-Instruct."""
    shutil.copytree(src, repo)
    _split_processor_config(repo, "Qwen2VLImageProcessorFast", "Qwen2VLVideoProcessor", "Qwen2VLProcessor")
    return repo
