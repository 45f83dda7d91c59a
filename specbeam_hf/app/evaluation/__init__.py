"""Evaluation of the decoding modes on the demo pair (``specbeam evaluate``).

One module per job: ``task`` (prompts + references from held-out text), ``modes`` (running greedy,
beam, speculative, speculative beam and tree decoding), ``metrics`` (perplexity, BLEU/ROUGE,
distinct-n, self-BLEU), ``runner`` (one run, JSON), ``plots`` (PNGs), ``report`` (tables),
``tracking`` (optional offline Weights & Biases), ``config`` (options).
"""

from .config import EvalConfig
from .modes import MODES, ModeSpec
from .runner import evaluate

__all__ = ["EvalConfig", "MODES", "ModeSpec", "evaluate"]
