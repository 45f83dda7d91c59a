"""specbeam_hf: HuggingFace causal LMs through specbeam_core, and ``generate`` integration.

    out = target.generate(**inputs, custom_generate=specbeam_hf.generate,
                          assistant=specbeam_hf.SpecBeam(draft, num_draft_tokens=4), max_new_tokens=64)

The exports load on first use, so importing the package (or the ``specbeam`` command line in
:mod:`specbeam_hf.app`) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["HFCausalLM", "PagedCache", "SpecBeam", "generate"]
_EXPORTS = {"SpecBeam": ".assistant", "HFCausalLM": ".runner", "PagedCache": ".runner", "generate": ".generate"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """``specbeam_hf.generate`` names both a submodule and its function; the attribute always means the
    function (the one ``custom_generate=`` takes), also after the submodule is imported."""

    @property
    def generate(self):
        return importlib.import_module(".generate", __name__).generate

    @generate.setter
    def generate(self, value) -> None:  # the import system binds the submodule here when it loads
        pass


sys.modules[__name__].__class__ = _Package
