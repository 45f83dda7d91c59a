"""Named server configurations and the processes that run them.

``CONFIGS`` is the table the sweep compares. Each entry turns a :class:`Ctx` into the argv of one
server *without* host/port and the shared vLLM flags, which :func:`build_command` appends
(``--host 127.0.0.1 --port P --max-model-len ... --tensor-parallel-size ...`` and any
``--server-args``). To switch specbeam to the ``specbeam serve`` front end once it lands, replace
its line with the commented one.

Custom configurations come from ``--server NAME=COMMAND`` on the sweep's command line: COMMAND is
split like a shell line and ``{host} {port} {target} {draft} {k} {python}`` are substituted; the
shared vLLM flags are not appended to those.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO / "specbeam_hf/demo_models/target"
DEMO_DRAFT = REPO / "specbeam_hf/demo_models/draft"
CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")
VLLM_SERVER = ["-m", "vllm.entrypoints.openai.api_server"]


@dataclass
class Ctx:
    target: str
    draft: str
    k: int  # num_speculative_tokens
    python: str = sys.executable


def _spec_off(c: Ctx) -> list[str]:
    return [c.python, *VLLM_SERVER, "--model", c.target]


def _draft_model(c: Ctx) -> list[str]:
    spec = {"method": "draft_model", "model": c.draft, "num_speculative_tokens": c.k}
    return [c.python, *VLLM_SERVER, "--model", c.target, "--speculative-config", json.dumps(spec)]


def _specbeam(c: Ctx) -> list[str]:
    # `specbeam serve` checks the setup, then execs vLLM's API server with specbeam's flag
    return [c.python, "-m", "specbeam_hf.app.cli", "serve", "--target", c.target, "--draft", c.draft,
            "--num-speculative-tokens", str(c.k)]


CONFIGS: dict[str, Callable[[Ctx], list[str]]] = {
    "spec-off": _spec_off,
    "draft_model": _draft_model,
    "specbeam": _specbeam,
}


@dataclass
class ServerSpec:
    """One named configuration: a builtin (vLLM flags appended) or a custom command template."""

    name: str
    builtin: Callable[[Ctx], list[str]] | None = None
    template: str | None = None


def parse_custom(spec: str) -> ServerSpec:
    """``"name=python server.py --port {port}"`` -> a custom ServerSpec."""
    name, sep, cmd = spec.partition("=")
    if not sep or not name.strip() or not cmd.strip():
        raise ValueError(f"--server wants NAME=COMMAND, got {spec!r}")
    return ServerSpec(name.strip(), template=cmd.strip())


def has_chat_template(model_dir: str) -> bool:
    """Whether a local HF folder carries a chat template (tokenizer_config or chat_template.jinja)."""
    d = Path(model_dir)
    if (d / "chat_template.jinja").exists() or (d / "chat_template.json").exists():
        return True
    cfg = d / "tokenizer_config.json"
    try:
        return bool(json.loads(cfg.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


_LOG_PREFIX = re.compile(r"^(\([^)]*\)\s+)?(ERROR|WARNING|INFO|DEBUG|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\]\s*")
_EXC_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Exit)\b:?(\s|$)")


def summarize_log(text: str, n_chars: int = 400, errors_only: bool = False) -> str:
    """First and last exception lines of a server log (vLLM's log prefixes stripped), else its tail."""
    lines = []
    for raw in text.splitlines():
        m = _LOG_PREFIX.match(raw)
        if m and m.group(2) in ("WARNING", "INFO", "DEBUG"):
            continue
        line = raw[m.end():].strip() if m else raw.strip()
        if line:
            lines.append(line)
    errs = [ln for ln in lines if _EXC_LINE.match(ln)]
    pick = list(dict.fromkeys(errs[:1] + errs[-1:])) if errs else ([] if errors_only else lines[-2:])
    return " | ".join(pick)[:n_chars]


@dataclass
class CommonFlags:
    """vLLM flags shared by every builtin configuration."""

    max_model_len: int = 512
    dtype: str = "bfloat16"
    max_num_seqs: int = 8
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    chat_template: str | None = None
    extra: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        out = ["--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
               "--max-num-seqs", str(self.max_num_seqs)]
        if self.enforce_eager:
            out.append("--enforce-eager")
        if self.tensor_parallel_size != 1:
            out += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.chat_template:
            out += ["--chat-template", self.chat_template]
        return out + list(self.extra)


def build_command(spec: ServerSpec, ctx: Ctx, host: str, port: int, common: CommonFlags) -> list[str]:
    if spec.builtin is not None:
        return spec.builtin(ctx) + ["--host", host, "--port", str(port)] + common.argv()
    subst = {"{host}": host, "{port}": str(port), "{target}": ctx.target, "{draft}": ctx.draft,
             "{k}": str(ctx.k), "{python}": ctx.python}
    out = []
    for tok in shlex.split(spec.template or ""):
        for key, val in subst.items():
            tok = tok.replace(key, val)
        out.append(tok)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server in its own process group (so the whole tree can be stopped), logging to a file."""

    def __init__(self, argv: list[str], host: str, port: int, log_path: Path, env: dict | None = None):
        self.argv, self.host, self.port, self.log_path = argv, host, port, log_path
        self.url = f"http://{host}:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_healthy(self, timeout: float) -> tuple[bool, str]:
        """Poll ``/health`` until 200, the process exits, or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return False, f"exited with code {self.proc.returncode} before becoming healthy"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return True, ""
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        return False, f"not healthy after {timeout:.0f} s"

    def log_tail(self, n_chars: int = 400, errors_only: bool = False) -> str:
        """The most telling lines of the log: the first and last exception lines, else the last lines."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return summarize_log(text, n_chars, errors_only)

    def exit_reason(self) -> str:
        """``"exited (code 1): <exception lines>"`` or ``"killed by SIGKILL"`` for a process that ended."""
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            try:
                why = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                why = f"killed by signal {-rc}"
        else:
            why = f"exited (code {rc})"
        errs = self.log_tail(errors_only=True)
        return f"{why}: {errs}" if errs else why

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, for fault injection)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL after ``grace`` seconds."""
        if self.alive():
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # the leader is gone; children in its group (engine cores) may still be running
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()
