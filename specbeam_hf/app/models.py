"""Model loading for the application (the CLI, ``specbeam evaluate`` and the dashboard).

A model name is a local folder or a model-hub name. Local folders are checked before anything is
loaded; a hub name that is not in the local cache fails at once when the machine is offline
(``HF_HUB_OFFLINE=1`` or no route to the hub) instead of retrying. Weights load quietly: no
progress bars, only transformers' errors.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import UsageError, first_line

DEMO_MODELS = Path(__file__).resolve().parent.parent / "demo_models"
DEMO_TARGET = DEMO_MODELS / "target"
DEMO_DRAFT = DEMO_MODELS / "draft"
DTYPES = ("float32", "bfloat16")
HUB_HOST = "huggingface.co"


# --------------------------------------------------------------------------- where a model is
def looks_like_path(name: str) -> bool:
    """A value that can only mean a local folder (a model-hub name is ``name`` or ``org/name``)."""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(("/", os.sep)):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    return name.count("/") > 1


def is_demo(name: str, role: str) -> bool:
    return Path(name).expanduser().resolve() == (DEMO_TARGET if role == "target" else DEMO_DRAFT)


def display_name(name: str) -> str:
    """How a model is named to the user: the shipped demo models by that name, never by their path."""
    if Path(name).expanduser().resolve() == DEMO_TARGET:
        return "demo target"
    if Path(name).expanduser().resolve() == DEMO_DRAFT:
        return "demo draft"
    return name


def check_model_location(name: str, role: str) -> None:
    """Raise :class:`UsageError` for a model that cannot be there: a missing or non-model folder, or a
    hub name that is not cached while offline."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(
                f"{role} model {name!r} is a file; expected a model folder (with config.json) or a model-hub name"
            )
        if not (path / "config.json").is_file():
            raise UsageError(f"{role} model folder {name} has no config.json; is it a saved transformers model?")
        return
    if is_demo(name, role):
        raise UsageError(f"the shipped demo {role} model is missing ({name}); pass --target and --draft")
    if looks_like_path(name):
        raise UsageError(f"{role} model folder {name} does not exist")
    _check_hub_reachable(name, role)


def _hub_cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id, for one
        return False


def offline() -> bool:
    """True when the hub cannot be asked: ``HF_HUB_OFFLINE`` is set, or no connection opens in 2 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    reachable = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=2):
                reachable.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # a thread bounds the DNS look-up too
    thread.start()
    thread.join(2.5)
    return not reachable.is_set()


def _check_hub_reachable(name: str, role: str) -> None:
    if _hub_cached(name) or not offline():
        return
    raise UsageError(
        f"{role} model {name!r} is no local folder and not in the Hugging Face cache, and the hub cannot be "
        f"reached (offline); pass a local model folder, or download it first with network "
        f"(huggingface-cli download {name})"
    )


def _location(name: str) -> str:
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def _hub_hint(name: str) -> str:
    if Path(name).expanduser().exists():
        return ""
    return f" ({name!r} is no local folder, so it was looked up as a model-hub name; offline, only cached models load)"


# --------------------------------------------------------------------------- loading
@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars and only errors from transformers while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(_location(name))
    except Exception as exc:  # OSError, ValueError, hub errors: all mean "cannot load"
        raise UsageError(f"cannot load the tokenizer of {name!r}: {first_line(exc)}{_hub_hint(name)}") from None


def check_device(device: str) -> str:
    """``device`` if torch can place tensors there, else :class:`UsageError`."""
    import torch

    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def load_model(name: str, role: str, dtype: str, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(_location(name), dtype=getattr(torch, dtype))
    except Exception as exc:
        raise UsageError(f"cannot load the {role} model {name!r}: {first_line(exc)}{_hub_hint(name)}") from None
    if device != "cpu":
        model = model.to(device)
    return model.eval()


def vocab_resize(draft_name: str, draft, target, target_tokenizer) -> dict:
    """``{"vocab_size": ...}`` for a draft whose embedding is padded to another size than the target's
    around the same tokenizer (Qwen2.5 0.5B-7B: 151,936 rows, 14B+: 152,064); else ``{}``, and a
    real mismatch stays the engine's error."""
    rows = target.get_output_embeddings().weight.shape[0]
    if draft.get_output_embeddings().weight.shape[0] == rows:
        return {}
    try:
        same = load_tokenizer(draft_name).get_vocab() == target_tokenizer.get_vocab()
    except UsageError:  # no tokenizer beside the draft: nothing shows they share one
        same = False
    return {"vocab_size": int(rows)} if same else {}


def eos_ids(tokenizer, model) -> list[int]:
    """The tokenizer's eos token and the model's generation-config eos tokens, each once."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    return ids


@dataclass
class ModelPair:
    """A target, its tokenizer and a draft, loaded for the application."""

    tokenizer: Any
    target: Any
    draft: Any
    draft_options: dict = field(default_factory=dict)  # SpecBeam options for a padded draft embedding

    @property
    def eos_ids(self) -> list[int]:
        return eos_ids(self.tokenizer, self.target)


def load_pair(
    target: str, draft: str, dtype: str = "float32", draft_dtype: str | None = None, device: str = "cpu"
) -> ModelPair:
    """Check both locations, then load the target's tokenizer, the target and the draft."""
    check_model_location(target, "target")
    check_model_location(draft, "draft")
    tokenizer = load_tokenizer(target)
    target_model = load_model(target, "target", dtype, device)
    draft_model = load_model(draft, "draft", draft_dtype or dtype, device)
    return ModelPair(tokenizer, target_model, draft_model, vocab_resize(draft, draft_model, target_model, tokenizer))
