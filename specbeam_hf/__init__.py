"""specbeam_hf: HuggingFace causal LMs through specbeam_core, and ``generate`` integration.

    out = target.generate(**inputs, custom_generate=specbeam_hf.generate,
                          assistant=specbeam_hf.SpecBeam(draft, num_draft_tokens=4), max_new_tokens=64)
"""

from .assistant import SpecBeam
from .generate import generate
from .runner import HFCausalLM, PagedCache

__all__ = ["HFCausalLM", "PagedCache", "SpecBeam", "generate"]
