"""Prometheus text-format scraping and speculative-decoding acceptance from counter deltas.

vLLM exposes (``/metrics``) the counters ``vllm:spec_decode_num_drafts_total``,
``vllm:spec_decode_num_draft_tokens_total`` and ``vllm:spec_decode_num_accepted_tokens_total``.
Over a load level: acceptance rate = Δaccepted / Δdraft_tokens and mean acceptance length
= 1 + Δaccepted / Δdrafts (tokens per target step, the bonus token included).
"""

from __future__ import annotations

import math
import urllib.request
from typing import Iterable

DRAFTS = "vllm:spec_decode_num_drafts_total"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens_total"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
TRACKED = (DRAFTS, DRAFT_TOKENS, ACCEPTED, GENERATION_TOKENS, PROMPT_TOKENS)


def _split_sample(line: str) -> tuple[str, str, str] | None:
    """``'name{a="b"} 1.0 123'`` -> ``(name, 'a="b"', '1.0')``; None for an unparsable line."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        name = line[:brace]
        i, in_quotes, escaped = brace + 1, False, False
        while i < len(line):
            c = line[i]
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_quotes = not in_quotes
            elif c == "}" and not in_quotes:
                break
            i += 1
        else:
            return None
        labels, rest = line[brace + 1 : i], line[i + 1 :]
    else:
        if space == -1:
            return None
        name, labels, rest = line[:space], "", line[space:]
    fields = rest.split()
    if not fields:
        return None
    return name, labels, fields[0]


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample per metric name (all label sets added: engines, models, replicas)."""
    totals: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parsed = _split_sample(line)
        if parsed is None:
            continue
        name, _labels, value = parsed
        try:
            v = float(value)
        except ValueError:
            continue
        if math.isnan(v):
            continue
        totals[name] = totals.get(name, 0.0) + v
    return totals


def scrape(base_url: str, timeout: float = 5.0) -> dict[str, float]:
    """GET ``base_url/metrics`` and parse it; raises OSError/URLError on failure."""
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/metrics", timeout=timeout) as resp:
        return parse_prometheus(resp.read().decode("utf-8", "replace"))


def scrape_many(base_urls: Iterable[str], timeout: float = 5.0) -> dict[str, float] | None:
    """Tracked counters summed over replicas; None if any replica could not be scraped."""
    total: dict[str, float] = {}
    for url in base_urls:
        try:
            metrics = scrape(url, timeout)
        except (OSError, ValueError):
            return None
        for name in TRACKED:
            if name in metrics:
                total[name] = total.get(name, 0.0) + metrics[name]
    return total


def acceptance(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    """Acceptance figures from two scrapes; None values where a scrape or the counters are missing.

    Returns ``{"drafts", "draft_tokens", "accepted_tokens", "acceptance_rate",
    "mean_acceptance_length", "generation_tokens"}`` (deltas; rate/length None with no drafts).
    """
    out = {
        "drafts": None,
        "draft_tokens": None,
        "accepted_tokens": None,
        "acceptance_rate": None,
        "mean_acceptance_length": None,
        "generation_tokens": None,
    }
    if before is None or after is None:
        return out

    def delta(name: str) -> float | None:
        if name not in after:
            return None
        d = after[name] - before.get(name, 0.0)
        # a counter that went down means the server restarted between scrapes: no valid delta
        return d if d >= 0 else None

    drafts, draft_tokens, accepted = delta(DRAFTS), delta(DRAFT_TOKENS), delta(ACCEPTED)
    out.update(drafts=drafts, draft_tokens=draft_tokens, accepted_tokens=accepted,
               generation_tokens=delta(GENERATION_TOKENS))
    if accepted is not None and draft_tokens:
        out["acceptance_rate"] = accepted / draft_tokens
    if accepted is not None and drafts:
        out["mean_acceptance_length"] = 1.0 + accepted / drafts
    return out
