"""Load test for ``facellm serve``: dynamic batching on vs off (max batch 1), same model, same run.

N concurrent clients (openai ``AsyncOpenAI``) send a fixed number of chat completions,
each with one face-sized image and greedy decoding of a fixed token budget, to a real
uvicorn server on 127.0.0.1. Prints requests/s, generated tokens/s and p50/p95 latency
for both settings and the ratio.

    python bench/serve_load.py                                  # tiny random model, CPU
    python bench/serve_load.py --internvl3-1b-shapes --clients 32 --requests 256 --max-tokens 64   # GPU

``--internvl3-1b-shapes`` builds a random-weight InternVL model with InternVL3-1B's
shapes (InternViT-300M: 24 layers, hidden 1024, 448 px, patch 14; Qwen2.5-0.5B: 24 layers,
hidden 896, 14 heads / 2 KV heads, MLP 4864, vocab 151,674), so the timing reflects the real
model's compute without downloading it. The clients run in the same process as the server
(another thread), so on a small CPU they compete with it for cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def build_internvl3_1b_shapes(out: Path) -> Path:
    """A random InternVL3-1B-shaped checkpoint (tiny tokenizer, real processor class), saved to ``out``."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from facellm_cli.testing import tiny
    from facellm_cli.testing.shapes import real_shape_config

    torch.manual_seed(0)
    small, processor = tiny._build_internvl(448, 14, 64, 32, 1, 600)  # for its processor (448 px, 256 tokens)
    tok = processor.tokenizer
    del small
    config = real_shape_config(
        "internvl3-1b",
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        image_token_id=tok.context_image_token_id,
    )
    model = InternVLForConditionalGeneration(config)
    gen = model.generation_config
    # Random weights would pick ids the small tokenizer cannot decode: suppress those (the full
    # 151,674-row lm_head still runs, so the compute is the real model's).
    gen.suppress_tokens = list(range(len(tok), 151_674))
    gen.eos_token_id = gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def face_like_data_uri(i: int, side: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


async def run_load(url: str, clients: int, requests: int, max_tokens: int, images: list[str]) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        r = await client.chat.completions.create(
            model="bench",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                        {"type": "text", "text": f"Describe the face in image {i}."},
                    ],
                }
            ],
            max_tokens=max_tokens,
            temperature=0,
        )
        latencies.append(time.perf_counter() - t0)
        tokens += r.usage.completion_tokens

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(i)

    await one(0)  # warm-up (not counted)
    latencies.clear()
    tokens = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    q = statistics.quantiles(latencies, n=100)
    return {"rps": requests / wall, "tok_s": tokens / wall, "p50": q[49], "p95": q[94], "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: build a tiny random InternVL)")
    ap.add_argument("--internvl3-1b-shapes", action="store_true", help="build a random InternVL3-1B-shaped model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=None, help="batching-on size (default: --clients)")
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads (1 steadies CPU timings on a shared, oversubscribed machine)",
    )
    args = ap.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    import logging

    from facellm_cli.cli import quiet_libraries
    from facellm_cli.config import ModelConfig, ServeConfig
    from facellm_cli.models.loader import load_model_and_processor
    from facellm_cli.serve.app import background_server
    from facellm_cli.testing import build_tiny_model

    quiet_libraries()
    logging.getLogger("facellm.serve").setLevel(logging.WARNING)
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        path = Path(args.model)
    elif args.internvl3_1b_shapes:
        path = build_internvl3_1b_shapes(Path(tmp.name) / "internvl3-1b-shapes")
    else:
        path = build_tiny_model(Path(tmp.name) / "tiny-internvl", "internvl")
    lm = load_model_and_processor(ModelConfig(model=str(path), device=args.device))
    side = 448 if args.internvl3_1b_shapes else 64
    images = [face_like_data_uri(i, side) for i in range(8)]
    n_params = sum(p.numel() for p in lm.model.parameters())
    on_size = args.max_batch_size or args.clients
    import torch

    print(
        f"model: {path.name} ({n_params / 1e6:.1f} M params) on {lm.device}/{lm.dtype}, "
        f"{torch.get_num_threads()} torch threads; {args.clients} clients, "
        f"{args.requests} requests, {args.max_tokens} new tokens each, greedy",
        flush=True,
    )
    results = {}
    for label, size in (("batching off (max batch 1)", 1), (f"batching on (max batch {on_size})", on_size)):
        cfg = ServeConfig.model_validate(
            {
                "model": {"model": str(path)},
                "max_batch_size": size,
                "max_wait_ms": args.max_wait_ms,
                "max_queue": args.requests + 8,
            }
        )
        with background_server(cfg, lm) as (url, app):
            results[label] = run = asyncio.run(run_load(url, args.clients, args.requests, args.max_tokens, images))
            stats = app.state.batcher.snapshot()
        run["mean_batch"] = stats["requests"] / max(1, stats["batches"])
        print(
            f"{label:<30} {run['rps']:8.2f} req/s {run['tok_s']:9.1f} tok/s   p50 {run['p50'] * 1000:8.1f} ms   "
            f"p95 {run['p95'] * 1000:8.1f} ms   mean batch {run['mean_batch']:.1f}",
            flush=True,
        )
    off, on = results.values()
    print(
        f"ratio (on / off): throughput x{on['rps'] / off['rps']:.2f}, p50 latency x{on['p50'] / off['p50']:.2f}, "
        f"p95 latency x{on['p95'] / off['p95']:.2f}"
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
