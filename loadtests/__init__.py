"""Load tests for OpenAI-compatible servers (issue #5): a Locust client and a sweep runner.

- ``locustfile.py``  — the Locust user: completions / chat, streaming or not; TTFT, ITL, TPOT,
  end-to-end latency and output tokens/s as Locust entries plus a JSONL of per-request samples.
- ``sweep.py``       — ``python -m loadtests.sweep``: starts each server configuration on
  127.0.0.1, runs headless Locust at each load level, scrapes ``/metrics`` for acceptance, writes
  ``results.csv``, ``summary.json`` and plots.
- ``dataset.py``     — loads the prompt JSONL (and rebuilds the shipped one from local text).
- ``netguard.py``    — refuses non-loopback hosts unless explicitly allowed.
- ``pacing.py``      — Poisson (exponential-gap) request pacing for Locust users.
- ``promscrape.py``  — Prometheus text parsing and spec-decode acceptance from counter deltas.
- ``stats.py``       — percentiles and per-level summaries from the request samples.
- ``servers.py``     — the table of named server configurations and process management.
- ``report.py``      — markdown table from ``summary.json``; ``plots.py`` — PNG plots.
"""
