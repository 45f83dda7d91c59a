"""The ``specbeam dashboard`` web app (FastAPI; one static HTML page with plain JS).

- ``GET /``                the page;
- ``GET /api/info``        models, modes and example prompts;
- ``GET /api/generate``    one generation streamed as server-sent events: ``start``, one ``step`` per
                           draft → verify → commit iteration (accepted, recovered, bonus and rejected
                           draft tokens, running acceptance statistics), then ``done`` (or ``error``);
- ``GET /api/runs``        saved JSON runs and PNG plots under the runs folders;
- ``GET /files/{i}/{path}`` one of those files (JSON or PNG only, inside folder ``i`` only).

Iterations are captured with a ``specbeam_on_step`` hook implementation (:class:`StepCollector`)
registered on the engine's plugin manager for the duration of one request. Generations run one at a
time (the engine and its KV pools are not shared between threads).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from specbeam_core import SamplingParams, hookimpl
from specbeam_core.stats import StepRecord

from ..models import display_name

STATIC = Path(__file__).parent / "static"
REPO = Path(__file__).resolve().parents[3]  # the clone: specbeam_hf/app/dashboard/app.py
# mode name -> (drafter, do_sample)
MODES = {
    "speculative-greedy": ("draft_model", False),
    "speculative-sample": ("draft_model", True),
    "tree-greedy": ("draft_tree", False),
    "tree-sample": ("draft_tree", True),
}
# The demo models are two tiny models trained on CPython's standard library: they continue Python
# code the way stdlib modules are written. Each example below gets a full continuation from them (no
# early end of text) and a high acceptance rate; a prompt that ends on a bare newline, or names
# something the stdlib never defines, often gets neither. The first is the page's default.
EXAMPLE_PROMPTS = [
    "class Stack:",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __len__(self):\n        return len(self.',
    'import os\nimport sys\n\n\ndef main():\n    """',
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]
MAX_NEW_TOKENS = 512


def default_runs_dirs() -> list[Path]:
    """benchmarks/results (the benchmark JSON + PNGs) and runs/ (``specbeam evaluate``'s default output)."""
    return [REPO / "benchmarks" / "results", Path("runs").resolve()]


def _citing_docs(folder: Path) -> list[Path]:
    """The Markdown files that name a runs folder's canonical files: ``README.md`` in or beside the
    folder (``benchmarks/README.md`` for ``benchmarks/results``) and, for the clone's own results, the
    clone's README.md, BENCHMARKS.md and docs/."""
    docs = [folder / "README.md", folder.parent / "README.md"]
    if folder.resolve() == (REPO / "benchmarks" / "results").resolve():
        docs += [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("**/*.md"))]
    return [d for d in docs if d.is_file()]


def canonical_names(folder: Path) -> set[str] | None:
    """The file names the docs of ``folder`` cite (:func:`_citing_docs`), or None when no such docs
    exist (then every JSON and PNG file in it is listed)."""
    docs = _citing_docs(folder)
    if not docs:
        return None
    text = "\n".join(d.read_text(encoding="utf-8", errors="replace") for d in docs)
    return set(re.findall(r"[\w.+-]+\.(?:json|png)", text))


def display_folder(folder: Path) -> str:
    """A runs folder as the page shows it: relative to the clone or the working folder, never absolute."""
    for base in (REPO, Path.cwd()):
        try:
            return folder.resolve().relative_to(base.resolve()).as_posix() or "."
        except ValueError:
            continue
    return folder.name


