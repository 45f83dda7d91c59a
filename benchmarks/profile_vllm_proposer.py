"""Time specbeam's vLLM proposer alone, driven as vLLM's model runner drives it, without a server.

A steady state of ``--rows`` decoding rows on the demo pair (bf16, one torch thread, as in vLLM's
CPU worker): each row is a short prompt plus up to 64 generated tokens, every step commits the
accepted part of the row's last drafts (each accepted with probability ``--accept``) plus one
token, and a row that reaches 64 tokens is replaced by a new request. The runner hook's request ids
are passed as vLLM's hook passes them. Prints the proposal time (min and median over blocks of 40
steps) and, with ``--profile``, Python function calls per step and cProfile's top entries.

    python benchmarks/profile_vllm_proposer.py --rows 16 --gamma 1 --profile
    python benchmarks/profile_vllm_proposer.py --rows 16 --drop-to 7 --gamma 4 --prompt-len 300

Needs vLLM installed only for ``vllm_cpu_gemm`` (on by default; without vLLM the draft uses torch's
GEMM).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
import types

import numpy as np
import torch

from specbeam_core import SamplingParams
from specbeam_vllm.proposer import SpecBeamProposer

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "specbeam_hf", "demo_models")
MAX_LEN, MAX_ROWS, GENERATED = 512, 16, 64


def make_proposer(gamma: int, **options) -> SpecBeamProposer:
    from transformers import AutoConfig

    target = os.path.join(DEMO, "target")
    vocab = AutoConfig.from_pretrained(target).vocab_size
    model_config = types.SimpleNamespace(max_model_len=MAX_LEN, get_vocab_size=lambda: vocab, seed=0,
                                         dtype=torch.bfloat16, tokenizer=target)
    return SpecBeamProposer(types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(num_speculative_tokens=gamma), model_config=model_config,
        scheduler_config=types.SimpleNamespace(max_num_seqs=MAX_ROWS),
        additional_config={"specbeam": {"draft": os.path.join(DEMO, "draft"), "full_draft_max_batch": MAX_ROWS,
                                        "no_draft_min_batch": MAX_ROWS + 1, **options}},
        device_config=types.SimpleNamespace(device_type="cpu")))


class Driver:
    """The runner's side of ``propose``: a persistent batch of rows, their tokens and request ids."""

    def __init__(self, proposer: SpecBeamProposer, rows: int, accept: float, seed: int = 0,
                 prompt_len: int = 0, temperature: float = 0.0) -> None:
        self.p, self.rows, self.accept, self.prompt_len = proposer, rows, accept, prompt_len
        self.params = SamplingParams(do_sample=temperature > 0, temperature=temperature or 1.0)
        self.vocab = proposer.vocab_size
        self.rng = np.random.default_rng(seed)
        self.tokens = np.zeros((MAX_ROWS, MAX_LEN), dtype=np.int32)  # [max_num_reqs, max_model_len]
        self.num = np.zeros(MAX_ROWS, dtype=np.int64)  # [max_num_reqs]
        self.generated = np.zeros(MAX_ROWS, dtype=np.int64)
        self.ids: list[str] = [""] * MAX_ROWS
        self.last: list[list[int]] = [[] for _ in range(MAX_ROWS)]
        self.next_id = 0
        for i in range(rows):  # rows at staggered points of their generation
            self._new_request(i)
            self._append(i, int(self.rng.integers(0, GENERATED - 4)))

    def _new_request(self, i: int) -> None:
        self.num[i] = self.generated[i] = 0
        self._append(i, self.prompt_len or int(self.rng.integers(4, 9)))
        self.generated[i] = 0
        self.next_id += 1
        self.ids[i], self.last[i] = f"req-{self.next_id}", []

    def _append(self, i: int, k: int) -> list[int]:
        new = self.rng.integers(0, self.vocab, k)
        self.tokens[i, self.num[i]: self.num[i] + k] = new
        self.num[i] += k
        self.generated[i] += k
        return new.tolist()

    def step(self) -> float:
        """One engine step's proposal; returns its time in ms."""
        committed = []
        for i in range(self.rows):
            if self.generated[i] >= GENERATED:
                self._new_request(i)
            accepted = int(self.rng.binomial(len(self.last[i]), self.accept)) if self.last[i] else 0
            committed.append(self._append(i, accepted + 1))
        self.p.batch_req_ids = self.ids[: self.rows]
        self.p.batch_params = [self.params] * self.rows  # as the runner hook passes them
        started = time.perf_counter()
        out = self.p.propose(committed, self.num.copy(), self.tokens)
        took = 1000 * (time.perf_counter() - started)
        self.last[: self.rows] = out
        return took


