"""The shipped demo pair, loaded the way users load it (``from_pretrained`` on the folders).

float32: token for token equal to ``target.generate``. bfloat16: equal up to, at most, a divergence
where the target's own top-2 logits are within rounding of each other (a batched verification and a
one-token decode reduce in different orders).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import specbeam_hf
from conftest import DEMO_DIR, assert_pools_free
from test_bf16 import assert_beam_search_up_to_rounding, assert_equal_up_to_near_ties

PROMPTS = [
    "def fibonacci(n):\n",
    "class Stack:\n    def __init__(self):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "    if not isinstance(value, int):\n        raise",
]


pytestmark = pytest.mark.slow  # the demo pair at length, minutes: not in the quick tier (-m "not slow")


def load(dtype, device: str = "cpu"):
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target", padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=dtype).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "draft", dtype=dtype).to(device).eval()
    return tok, target, draft


@pytest.fixture(scope="module")
def demo_fp32():
    return load(torch.float32)


def test_demo_pair_shares_a_vocabulary(demo_fp32):
    tok, target, draft = demo_fp32
    assert AutoTokenizer.from_pretrained(DEMO_DIR / "draft").get_vocab() == tok.get_vocab()
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"], skip_special_tokens=True) == "def f(x):\n    return x"


@pytest.mark.parametrize("gamma", [3, 6])
@pytest.mark.parametrize("prompts", [PROMPTS[1:2], PROMPTS], ids=["batch1", "batch4"])
def test_demo_pair_float32_greedy_is_exact(demo_fp32, prompts, gamma):
    tok, target, draft = demo_fp32
    enc = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(**enc, max_new_tokens=40, do_sample=False)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=gamma)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert torch.equal(out, ref), tok.batch_decode(out)
    stats = assistant.last_stats
    assert stats.mean_accepted_length > 1.3, stats.summary()  # the draft really helps on its own pair
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


def test_demo_pair_bf16_greedy_up_to_near_ties():
    tok, target, draft = load(torch.bfloat16)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    width = enc["input_ids"].shape[1]
    kwargs = dict(**enc, max_new_tokens=40, do_sample=False)
    ref = target.generate(return_dict_in_generate=True, output_scores=True, **kwargs)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    report = assert_equal_up_to_near_ties(out, ref, width, target=target, attention_mask=enc["attention_mask"])
    assert report.positions == 40 * len(PROMPTS)
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


@pytest.mark.parametrize("num_beams, prompts", [(2, PROMPTS), (4, PROMPTS[2:])], ids=["beams2", "beams4"])
def test_demo_pair_bf16_beam_search_up_to_rounding(num_beams, prompts):
    """bf16 beam search on the demo pair, every step of every running beam teacher-forced against HF's
    forward (``test_bf16.assert_beam_search_up_to_rounding``), with EOS and a length penalty."""
    tok, target, draft = load(torch.bfloat16)
    enc = tok(prompts, return_tensors="pt", padding=True)
    new = 24
    kwargs = dict(**enc, max_new_tokens=new, do_sample=False, num_beams=num_beams, num_return_sequences=num_beams,
                  length_penalty=0.8, return_dict_in_generate=True, output_scores=True, pad_token_id=tok.pad_token_id)
    assistant = specbeam_hf.SpecBeam(draft, beam_adaptive=False)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    compared = assert_beam_search_up_to_rounding(out, target=target, input_ids=enc["input_ids"],
                                                 attention_mask=enc["attention_mask"], num_beams=num_beams,
                                                 max_new_tokens=new, length_penalty=0.8)
    assert compared >= len(prompts) * num_beams * (len(out.scores) - 1)
    assert assistant.last_beam_stats.steps_per_target_forward > 1.0  # the trees covered several steps a pass
    assert_pools_free(assistant.beam_searcher_for(target).cache, assistant._beam_drafter.cache)


def test_demo_pair_sampling_runs_seeded_and_reproducibly(demo_fp32):
    tok, target, draft = demo_fp32
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    assistant = specbeam_hf.SpecBeam(draft, num_draft_tokens=4)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(
            target.generate(**enc, max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.95,
                            custom_generate=specbeam_hf.generate, assistant=assistant)
        )
    assert torch.equal(outs[0], outs[1])
    assert assistant.last_stats.accepted > 0


@pytest.mark.parametrize("num_beams, stop", [(1, "):"), (4, "self")])
def test_stop_strings_through_a_stopping_criterion(demo_fp32, num_beams, stop):
    """transformers 5.19 drops ``tokenizer`` before it calls a ``custom_generate`` callable, so
    ``stop_strings=`` fails inside HF's own ``generate`` ("could not locate a tokenizer"); the same
    stop as a ``StopStringCriteria`` (what HF builds from ``stop_strings``) gives HF's output."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    tok, target, draft = demo_fp32
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    kwargs = dict(**enc, num_beams=num_beams, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = target.generate(stop_strings=[stop], tokenizer=tok, **kwargs)
    texts = tok.batch_decode(ref[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert any(t.endswith(stop) for t in texts), texts  # the stop string ended a row
    criterion = StoppingCriteriaList([StopStringCriteria(tok, [stop])])
    assistant = specbeam_hf.SpecBeam(draft)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, stopping_criteria=criterion, **kwargs)
    assert torch.equal(out, ref), tok.batch_decode(out)


def test_stop_string_beside_a_criterion_that_reads_the_batch(demo_fp32):
    """A ``StopStringCriteria`` is judged on each row alone (it looks at no other row), a custom
    criterion on the batch HF's loop would give it; together, with the scores recorded and handed to
    both, the rows stop where HF's stop, whichever criterion fires first. The stop string fires at
    different positions in different rows, and the custom criterion ends another row first."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    tok, target, draft = demo_fp32
    prompts = PROMPTS + ["def add(a, b):\n", "for i in range(10):\n", "x = [1, 2, 3]\n"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    width = enc.input_ids.shape[1]
    kwargs = dict(**enc, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                  output_scores=True)
    free = target.generate(**kwargs)
    texts = tok.batch_decode(free.sequences[:, width:], skip_special_tokens=True)
    stop = "("
    hit_rows = [row for row, text in enumerate(texts) if stop in text]
    assert 2 <= len(hit_rows) < len(prompts), texts  # fires in some rows, not in all

    class ChosenBelow:  # a criterion that reads the recorded scores of its batch
        def __call__(self, input_ids, scores, **kwargs):
            if scores is None or input_ids.shape[0] != len(prompts):
                raise AssertionError(f"saw {tuple(input_ids.shape)} and {None if scores is None else len(scores)} scores")
            return scores[-1].gather(1, input_ids[:, -1:]).squeeze(1) < threshold  # [batch]

    chosen = torch.stack(free.scores, 1).gather(2, free.sequences[:, width:, None]).squeeze(2)  # [batch, 30]
    full = (free.sequences[:, width:] != tok.pad_token_id).all(1)  # [batch] rows that ran the whole 30 tokens
    quiet = [row for row in range(len(prompts)) if row not in hit_rows and full[row]]
    threshold = float(chosen[quiet[0], 3:20].min()) + 1e-3  # ends a row the stop string does not end
    criteria = StoppingCriteriaList([StopStringCriteria(tok, [stop]), ChosenBelow()])
    ref = target.generate(**kwargs, stopping_criteria=criteria)
    def new_tokens(sequences):
        return (sequences[:, width:] != tok.pad_token_id).sum(1)  # [batch]

    cut = (new_tokens(ref.sequences) < new_tokens(free.sequences)).nonzero().flatten().tolist()
    assert quiet[0] in cut and set(hit_rows) & set(cut), (cut, hit_rows, quiet[0])  # both criteria ended rows
    out = target.generate(**kwargs, stopping_criteria=criteria, custom_generate=specbeam_hf.generate,
                          assistant=specbeam_hf.SpecBeam(draft))
    assert torch.equal(out.sequences, ref.sequences), tok.batch_decode(out.sequences[:, width:])
    assert len(out.scores) == len(ref.scores)


@pytest.mark.parametrize("eos", [True, False], ids=["eos", "no_eos"])
def test_stop_strings_judged_once_a_step(demo_fp32, monkeypatch, eos):
    """A ``StopStringCriteria`` is called about once per engine step for all rows together (the rows'
    tokens of a step stacked into one call), not once per row and token, and the rows stop where
    HF's stop: with an EOS id (stopped rows padded) and without one (HF keeps every row going until
    all have stopped). Stop strings of one and of several tokens, and a prompt shorter than the
    longest stop string's token reach."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    tok, target, draft = demo_fp32
    criterion = StopStringCriteria(tok, ["(", "return self"])
    judge = StopStringCriteria.__call__
    calls = []

    def counted(self, input_ids, scores, **kw):
        calls.append(input_ids.shape[0])
        return judge(self, input_ids, scores, **kw)

    long_prompts = PROMPTS + ["def add(a, b):\n", "for i in range(10):\n", "x"]
    short_prompts = ["x", "y = 1"]  # rows shorter than the criterion reads, for their first tokens
    for prompts in (long_prompts, short_prompts):
        enc = tok(prompts, return_tensors="pt", padding=True)
        kwargs = dict(**enc, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id,
                      stopping_criteria=StoppingCriteriaList([criterion]))
        if not eos:
            kwargs["eos_token_id"] = None
        ref = target.generate(**kwargs)
        calls.clear()
        monkeypatch.setattr(StopStringCriteria, "__call__", counted)
        assistant = specbeam_hf.SpecBeam(draft)
        out = target.generate(**kwargs, custom_generate=specbeam_hf.generate, assistant=assistant)
        monkeypatch.undo()
        assert torch.equal(out, ref), tok.batch_decode(out[:, enc.input_ids.shape[1]:])
        if prompts is long_prompts:
            assert len(calls) <= assistant.last_stats.steps, (len(calls), assistant.last_stats.steps)
            assert max(calls) > len(prompts)  # rows' several tokens in one call
        else:
            assert enc.input_ids.shape[1] < criterion.maximum_token_len and 1 in calls  # judged whole, on their own


def test_sampled_rows_stop_right_after_a_stop_string(demo_fp32):
    """Sampling at batch 8 with a stop string: every row that holds the string ends with it (the
    tokens of a step judged together stop a row at the first one that completes it)."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    tok, target, draft = demo_fp32
    enc = tok(PROMPTS * 2, return_tensors="pt", padding=True)
    width = enc.input_ids.shape[1]
    stop = "e"
    torch.manual_seed(3)
    out = target.generate(**enc, max_new_tokens=30, do_sample=True, temperature=1.2, pad_token_id=tok.pad_token_id,
                          stopping_criteria=StoppingCriteriaList([StopStringCriteria(tok, [stop])]),
                          custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft))
    stopped = 0
    for row in out[:, width:]:
        tokens = row[row != tok.pad_token_id].tolist()
        text = tok.decode(tokens)
        if stop in text:
            stopped += 1
            assert stop not in tok.decode(tokens[:-1]), text  # not past the first token that completes it
            assert stop in tok.decode(tokens[-1:]) or text.endswith(stop), text
    assert stopped >= 4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_tokens_masked_inside_a_prompt(demo_fp32, num_beams):
    """A mask with zeros inside a row (not only left padding): HF attends to the unmasked tokens at
    positions that count only them, and its logits processors still see the masked tokens. Equal
    sequences and scores, with a repetition penalty that reads those masked tokens."""
    tok, target, draft = demo_fp32
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    enc["attention_mask"][1, 2:5] = 0  # the second row is the longer, unpadded one
    enc["attention_mask"][0, -3] = 0
    kwargs = dict(**enc, num_beams=num_beams, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
                  repetition_penalty=3.0, return_dict_in_generate=True, output_scores=True)
    ref = target.generate(**kwargs)
    assistant = specbeam_hf.SpecBeam(draft)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert torch.equal(out.sequences, ref.sequences), tok.batch_decode(out.sequences)
    for step, (a, b) in enumerate(zip(out.scores, ref.scores)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, msg=f"step {step}")
    assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_right_padding_is_refused(demo_fp32, num_beams):
    """HF predicts a right-padded row's first token from a pad position (it warns and goes on);
    specbeam refuses such input with the fix instead of answering something else."""
    tok, target, draft = demo_fp32
    right = AutoTokenizer.from_pretrained(DEMO_DIR / "target", padding_side="right")
    enc = right(PROMPTS[:2], return_tensors="pt", padding=True)
    assert enc.attention_mask[:, -1].eq(0).any()
    assistant = specbeam_hf.SpecBeam(draft)
    with pytest.raises(ValueError, match="right padding: row 0 .*padding_side='left'"):
        target.generate(**enc, num_beams=num_beams, max_new_tokens=4, do_sample=False,
                        custom_generate=specbeam_hf.generate, assistant=assistant)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_threads_sharing_one_assistant(demo_fp32, num_beams):
    """A server's worker threads calling ``generate`` with one ``SpecBeam``: each call gets the
    target's own output, and the pools end empty. Before the assistant serialised its calls they
    interleaved on its engines and failed (a negative rollback, an exhausted pool, unknown KV
    sequences), greedy and beams alike."""
    import threading

    tok, target, draft = demo_fp32
    kwargs = dict(max_new_tokens=40, num_beams=num_beams, do_sample=False, pad_token_id=tok.pad_token_id)
    inputs = [tok([p], return_tensors="pt") for p in PROMPTS]
    refs = [target.generate(**enc, **kwargs) for enc in inputs]
    assistant = specbeam_hf.SpecBeam(draft)
    outs, errors = {}, []
    start = threading.Barrier(len(PROMPTS))

    def work(i):
        try:
            start.wait()
            outs[i] = target.generate(**inputs[i], **kwargs, custom_generate=specbeam_hf.generate, assistant=assistant)
        except Exception as e:  # reported below, with the others
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, ref in enumerate(refs):
        assert torch.equal(outs[i], ref), (i, tok.batch_decode(outs[i]))
    assert not assistant.in_use.locked()
    if num_beams == 1:
        assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_assistant_model_as_hf_spells_it(demo_fp32, num_beams):
    """``assistant_model=draft`` with ``custom_generate=specbeam_hf.generate``: HF does not hand
    ``assistant_model`` on to a custom_generate callable, so without reading it the call failed with
    "needs an assistant". It now runs a default ``SpecBeam`` kept on the draft (its pools reused
    by the next call) and gives the target's own output; a non-model is refused by name."""
    tok, target, draft = demo_fp32
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    kwargs = dict(**enc, max_new_tokens=24, num_beams=num_beams, do_sample=False)
    ref = target.generate(**kwargs)
    for call in range(2):
        out = target.generate(custom_generate=specbeam_hf.generate, assistant_model=draft, **kwargs)
        assert torch.equal(out, ref), tok.batch_decode(out)
        if call == 0 and num_beams > 1:  # the depth chooser tries every depth before it goes by timing:
            assert draft.__dict__["_specbeam_assistant"].assistant.last_beam_stats.tree_nodes > 0  # trees ran
    assistant = draft.__dict__["_specbeam_assistant"].assistant
    assert isinstance(assistant, specbeam_hf.SpecBeam) and assistant.draft is not None
    # the draft can still be copied and pickled (the assistant's lock cannot); a copy starts afresh
    import copy
    import io

    twin = copy.deepcopy(draft)
    assert twin.__dict__["_specbeam_assistant"].assistant is None
    torch.save(draft, io.BytesIO())
    out = target.generate(custom_generate=specbeam_hf.generate, assistant_model=twin, **kwargs)
    assert torch.equal(out, ref)
    assert twin.__dict__["_specbeam_assistant"].assistant is not assistant
    if num_beams == 1:
        assert assistant.last_stats.mean_accepted_length > 1.3, assistant.last_stats.summary()
        assert_pools_free(assistant.engine_for(target).target_cache, assistant.drafter.cache)
    with pytest.raises(ValueError, match="assistant_model must be a draft model"):
        target.generate(custom_generate=specbeam_hf.generate, assistant_model="draft", **kwargs)


def test_streamer_with_beams_is_refused_as_hf_does(demo_fp32):
    """HF refuses a streamer with beam search; its check never sees a custom_generate's, so a
    batch-accepting streamer used to be fed nothing but the prompt, silently."""
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value)

        def end(self):
            pass

    tok, target, draft = demo_fp32
    enc = tok(PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError, match="streamer` cannot be used with beam search"):
        target.generate(**enc, num_beams=3, max_new_tokens=8, do_sample=False, streamer=Collect(),
                        custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft))