class StepCollector:
    """A pluggy plugin: keeps the StepRecords of one engine (``source``) as they happen."""

    def __init__(self, source: int) -> None:
        self.source = source
        self.records: list[StepRecord] = []

    @hookimpl
    def specbeam_on_step(self, record: StepRecord) -> None:
        if record.source == self.source:
            self.records.append(record)

    def drain(self) -> list[StepRecord]:
        out, self.records = self.records, []
        return out


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class Dashboard:
    """The models and the generation loop behind the app."""

    def __init__(self, target: str, draft: str, dtype: str = "float32", runs_dirs: list[Path] | None = None) -> None:
        from ..models import load_pair

        self.target_name, self.draft_name, self.dtype = target, draft, dtype
        pair = load_pair(target, draft, dtype)
        self.tokenizer, self.target, self.draft = pair.tokenizer, pair.target, pair.draft
        self.draft_options = pair.draft_options  # a padded embedding
        self.eos_ids = pair.eos_ids
        self.runs_dirs = [Path(d) for d in (runs_dirs if runs_dirs is not None else default_runs_dirs())]
        self.lock = threading.Lock()
        self._assistants: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ runs and plots
    def list_runs(self) -> list[dict[str, Any]]:
        """The JSON runs and PNG plots of every runs folder; where docs cite that folder's files, only
        the cited (canonical) ones."""
        out = []
        for i, folder in enumerate(self.runs_dirs):
            if not folder.is_dir():
                continue
            canonical = canonical_names(folder)
            for path in sorted(folder.rglob("*")):
                if path.suffix not in (".json", ".png") or not path.is_file() or "wandb" in path.parts:
                    continue
                if canonical is not None and path.name not in canonical:
                    continue
                rel = path.relative_to(folder).as_posix()
                out.append({"dir": i, "folder": display_folder(folder), "path": rel, "kind": path.suffix[1:],
                            "url": f"/files/{i}/{rel}", "bytes": path.stat().st_size, "mtime": path.stat().st_mtime})
        return out

    def resolve_file(self, index: int, rel: str) -> Path | None:
        """The file ``rel`` inside runs folder ``index``, or None (outside it, missing, or not JSON/PNG)."""
        if not 0 <= index < len(self.runs_dirs):
            return None
        root = self.runs_dirs[index].resolve()
        path = (root / rel).resolve()
        if root not in path.parents or path.suffix not in (".json", ".png") or not path.is_file():
            return None
        return path

    # ------------------------------------------------------------------ generation
    def engine(self, drafter: str, gamma: int, tree_width: int):
        from specbeam_hf import SpecBeam

        key = (drafter, gamma, tree_width if drafter == "draft_tree" else None)
        assistant = self._assistants.get(key)
        if assistant is None:
            options = {"drafter": drafter, **self.draft_options}
            if drafter == "draft_tree":
                options["tree_width"] = tree_width
            assistant = SpecBeam(self.draft, num_draft_tokens=gamma, **options)
            self._assistants[key] = assistant
        return assistant.engine_for(self.target)

    def token(self, token_id: int) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return {"id": int(token_id), "text": text}

    async def stream(self, *args) -> AsyncIterator[str]:
        """``events(*args)`` run in a worker thread, relayed as they come; a client that goes away
        cancels the generation (the worker stops after the current iteration and frees its KV blocks)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                for event in self.events(*args, cancel=cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except Exception as exc:  # noqa: BLE001 - reported to the page, not swallowed
                loop.call_soon_threadsafe(queue.put_nowait, _sse("error", {"message": f"{type(exc).__name__}: {exc}"}))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=work, name="specbeam-dashboard-generate", daemon=True).start()
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            cancel.set()

    def events(self, prompt: str, mode: str, gamma: int, max_new_tokens: int, temperature: float, seed: int | None,
               tree_width: int, cancel: threading.Event | None = None) -> Iterator[str]:
        """One generation as server-sent events (runs in the calling thread)."""
        if mode not in MODES:
            yield _sse("error", {"message": f"unknown mode {mode!r}; known: {', '.join(MODES)}"})
            return
        if not prompt:
            yield _sse("error", {"message": "empty prompt"})
            return
        if not 1 <= gamma <= 16 or not 1 <= max_new_tokens <= MAX_NEW_TOKENS or not 1 <= tree_width <= 8:
            limits = f"need 1 <= gamma <= 16, 1 <= max_new_tokens <= {MAX_NEW_TOKENS}, 1 <= tree_width <= 8"
            yield _sse("error", {"message": limits})
            return
        drafter, do_sample = MODES[mode]
        if not self.lock.acquire(timeout=120):
            yield _sse("error", {"message": "another generation is still running; try again"})
            return
        try:
            params = (
                SamplingParams(do_sample=True, temperature=temperature, seed=seed) if do_sample else SamplingParams()
            )
            engine = self.engine(drafter, gamma, tree_width)
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            request = engine.make_request(prompt_ids, params, max_new_tokens, self.eos_ids)
            collector = StepCollector(id(engine))
            engine.pm.register(collector)
            totals = dict.fromkeys(("steps", "drafted", "accepted", "recovered", "bonus", "tokens"), 0)
            seconds = 0.0
            yield _sse(
                "start",
                {
                    "mode": mode,
                    "gamma": gamma,
                    "prompt": prompt,
                    "prompt_tokens": len(prompt_ids),
                    "tree": drafter == "draft_tree",
                },
            )
            try:
                engine.reserve([request])
                engine.add(request)
                started = time.perf_counter()
                while not request.finished:
                    if cancel is not None and cancel.is_set():
                        return
                    engine.step()
                    for record in collector.drain():
                        seconds += record.seconds
                        event = self._step_event(record, drafter == "draft_tree", totals, seconds)
                        yield _sse("step", event)
                wall = time.perf_counter() - started
            finally:
                engine.abort(request)
                engine.pm.unregister(collector)
            output = list(request.output)
            yield _sse(
                "done",
                {
                    "text": self.tokenizer.decode(output, skip_special_tokens=True),
                    "token_ids": output,
                    "finish_reason": request.finish_reason,
                    "summary": self._summary(totals, seconds) | {"wall_seconds": wall},
                },
            )
        except ValueError as exc:  # a bad request (e.g. past the position limit)
            yield _sse("error", {"message": str(exc)})
        finally:
            self.lock.release()

    def _step_event(self, record: StepRecord, tree: bool, totals: dict[str, int], seconds: float) -> dict[str, Any]:
        drafted = record.drafted_tokens[0]  # [d] tokens (chains: in order; trees: every node)
        k = record.num_accepted[0]
        emitted = record.emitted_tokens[0]
        last = emitted[k:]  # the target's own token (absent if a stop condition cut the step)
        bonus = bool(record.bonus[0])
        totals["steps"] += 1
        totals["drafted"] += len(drafted)
        totals["accepted"] += k
        totals["recovered"] += int(bool(drafted) and not bonus)
        totals["bonus"] += int(bonus)
        totals["tokens"] += len(emitted)
        return {
            "step": record.step,
            "drafted": len(drafted),
            "num_accepted": k,
            "accepted": [self.token(t) for t in emitted[:k]],
            "recovered": [] if bonus else [self.token(t) for t in last],
            "bonus": [self.token(t) for t in last] if bonus else [],
            # chains: the drafts after the first rejection; trees: the nodes off the accepted path (count only)
            "rejected": [] if tree else [self.token(t) for t in drafted[k:]],
            "rejected_count": len(drafted) - k,
            "seconds": record.seconds,
            "totals": self._summary(totals, seconds),
        }

    @staticmethod
    def _summary(totals: dict[str, int], seconds: float) -> dict[str, Any]:
        return dict(
            totals,
            seconds=seconds,
            acceptance_rate=totals["accepted"] / totals["drafted"] if totals["drafted"] else 0.0,
            tokens_per_pass=totals["tokens"] / totals["steps"] if totals["steps"] else 0.0,
            tokens_per_s=totals["tokens"] / seconds if seconds > 0 else 0.0,
        )


def create_app(target: str, draft: str, dtype: str = "float32", runs_dirs: list[Path] | None = None):
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse

    board = Dashboard(target, draft, dtype, runs_dirs)
    app = FastAPI(title="specbeam dashboard")
    app.state.dashboard = board

    @app.get("/", response_class=HTMLResponse)
    def index():
        return (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/api/info")
    def info():
        from ..evaluation.task import load_passages

        prompts = [{"name": p.splitlines()[0][:60], "text": p} for p in EXAMPLE_PROMPTS]
        prompts += [{"name": f"held-out: {p.id}", "text": p.prompt} for p in load_passages(8)]
        return {
            "target": display_name(board.target_name),
            "draft": display_name(board.draft_name),
            "dtype": board.dtype,
            "modes": list(MODES),
            "prompts": prompts,
            "max_new_tokens": MAX_NEW_TOKENS,
        }

    @app.get("/api/generate")
    def generate(
        prompt: str,
        mode: str = "speculative-greedy",
        gamma: int = Query(4),
        max_new_tokens: int = Query(48),
        temperature: float = Query(0.8),
        seed: int | None = Query(None),
        tree_width: int = Query(3),
    ):
        events = board.stream(prompt, mode, gamma, max_new_tokens, temperature, seed, tree_width)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.get("/api/runs")
    def runs():
        return {"folders": [display_folder(d) for d in board.runs_dirs], "files": board.list_runs()}

    @app.get("/files/{index}/{rel:path}")
    def files(index: int, rel: str):
        path = board.resolve_file(index, rel)
        if path is None:
            raise HTTPException(status_code=404, detail="no such JSON or PNG file in the runs folders")
        return FileResponse(path, media_type="application/json" if path.suffix == ".json" else "image/png")

    @app.get("/api/health")
    def health():
        return {"ok": True}

    return app


__all__ = ["Dashboard", "StepCollector", "create_app", "default_runs_dirs"]
