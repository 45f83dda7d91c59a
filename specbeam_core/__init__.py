"""specbeam_core: framework-agnostic speculative (beam) decoding over plain torch tensors.

Imports only torch, numpy and pluggy.
"""

from .beam_search import BeamStats, BeamTreeDrafter, PrefixIndex, SpecBeamSearch
from .beam_state import BeamSearchState
from .draft_length import AdaptiveDraftLength
from .drafting import Draft, Drafter, DraftModelDrafter, TreeDrafter
from .engine import SpecEngine
from .hookspecs import hookimpl, hookspec
from .kv_cache import KVCacheExhausted, PagedKVCache
from .model import CausalLM, KVBatch, PackedRows, build_kv_batch, build_packed_kv_batch, forward_rows, pack_is_cheaper
from .plugins import get_plugin_manager, make_drafter
from .prompt_lookup import PromptLookupDrafter, lookup_drafts
from .request import Request
from .sampling import SamplingParams, probabilities, warp_logits
from .stats import SpecStats, StepRecord
from .tree import TokenTree
from .verification import VerifyResult, verify_greedy, verify_rejection_sampling
from .vocab import VocabResizedDraft

__all__ = [
    "AdaptiveDraftLength",
    "BeamSearchState",
    "BeamStats",
    "BeamTreeDrafter",
    "PrefixIndex",
    "SpecBeamSearch",
    "TokenTree",
    "TreeDrafter",
    "CausalLM",
    "Draft",
    "DraftModelDrafter",
    "Drafter",
    "KVBatch",
    "KVCacheExhausted",
    "PagedKVCache",
    "PromptLookupDrafter",
    "Request",
    "SamplingParams",
    "SpecEngine",
    "SpecStats",
    "StepRecord",
    "VerifyResult",
    "VocabResizedDraft",
    "build_kv_batch",
    "build_packed_kv_batch",
    "PackedRows",
    "forward_rows",
    "pack_is_cheaper",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "lookup_drafts",
    "make_drafter",
    "probabilities",
    "verify_greedy",
    "verify_rejection_sampling",
    "warp_logits",
]