@pytest.mark.parametrize("options", [dict(), dict(drafter="draft_tree", prompt_lookup=True), dict(multi=True)],
                         ids=["chain", "tree_lookup", "two_drafts"])
def test_kv_blocks_in_use_back_to_zero_after_every_call(demo_fp32, options):
    """``SpecBeam.kv_blocks_in_use()``: blocks are held while a call runs (read from inside it by a
    stopping criterion) and 0 after it, for greedy, beams and a call that fails half-way."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    tok, target, draft = demo_fp32
    options = dict(options)
    drafts = [draft, draft] if options.pop("multi", False) else draft
    assistant = specbeam_hf.SpecBeam(drafts, **options)
    assert assistant.kv_pools() == [] and assistant.kv_blocks_in_use() == 0

    class Watch(StoppingCriteria):
        def __init__(self, fail_after=None):
            self.seen, self.fail_after = [], fail_after

        def __call__(self, input_ids, scores, **kwargs):
            self.seen.append(assistant.kv_blocks_in_use())
            if self.fail_after is not None and len(self.seen) >= self.fail_after:
                raise RuntimeError("the client went away")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    for num_beams in (1, 3):
        for fail_after in (None, 3):
            watch = Watch(fail_after)
            kwargs = dict(**enc, max_new_tokens=20, num_beams=num_beams, do_sample=False,
                          stopping_criteria=StoppingCriteriaList([watch]))
            if fail_after is None:
                target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
            else:
                with pytest.raises(RuntimeError, match="client went away"):
                    target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
            assert max(watch.seen) > 0, watch.seen
            assert assistant.kv_blocks_in_use() == 0, (num_beams, fail_after)
    assert len(assistant.kv_pools()) >= 4  # the target's engine and beam pools, and the drafts'
    assert_pools_free(*assistant.kv_pools())


def test_default_load_is_float32_and_beams_equal_hf():
    """``from_pretrained(path)`` with no dtype, as a user's first check would load the pair: the
    config says float32 (the weights are stored in bfloat16, exact in float32), and B = 4 beams over
    every prompt equal HF's, sequences and scores."""
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target", padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target").eval()
    draft = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "draft").eval()
    assert target.dtype == draft.dtype == torch.float32
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(**enc, num_beams=4, max_new_tokens=32, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ref = target.generate(**kwargs)
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft), **kwargs)
    assert torch.equal(out.sequences, ref.sequences), tok.batch_decode(out.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_inside_generate_on_one_assistant_is_refused_not_hung(demo_fp32, num_beams):
    """A stopping criterion that calls ``generate`` with the assistant already running in its thread
    would wait for itself on the assistant's lock forever; it gets a ValueError instead, the outer call
    fails cleanly (pools empty), and the assistant works afterwards."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    tok, target, draft = demo_fp32
    assistant = specbeam_hf.SpecBeam(draft)
    enc = tok(PROMPTS[1:2], return_tensors="pt")  # (PROMPTS[0]'s first new token is EOS: no criterion call)
    kwargs = dict(**enc, max_new_tokens=6, num_beams=num_beams, do_sample=False)

    class Nested(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with pytest.raises(ValueError, match="already running a generate call in this thread"):
        target.generate(custom_generate=specbeam_hf.generate, assistant=assistant,
                        stopping_criteria=StoppingCriteriaList([Nested()]), **kwargs)
    assert not assistant.in_use.locked() and assistant.kv_blocks_in_use() == 0
    out = target.generate(custom_generate=specbeam_hf.generate, assistant=assistant, **kwargs)
    assert torch.equal(out, target.generate(**kwargs))


class ScoreStop:
    """A stopping criterion that reads the scores HF hands it: stop a row once its last token's
    processed score falls below a threshold (HF passes the scores tuple only with output_scores)."""

    def __init__(self, threshold):
        self.threshold = threshold

    def __call__(self, input_ids, scores, **kwargs):
        if scores is None:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = scores[-1]  # [batch, vocab] the step that chose the last token
        chosen = last.gather(1, input_ids[:, -1:]).squeeze(1)  # [batch]
        return chosen < self.threshold


def test_stopping_criteria_get_the_scores_as_in_hf(demo_fp32):
    """With ``output_scores`` HF passes its criteria the scores so far; a criterion that stops a row
    on a low score stops the rows where HF's does (before, specbeam passed None and the rows ran on)."""
    from transformers import StoppingCriteriaList

    tok, target, draft = demo_fp32
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    width = enc.input_ids.shape[1]
    kwargs = dict(**enc, max_new_tokens=40, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  eos_token_id=None, pad_token_id=tok.pad_token_id)
    free = target.generate(**kwargs)
    chosen = torch.stack(free.scores, 1).gather(2, free.sequences[:, width:, None]).squeeze(2)  # [batch, 40]
    threshold = float(chosen[:, :30].min(dim=1).values.max()) + 1e-3  # fires in every row within 30 steps
    ref = target.generate(**kwargs, stopping_criteria=StoppingCriteriaList([ScoreStop(threshold)]))
    assert ref.sequences.shape[1] < width + 40  # the criterion did stop HF's rows
    out = target.generate(**kwargs, stopping_criteria=StoppingCriteriaList([ScoreStop(threshold)]),
                          custom_generate=specbeam_hf.generate, assistant=specbeam_hf.SpecBeam(draft))
    assert torch.equal(out.sequences, ref.sequences), tok.batch_decode(out.sequences)
    assert len(out.scores) == len(ref.scores)
