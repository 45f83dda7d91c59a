"""The dashboard's generation stream and file access without a browser: every mode's greedy stream
adds up to the target's greedy output, iterations carry consistent counts, bad requests are error
events, and only JSON/PNG files inside the runs folders are served."""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_DIR
from specbeam_hf.app.dashboard.app import Dashboard

PROMPT = "def read_lines(path):\n    with open(path) as f:\n"


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    (runs / "a.json").write_text("{}")
    (runs / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (runs / "notes.txt").write_text("not served")
    return Dashboard(str(DEMO_DIR / "target"), str(DEMO_DIR / "draft"), runs_dirs=[runs])


def _events(stream):
    out = []
    for chunk in stream:
        kind, data = chunk.strip().split("\n")
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


@pytest.mark.parametrize("mode", ["speculative-greedy", "tree-greedy"])
def test_greedy_stream_equals_target(board, mode):
    events = _events(board.events(PROMPT, mode, 3, 14, 1.0, None, 2))
    assert events[0][0] == "start" and events[-1][0] == "done"
    steps = [d for kind, d in events if kind == "step"]
    streamed = [t["id"] for s in steps for kind in ("accepted", "recovered", "bonus") for t in s[kind]]
    ids = board.tokenizer(PROMPT, return_tensors="pt")["input_ids"]  # [1, P]
    ref = board.target.generate(ids, max_new_tokens=14, do_sample=False)[0, ids.shape[1]:].tolist()
    assert streamed == events[-1][1]["token_ids"] == ref
    for s in steps:
        assert len(s["recovered"]) + len(s["bonus"]) <= 1
        assert s["num_accepted"] + s["rejected_count"] == s["drafted"] and len(s["accepted"]) <= s["num_accepted"]
        if mode == "speculative-greedy":
            assert len(s["rejected"]) == s["rejected_count"]
    total = events[-1][1]["summary"]
    assert total["steps"] == len(steps) and total["tokens"] == len(ref)
    assert total["accepted"] == sum(len(s["accepted"]) for s in steps)
    assert total["acceptance_rate"] == pytest.approx(total["accepted"] / total["drafted"])


def test_sampled_stream_is_reproducible_with_a_seed(board):
    a = _events(board.events(PROMPT, "speculative-sample", 3, 10, 0.8, 7, 2))[-1][1]["token_ids"]
    b = _events(board.events(PROMPT, "speculative-sample", 3, 10, 0.8, 7, 2))[-1][1]["token_ids"]
    assert a == b and len(a) >= 1


def test_bad_requests_are_error_events(board):
    for args in ((PROMPT, "nope", 3, 8, 1.0, None, 2), ("", "speculative-greedy", 3, 8, 1.0, None, 2),
                 (PROMPT, "speculative-greedy", 0, 8, 1.0, None, 2), (PROMPT, "tree-greedy", 3, 100000, 1.0, None, 2)):
        (kind, data), = _events(board.events(*args))
        assert kind == "error" and data["message"], args
    assert board.lock.acquire(blocking=False)  # nothing left holding the lock
    board.lock.release()


def test_only_json_and_png_inside_the_runs_folders(board):
    listed = {f["path"] for f in board.list_runs()}
    assert listed == {"a.json", "plot.png"}
    assert board.resolve_file(0, "a.json") is not None and board.resolve_file(0, "plot.png") is not None
    for rel in ("notes.txt", "../a.json", "../../etc/passwd", "/etc/passwd", "missing.json"):
        assert board.resolve_file(0, rel) is None, rel
    assert board.resolve_file(1, "a.json") is None and board.resolve_file(-1, "a.json") is None


def test_collector_ignores_other_engines(board):
    from specbeam_core.stats import StepRecord

    from specbeam_hf.app.dashboard.app import StepCollector

    c = StepCollector(source=1)
    rec = dict(step=1, request_ids=[0], num_drafted=[1], num_accepted=[1], bonus=[True], drafted_tokens=[[5]],
               emitted_tokens=[[5, 6]], draft_forwards=1, target_forwards=1, seconds=0.0)
    c.specbeam_on_step(StepRecord(source=2, **rec))
    c.specbeam_on_step(StepRecord(source=1, **rec))
    assert [r.source for r in c.drain()] == [1] and c.drain() == []


def test_every_example_prompt_gets_a_full_continuation(board):
    """The page's examples (its default first) and the held-out prompts: no early end of text."""
    from specbeam_hf.app.dashboard.app import EXAMPLE_PROMPTS
    from specbeam_hf.app.evaluation.task import load_passages

    for prompt in [*EXAMPLE_PROMPTS, *(p.prompt for p in load_passages(8))]:
        done = _events(board.events(prompt, "speculative-greedy", 4, 32, 1.0, None, 3))[-1]
        assert done[0] == "done" and done[1]["finish_reason"] == "length", (prompt, done)


def test_no_absolute_paths_and_only_the_cited_runs(tmp_path):
    from specbeam_hf.app.dashboard.app import display_folder
    from specbeam_hf.app.models import display_name

    assert display_name(str(DEMO_DIR / "target")) == "demo target" and display_name("org/model") == "org/model"
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    for name in ("cited.json", "cited.png", "old_run2.json"):
        (results / name).write_text("{}")
    (tmp_path / "bench" / "README.md").write_text("Canonical: [run](results/cited.json), ![plot](results/cited.png)\n")
    board = Dashboard.__new__(Dashboard)  # the runs listing alone, no models
    board.runs_dirs = [results]
    files = board.list_runs()
    assert {f["path"] for f in files} == {"cited.json", "cited.png"}
    assert not any(f["folder"].startswith("/") for f in files) and not display_folder(results).startswith("/")
