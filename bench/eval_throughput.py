"""Questions per second: the reference evaluator's way vs facellm's batched likelihood mode, one run.

Reference way (FaceXBench evaluate.py + FaceLLM's VLMEvalKit wrapper): one
question at a time, chat template, ``generate``, decode, parse the letter.
facellm: ``evaluate --mode likelihood --batch-size N``: one forward pass per
batch, the option letter with the highest next-token score wins.

Both run on the same model, the same single-image FaceXBench-style questions
(question texts from the 48 benchmark files when found, else the tests' real subset) and the same images on
disk, opened the same way. Defaults are a tiny model on CPU; ``--real-shapes``
builds InternVL3-1B's sizes (InternViT-300M at 448 px, 256 image tokens,
Qwen2.5-0.5B decoder) with random weights, for a GPU run:

    python bench/eval_throughput.py                                   # CPU, tiny
    python bench/eval_throughput.py --real-shapes --device cuda --dtype bfloat16 \\
        --questions 512 --batch-size 64 --ref-questions 64

Random weights never emit end-of-sequence, so the reference generates
``--ref-new-tokens`` tokens (default 4, about what "B" plus end-of-turn costs a
trained model); a real checkpoint can be given with ``--model``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from facellm_cli.config import EvalConfig, GenerationConfig, ModelConfig
from facellm_cli.eval.runner import LocalBackend
from facellm_cli.eval.scoring import parse_answer
from facellm_cli.images import open_image
from facellm_cli.infer.generate import Prompt, generate_batch
from facellm_cli.schema import MCQuestion, format_mcq_prompt
from facellm_cli.testing.facexbench import SUBSET_BENCHMARK, find_facexbench

# The 48 files from FACEXBENCH_DIR or ../shared/facexbench, else the real subset committed with the tests.
BENCHMARK = find_facexbench() or SUBSET_BENCHMARK


def make_questions(n: int, image_size: int, folder: Path, seed: int = 0) -> list[MCQuestion]:
    """Single-image questions shaped like FaceXBench's, with random-noise images written to ``folder``."""
    from PIL import Image

    rng = random.Random(seed)
    pool: list[tuple[dict, dict]] = []
    for f in sorted(BENCHMARK.glob("*single*.json")):
        meta = json.loads(f.read_text())
        pool += [(meta, q) for q in meta["questions"].values()]
    out = []
    for i in range(n):
        img = Image.frombytes("RGB", (image_size, image_size), rng.randbytes(image_size * image_size * 3))
        path = folder / f"q{i}.png"
        img.save(path)
        if pool:
            meta, q = pool[rng.randrange(len(pool))]
            opts, text, post = [str(o) for o in q["options"]], q["question_text"], meta.get("postpend_text")
        else:
            opts, text, post = ["smiling", "neutral", "frowning", "surprised"], "What is the expression?", None
        out.append(
            MCQuestion(id=f"bench/{i}", images=[str(path)], question=text, options=opts, answer="A", postpend_text=post)
        )
    return out


def load(args: argparse.Namespace, tmp: Path):
    import torch

    from facellm_cli.models.loader import LoadedModel, load_model_and_processor
    from facellm_cli.testing import build_tiny_model

    if args.model:
        return load_model_and_processor(ModelConfig(model=args.model, device=args.device, dtype=args.dtype))
    if not args.real_shapes:
        path = build_tiny_model(tmp / "tiny", "internvl", image_size=args.image_size)
        return load_model_and_processor(ModelConfig(model=str(path), device=args.device, dtype=args.dtype))
    from transformers import InternVLForConditionalGeneration

    from facellm_cli.testing.shapes import real_shape_config

    # The tiny builder's processor at 448 px / patch 14 gives InternVL3's 256 image tokens per image.
    path = build_tiny_model(tmp / "shapes", "internvl", image_size=448, patch_size=14)
    lm = load_model_and_processor(ModelConfig(model=str(path), device="cpu", dtype="float32"))
    tok = lm.tokenizer
    cfg = real_shape_config(
        "internvl3-1b",
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        image_token_id=tok.context_image_token_id,
    )
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        torch.set_default_dtype(getattr(torch, dtype))
        model = InternVLForConditionalGeneration(cfg).eval()
        torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"InternVL3-1B shapes, random weights: {params:.2f}B parameters, {dtype} on {device}", file=sys.stderr)
    return LoadedModel(
        model=model,
        processor=lm.processor,
        config=lm.config,
        device=device,
        dtype=dtype,
        model_type="internvl",
        name="internvl3-1b-shapes",
        image_only_processor=lm.image_only_processor,
    )


def sync(lm) -> None:
    import torch

    if str(lm.device).startswith("cuda"):
        torch.cuda.synchronize()


def reference(lm, qs: list[MCQuestion], new_tokens: int) -> tuple[float, int]:
    """One question at a time: open images, template, generate, decode, parse. Returns (seconds, parsed)."""
    gen = GenerationConfig(max_new_tokens=new_tokens)
    parsed = 0
    sync(lm)
    t0 = time.perf_counter()
    for q in qs:
        prompt = Prompt(images=[open_image(p) for p in q.images], text=format_mcq_prompt(q))
        text = generate_batch(lm, [prompt], gen)[0].text
        parsed += parse_answer(text, q.options).letter is not None
    sync(lm)
    return time.perf_counter() - t0, parsed


def facellm_likelihood(lm, qs: list[MCQuestion], batch_size: int) -> float:
    """facellm's likelihood mode: the runner's backend, one forward pass per batch."""
    backend = LocalBackend(lm, EvalConfig(data="unused.jsonl", mode="likelihood", batch_size=batch_size))
    sync(lm)
    t0 = time.perf_counter()
    for i in range(0, len(qs), batch_size):
        backend.answer(qs[i : i + batch_size])
    sync(lm)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=32, help="Questions for facellm's batched run.")
    ap.add_argument(
        "--ref-questions", type=int, default=None, help="Questions for the (slow) reference run (default: same)."
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ref-new-tokens", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64, help="Image side for the tiny model (real shapes use 448).")
    ap.add_argument("--real-shapes", action="store_true", help="InternVL3-1B sizes with random weights.")
    ap.add_argument("--model", default=None, help="A real local checkpoint instead.")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lm = load(args, tmp)
        size = 448 if args.real_shapes else args.image_size
        qs = make_questions(args.questions, size, tmp)
        ref_qs = qs[: args.ref_questions or args.questions]
        reference(lm, ref_qs[:2], args.ref_new_tokens)  # warm-up
        facellm_likelihood(lm, qs[: args.batch_size], args.batch_size)
        ref_s, parsed = reference(lm, ref_qs, args.ref_new_tokens)
        ours_s = facellm_likelihood(lm, qs, args.batch_size)
    ref_qps, ours_qps = len(ref_qs) / ref_s, len(qs) / ours_s
    print(f"device: {lm.device} ({lm.dtype}), model: {lm.name}, single-image questions")
    print(
        f"reference (1 at a time, generate {args.ref_new_tokens} tokens, parse): "
        f"{len(ref_qs)} questions in {ref_s:.2f} s = {ref_qps:.1f} q/s ({parsed} parseable)"
    )
    print(
        f"facellm likelihood (batch {args.batch_size}, 1 forward pass per batch): "
        f"{len(qs)} questions in {ours_s:.2f} s = {ours_qps:.1f} q/s"
    )
    print(f"speed-up: {ours_qps / ref_qps:.1f}x")


if __name__ == "__main__":
    main()
