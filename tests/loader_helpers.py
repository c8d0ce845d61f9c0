"""Checkpoints laid out like the hub's, made from a tiny model but not by our own save path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def hub_style_internvl(src: Path, repo: Path) -> Path:
    """Copy a tiny InternVL into ``repo/model`` with the file layout of OpenGVLab/InternVL3-*-hf and Idiap/FaceLLM-*.

    Those repos keep the image processor in preprocessor_config.json naming the
    torchvision-backed ``GotOcr2ImageProcessorFast``, a separate
    video_preprocessor_config.json for ``InternVLVideoProcessor``, and a slim
    processor_config.json: exactly what makes a plain AutoProcessor fail
    without torchvision.
    """
    dst = repo / "model"
    shutil.copytree(src, dst)
    proc = json.loads((dst / "processor_config.json").read_text())
    image = proc.pop("image_processor")
    image.update({"image_processor_type": "GotOcr2ImageProcessorFast", "processor_class": "InternVLProcessor"})
    (dst / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (dst / "video_preprocessor_config.json").write_text(
        json.dumps(
            {
                "video_processor_type": "InternVLVideoProcessor",
                "processor_class": "InternVLProcessor",
                "do_resize": True,
            }
        )
    )
    (dst / "processor_config.json").write_text(
        json.dumps({"image_seq_length": proc["image_seq_length"], "processor_class": "InternVLProcessor"})
    )
    return repo


def hub_style_qwen2_vl(src: Path, repo: Path) -> Path:
    """The Qwen/Qwen2-VL-*-Instruct layout: fast image processor + video processor configs."""
    shutil.copytree(src, repo)
    proc = json.loads((repo / "processor_config.json").read_text())
    image = proc.pop("image_processor")
    image.update({"image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen2VLProcessor"})
    (repo / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (repo / "video_preprocessor_config.json").write_text(
        json.dumps({"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor"})
    )
    (repo / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    return repo
