"""One round trip per step (``specbeam_vllm.draft_handoff``): the engine core's
``take_draft_token_ids`` is answered from the output of the same step (returned by ``sample_tokens``
or, where the worker sampled inside ``execute_model``, by that), never from an older one, and falls
back to vLLM's round trip whenever the output did not carry drafts; the worker samples inside
``execute_model`` only where the engine core would send ``sample_tokens(None)`` next."""

from __future__ import annotations

import pickle
import types
from concurrent.futures import Future

import pytest

from vllm_support import require_vllm

require_vllm()

from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds, ModelRunnerOutput  # noqa: E402

from specbeam_vllm import draft_handoff  # noqa: E402
from specbeam_vllm.draft_handoff import ATTR, attach_drafts, samples_in_execute  # noqa: E402


class FakeExecutor:
    """The three executor calls of a sync engine step; counts the draft round trips."""

    def __init__(self):
        self.round_trips = 0
        self.worker_drafts = None  # what the worker's take_draft_token_ids would answer
        self.next_output = None
        self.execute_result = None  # what execute_model returns (None: sample_tokens follows)
        self.vllm_config = types.SimpleNamespace(max_concurrent_batches=1)

    def execute_model(self, scheduler_output, non_block=False):
        return self.execute_result

    def sample_tokens(self, grammar_output, non_block=False):
        return self.next_output

    def take_draft_token_ids(self):
        self.round_trips += 1
        return self.worker_drafts


@pytest.fixture()
def executor():
    cls = type("WrappedFakeExecutor", (FakeExecutor,), {})
    draft_handoff._wrap(cls)
    return cls()


def output_with(drafts):
    out = ModelRunnerOutput(req_ids=list(drafts.req_ids) if drafts else [], req_id_to_index={})
    setattr(out, ATTR, drafts)
    return out


def step(ex, output):
    ex.execute_model(object())
    ex.next_output = output
    ex.sample_tokens(None)
    return ex.take_draft_token_ids()


def test_drafts_come_with_the_output_without_a_round_trip(executor):
    drafts = DraftTokenIds(["a", "b"], [[5, 6, 7], []])
    assert step(executor, output_with(drafts)) is drafts
    assert executor.round_trips == 0
    none_drafted = output_with(None)  # the worker had no drafts this step: None, still no round trip
    assert step(executor, none_drafted) is None
    assert executor.round_trips == 0


def test_without_attached_drafts_vllms_round_trip_answers(executor):
    executor.worker_drafts = DraftTokenIds(["a"], [[1]])
    plain = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    assert step(executor, plain) is executor.worker_drafts
    assert executor.round_trips == 1
    future = Future()  # a non-blocking call (batch queue): no attribute to read, the round trip answers
    assert step(executor, future) is executor.worker_drafts
    assert executor.round_trips == 2


def test_drafts_of_an_earlier_step_are_never_served_again(executor):
    old = DraftTokenIds(["a"], [[9, 9]])
    step(executor, output_with(old))
    executor.worker_drafts = DraftTokenIds(["a"], [[3]])
    # a step whose output came straight from execute_model (no sample_tokens call)
    executor.execute_model(object())
    assert executor.take_draft_token_ids() is executor.worker_drafts
    # taken once: a second take in the same step asks the worker
    step(executor, output_with(old))
    assert executor.take_draft_token_ids() is executor.worker_drafts
    assert executor.round_trips == 2


def test_drafts_of_a_step_sampled_inside_execute_model(executor):
    drafts = DraftTokenIds(["a"], [[2, 3]])
    executor.execute_result = output_with(drafts)  # EngineCore.step sends no sample_tokens then
    executor.execute_model(object())
    assert executor.take_draft_token_ids() is drafts
    future = Future()  # the non-blocking call EngineCore.step makes, resolved before post_step
    future.set_result(output_with(drafts))
    executor.execute_result = future
    executor.execute_model(object())
    assert executor.take_draft_token_ids() is drafts
    assert executor.round_trips == 0
    pending = Future()  # not resolved: nothing to read, vLLM's round trip answers
    executor.execute_result = pending
    executor.execute_model(object())
    assert executor.take_draft_token_ids() is executor.worker_drafts
    assert executor.round_trips == 1


def test_with_a_batch_queue_vllms_round_trip_answers(executor):
    executor.vllm_config.max_concurrent_batches = 2  # pipeline parallelism: steps overlap
    executor.worker_drafts = DraftTokenIds(["a"], [[1]])
    assert step(executor, output_with(DraftTokenIds(["a"], [[7]]))) is executor.worker_drafts
    assert executor.round_trips == 1


@pytest.mark.parametrize("change, merges", [
    ({}, True),
    ({"structured": True}, False),  # the engine core sends a grammar bitmask with sample_tokens
    ({"pending": False}, False),  # no forward awaiting sampling
    ({"async_scheduling": True}, False),
    ({"batches": 2}, False),  # pipeline parallelism's batch queue
    ({"kv_transfer": object()}, False),
])
def test_worker_samples_inside_execute_only_where_the_engine_would_ask_next(change, merges):
    opts = {"structured": False, "pending": True, "async_scheduling": False, "batches": 1, "kv_transfer": None,
            **change}
    runner = types.SimpleNamespace(
        execute_model_state=("state",) if opts["pending"] else None,
        use_async_scheduling=opts["async_scheduling"],
        vllm_config=types.SimpleNamespace(max_concurrent_batches=opts["batches"],
                                          kv_transfer_config=opts["kv_transfer"], ec_transfer_config=None))
    scheduler_output = types.SimpleNamespace(has_structured_output_requests=opts["structured"])
    assert samples_in_execute(runner, scheduler_output) is merges


def test_attached_drafts_survive_the_message_queue_pickle():
    class Runner:
        def take_draft_token_ids(self):
            return DraftTokenIds(["r1", "r2"], [[4, 5], [6]])

    out = ModelRunnerOutput(req_ids=["r1", "r2"], req_id_to_index={"r1": 0, "r2": 1})
    attach_drafts(Runner(), out)
    back = pickle.loads(pickle.dumps(out))
    assert getattr(back, ATTR).draft_token_ids == [[4, 5], [6]]
    assert getattr(back, ATTR).req_ids == ["r1", "r2"]


def test_the_shared_empty_output_is_never_touched():
    class Runner:
        def take_draft_token_ids(self):
            raise AssertionError("no drafts are read for the empty output")

    attach_drafts(Runner(), EMPTY_MODEL_RUNNER_OUTPUT)
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, ATTR)


def test_engine_side_wraps_vllms_executors():
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    assert draft_handoff.install_engine_side()
    assert draft_handoff.install_engine_side()  # idempotent: wrapped once
    assert MultiprocExecutor.take_draft_token_ids.__wrapped__.__qualname__ == "MultiprocExecutor.take_draft_token_ids"
