"""specbeam in a real vLLM server on a model family other than the demo pair's llama.

A small Qwen2 target (grouped-query attention: 4 query heads over 2 key/value heads, untied
embeddings, attention biases) and a draft made from it with perturbed weights, both built here from
random weights and saved with ``save_pretrained``: vLLM serves the target and loads the draft.
Greedy outputs must equal a spec-off server's under concurrency, with drafts both accepted and
rejected.
"""

from __future__ import annotations

import pytest
import torch

from vllm_support import COMMON_FLAGS, completion, require_vllm, run_all, token_ids

require_vllm()

from specbeam_vllm.server import Server, spec_metrics, specbeam_flags  # noqa: E402

from conftest import DEMO_DIR  # noqa: E402

PROMPTS = ["def fibonacci(n):\n", "The old man walked", "import os\nimport sys\n", "Once upon a time",
           "class Stack:\n    def __init__(self):\n", "In the morning the", "She said that", "for i in range("]
MAX_TOKENS = 32


pytestmark = pytest.mark.slow  # starts vLLM servers: not in the quick tier (-m "not slow")


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    target = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(4.0)  # peaked logits: greedy choices that bf16 rounding does not flip
    draft = Qwen2ForCausalLM(config).eval()
    draft.load_state_dict(target.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=gen))  # greedy agreement about 2 in 3
    paths = {}
    for name, model in (("target", target), ("draft", draft)):
        paths[name] = str(root / name)
        model.to(torch.bfloat16).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def greedy(url: str, prompt: str) -> list[int]:
    return token_ids(completion(url, prompt, MAX_TOKENS))


def test_qwen2_greedy_equals_spec_off_under_concurrency(qwen_pair, tmp_path):
    prompts = PROMPTS + PROMPTS[::-1]
    with Server(qwen_pair["target"], COMMON_FLAGS, log_path=str(tmp_path / "spec-off.log")) as server:
        reference = {p: greedy(server.url, p) for p in PROMPTS}
    flags = specbeam_flags(qwen_pair["draft"], 4, adaptive_draft_length=False)
    with Server(qwen_pair["target"], flags + COMMON_FLAGS, log_path=str(tmp_path / "specbeam.log")) as server:
        outputs = run_all(lambda p: greedy(server.url, p), prompts, concurrency=8)
        metrics = spec_metrics(server.url)
    for prompt, ids in zip(prompts, outputs):
        assert ids == reference[prompt], prompt
    assert 0 < metrics["accepted_tokens"] < metrics["draft_tokens"], metrics  # both paths ran
