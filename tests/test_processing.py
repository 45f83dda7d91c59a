"""Logits processors over many positions at once (``specbeam_core.processing``): a batch processor
shared by the requests is called once for all the positions a pass processes (each draft position,
then the target's), and gives the same tokens as the same processor called position by position and
as plain greedy decoding with it. Likewise a ``batch_stop`` judges a step's tokens of every row in one
call, and the rows stop where their ``stop`` alone stops them."""

from __future__ import annotations

import pytest
import torch

from conftest import make_pair
from specbeam_core import DraftModelDrafter, SamplingParams, SpecEngine, get_plugin_manager, make_drafter
from specbeam_hf import HFCausalLM

PROMPTS = [[5, 17, 42, 8, 33], [7, 7, 9], [60, 2, 11, 23, 40, 41, 3]]


def penalty(context: list[int], logits: torch.Tensor) -> torch.Tensor:
    """A processor that depends on the context: every token seen so far loses 3 (and the length matters)."""
    out = logits.clone()  # [1, vocab]
    out[0, sorted(set(context))] -= 3.0
    out[0, len(context) % out.shape[-1]] += 0.5
    return out


class CountingBatch:
    """The same processor over many positions at once, counting its calls."""

    def __init__(self) -> None:
        self.calls, self.positions = 0, 0

    def __call__(self, requests, contexts, logits):
        self.calls += 1
        self.positions += len(contexts)
        return torch.cat([penalty(c, logits[e : e + 1]) for e, c in enumerate(contexts)])  # [E, vocab]


def plain_greedy(target, prompt: list[int], new: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits = target(torch.tensor([tokens])).logits[:, -1].float()  # [1, vocab]
            tokens.append(int(penalty(tokens, logits).argmax()))
    return tokens[len(prompt):]


def make_engine(drafter: str, target, draft) -> SpecEngine:
    """γ = 3 over a draft-model chain or a width-2 draft tree."""
    if drafter == "chain":
        d = DraftModelDrafter(HFCausalLM(draft))
    else:
        d = make_drafter(get_plugin_manager(), "draft_tree", model=HFCausalLM(draft), tree_width=2)
    return SpecEngine(HFCausalLM(target), d, 3)


@pytest.mark.parametrize("drafter", ["chain", "tree"])
def test_a_batch_processor_is_called_once_per_pass_position_set(drafter):
    target, draft = make_pair("llama")

    def engine():
        return make_engine(drafter, target, draft)

    one_by_one = engine().generate(PROMPTS, SamplingParams(), max_new_tokens=10, logits_processor=penalty)
    batch = CountingBatch()
    eng = engine()
    together = eng.generate(PROMPTS, SamplingParams(), max_new_tokens=10, logits_processor=penalty, batch_logits_processor=batch)
    expected = [plain_greedy(target, p, 10) for p in PROMPTS]
    assert [r.output for r in one_by_one] == [r.output for r in together] == expected
    steps = eng.stats.steps
    # chains: one call per draft position and one for the target's positions, every row in each;
    # trees draft without the processor, so one call a step
    assert batch.calls <= steps * (4 if drafter == "chain" else 1)
    assert batch.calls > 0 and batch.positions >= 2 * batch.calls  # several rows' positions in a call


class StepJudge:
    """A ``batch_stop``: judges, once per step, every token the rows are about to append (a row
    stops after a token ``% 7 == 3``), and answers the rows' ``stop`` from that."""

    def __init__(self) -> None:
        self.calls, self.judged, self.asked = 0, {}, 0

    def __call__(self, rows) -> None:
        self.calls += 1
        for request, tokens in rows:
            for j, token in enumerate(tokens):
                self.judged[(request.request_id, len(request.tokens) + j + 1)] = token % 7 == 3

    def stop_for(self, engine):
        def stop(tokens):
            self.asked += 1
            (request,) = [r for r in engine._requests.values() if r.tokens is tokens]
            return self.judged[(request.request_id, len(tokens))]
        return stop


@pytest.mark.parametrize("drafter", ["chain", "tree"])
def test_a_batch_stop_judges_each_step_once(drafter):
    target, draft = make_pair("llama")

    def engine():
        return make_engine(drafter, target, draft)

    alone = engine().generate(PROMPTS, SamplingParams(), max_new_tokens=12, stop=lambda tokens: tokens[-1] % 7 == 3)
    judge, eng = StepJudge(), engine()
    together = eng.generate(PROMPTS, SamplingParams(), max_new_tokens=12, stop=judge.stop_for(eng), batch_stop=judge)
    assert [r.output for r in together] == [r.output for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
    assert "stop" in {r.finish_reason for r in alone}  # the stop does end a row
    assert judge.calls == eng.stats.steps and judge.asked > judge.calls  # one judgement a step, asked per token
