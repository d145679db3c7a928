"""HF engine decode loop vs ``model.generate()``: tokens per second at batch 8, side by side.

Both sample 8 completions of one chat prompt at T = 0.8 for a fixed number of new tokens
(no early stop), on one torch thread by default (``--threads``: on a busy shared machine
more threads than free cores leave OpenMP threads waiting on each other), alternating runs and
keeping the best of each. Ours includes the protocol's seeded sampler, behaviour
logprobs and the TOPLOC proofs; ``generate()`` does plain multinomial sampling and
nothing else. Models: the tiny test model, and SmolLM2-135M-Instruct when the
``smollm2`` extra is installed (``--no-smollm2`` to skip it).

Run: .venv/bin/python bench/hf_engine.py   The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from coderepair.worker.engines.base import GenerationRequest, SamplingParams
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.models import ModelUnavailableError, build_tiny_model, convert_smollm2

BATCH = 8
TEMPERATURE = 0.8
PROMPT = "Write a Python function that returns the sum of a list of numbers."


def bench_model(
    name: str, directory: Path, new_tokens: int, repeats: int, threads: int
) -> dict[str, Any]:
    engine = HFEngine(max_batch=BATCH, num_threads=threads)
    engine.load(directory)
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = tuple(engine.tokenizer(prompt)["input_ids"])
    request = GenerationRequest(
        prompt_ids=ids,
        seeds=tuple(range(BATCH)),
        sample_indices=tuple(range(BATCH)),
        params=SamplingParams(temperature=TEMPERATURE, max_new_tokens=new_tokens),
    )
    model = engine.model
    inputs = torch.tensor([ids] * BATCH)

    def ours() -> tuple[float, float]:
        start = time.perf_counter()
        gens = engine.generate([request])
        elapsed = time.perf_counter() - start
        assert all(len(g.completion_ids) == new_tokens for g in gens)
        return elapsed, gens[0].timings.proof_s

    def theirs() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                do_sample=True,
                temperature=TEMPERATURE,
                top_k=0,
                top_p=1.0,
                min_new_tokens=new_tokens,
                max_new_tokens=new_tokens,
                pad_token_id=engine.tokenizer.pad_token_id,
            )
        elapsed = time.perf_counter() - start
        assert out.shape[1] == len(ids) + new_tokens
        return elapsed

    ours(), theirs()  # warm-up: first calls pay one-time initialisation
    ours_runs, proof_runs, theirs_runs = [], [], []
    for _ in range(repeats):
        elapsed, proof_s = ours()
        ours_runs.append(elapsed)
        proof_runs.append(proof_s)
        theirs_runs.append(theirs())
    tokens = BATCH * new_tokens
    best_ours, best_theirs = min(ours_runs), min(theirs_runs)
    return {
        "model": name,
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "ours_tok_s": tokens / best_ours,
        "generate_tok_s": tokens / best_theirs,
        "speedup": best_theirs / best_ours,
        "proof_share": proof_runs[ours_runs.index(best_ours)] / best_ours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads for both sides (default 1)"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model(Path(tmp) / "tiny", seed=0)
        rows.append(
            bench_model(
                "tiny (2x128)", tiny, new_tokens=64, repeats=args.repeats, threads=args.threads
            )
        )
    if not args.no_smollm2:
        try:
            smollm2 = convert_smollm2()
        except ModelUnavailableError as exc:
            print(f"SmolLM2 skipped: {exc}")
        else:
            rows.append(
                bench_model(
                    "SmolLM2-135M",
                    smollm2,
                    new_tokens=32,
                    repeats=args.repeats,
                    threads=args.threads,
                )
            )
    print(
        f"\nbatch {BATCH}, T={TEMPERATURE}, {args.threads} torch thread(s), best of {args.repeats}"
    )
    print(
        f"{'model':<14} {'prompt':>6} {'new':>4} {'ours tok/s':>11} {'generate tok/s':>15} "
        f"{'ours/generate':>14} {'proof share':>12}"
    )
    for r in rows:
        print(
            f"{r['model']:<14} {r['prompt_tokens']:>6} {r['new_tokens']:>4} "
            f"{r['ours_tok_s']:>11.1f} {r['generate_tok_s']:>15.1f} {r['speedup']:>13.2f}x "
            f"{r['proof_share']:>11.1%}"
        )
    print(json.dumps({"batch": BATCH, "threads": args.threads, "results": rows}))


if __name__ == "__main__":
    main()