def load_drop(args) -> None:
    """``--drop-to``: ``--rows`` rows decode under the default batch policy (no drafts at 8 rows or
    more), then all but ``--drop-to`` rows finish; print the next proposals' times for each
    ``--max-catch-up-tokens`` value (the first few catch the draft up on every row's unseen tokens)."""
    for budget in (args.max_catch_up_tokens or "0,256").split(","):
        driver = Driver(make_proposer(args.gamma, full_draft_max_batch=4, no_draft_min_batch=8,
                                      max_catch_up_tokens=int(budget)),
                        args.rows, args.accept, prompt_len=args.prompt_len)
        for _ in range(20):  # decoding without drafts; rows that finish are replaced by new requests
            driver.step()
        driver.rows = args.drop_to
        times = [driver.step() for _ in range(args.drop_steps)]
        print(f"max_catch_up_tokens {budget:>5}: slowest {max(times):6.1f} ms, first {args.drop_steps} proposals "
              f"{sum(times):6.1f} ms in all: " + " ".join(f"{t:.1f}" for t in times), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--gamma", type=int, default=1)
    ap.add_argument("--accept", type=float, default=0.6, help="chance that each draft token is accepted")
    ap.add_argument("--blocks", type=int, default=8, help="blocks of 40 timed steps")
    ap.add_argument("--profile", action="store_true", help="also run 100 steps under cProfile")
    ap.add_argument("--prompt-len", type=int, default=0,
                    help="prompt tokens of each new request (default: 4 to 8): a request that joins the batch is "
                    "caught up on its prompt by the draft")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="of every row (0: greedy); sampled rows get sampled drafts and their probabilities")
    ap.add_argument("--drop-to", type=int, default=0,
                    help="instead: a load drop from --rows rows (no drafting) to this many (drafting); times each "
                    "proposal after it")
    ap.add_argument("--drop-steps", type=int, default=12, help="proposals timed after the drop")
    ap.add_argument("--max-catch-up-tokens", default=None,
                    help="the proposer option (0: unbounded; default: the option's default); with --drop-to a comma "
                    "list of values to compare (default 0,256)")
    args = ap.parse_args(argv)
    if not 0 <= args.prompt_len <= MAX_LEN - GENERATED - 8:
        raise SystemExit(f"--prompt-len must be in 0..{MAX_LEN - GENERATED - 8}")
    if not 1 <= args.rows <= MAX_ROWS:
        raise SystemExit(f"--rows must be in 1..{MAX_ROWS}")
    torch.set_num_threads(1)
    if args.drop_to:
        return load_drop(args)
    options = {} if args.max_catch_up_tokens is None else {"max_catch_up_tokens": int(args.max_catch_up_tokens)}
    driver = Driver(make_proposer(args.gamma, **options), args.rows, args.accept, prompt_len=args.prompt_len,
                    temperature=args.temperature)
    for _ in range(30):
        driver.step()
    per_block = []
    for _ in range(args.blocks):
        driver.p.counters["propose_seconds"] = 0.0
        for _ in range(40):
            driver.step()
        per_block.append(1000 * driver.p.counters["propose_seconds"] / 40)
    prompts = f", prompts of {args.prompt_len} tokens" if args.prompt_len else ""
    prompts += f", temperature {args.temperature}" if args.temperature else ""
    print(f"{args.rows} rows, γ = {args.gamma}{prompts}: {min(per_block):.2f} ms per proposal (min over {args.blocks} "
          f"blocks of 40 steps), median {statistics.median(per_block):.2f}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            driver.step()
        prof.disable()
        stats = pstats.Stats(prof)
        print(f"cProfile, 100 steps: {stats.total_calls / 100:.0f} Python function calls a step "
              f"(proposal and driver), {1000 * stats.total_tt / 100:.2f} ms a step")
        stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
