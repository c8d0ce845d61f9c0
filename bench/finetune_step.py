"""Training throughput and peak memory: facellm's finetune step vs a plain peft + Trainer loop.

Both variants train the same LoRA (or QLoRA / full) model on the same synthetic
batches (image tokens + prompt + an answer of ``--answer`` tokens at the end)
with the same TrainingArguments. The only difference is the loss:

- reference: transformers' default ``Trainer.compute_loss`` with ``labels``, so the
  model computes logits for every position over the whole vocabulary;
- ours: ``facellm_cli.train.finetune``'s trainer, logits only at assistant positions
  (``logits_to_keep`` boolean mask) and a summed cross-entropy.

Each variant runs in its own subprocess so peak memory is its own. Shapes:
``tiny`` (the test model, CPU), ``tiny-vocab`` (tiny, with InternVL3's 151,674-token
vocabulary, CPU), or random weights of the real InternVL3-1B-hf /
InternVL3-8B-hf sizes (``internvl3-1b``, ``internvl3-8b``; use a GPU).

    python bench/finetune_step.py                                  # tiny, CPU
    python bench/finetune_step.py --shape internvl3-1b --batch 10 --seq 600
    python bench/finetune_step.py --shape internvl3-8b --method qlora --batch 2 --seq 600 --grad-ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from facellm_cli.testing.shapes import SHAPES, VOCAB


def build_model_dir(shape: str, out: Path) -> Path:
    """A loadable checkpoint folder: tiny test model, or random weights of a real shape (+ the tiny processor)."""
    from facellm_cli.testing import build_tiny_model

    tiny = build_tiny_model(out / "tiny", "internvl")
    if shape == "tiny":
        return tiny
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    if shape == "tiny-vocab":  # tiny dims with InternVL3's real vocabulary: where full logits start to cost
        config = InternVLConfig.from_pretrained(tiny)
        config.text_config.vocab_size = VOCAB
        torch.manual_seed(0)
        path = out / shape
        InternVLForConditionalGeneration(config).save_pretrained(path)
        for f in tiny.iterdir():
            if f.suffix in (".json", ".jinja") and not f.name.startswith(("config", "generation", "model")):
                (path / f.name).write_bytes(f.read_bytes())
        return path
    from facellm_cli.testing.shapes import real_shape_config

    config = real_shape_config(shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = InternVLForConditionalGeneration(config).to(torch.bfloat16)
    path = out / shape
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    for f in tiny.iterdir():  # processor/tokenizer files; the bench feeds token ids directly
        if f.suffix in (".json", ".jinja") and not f.name.startswith(("config", "generation", "model")):
            (path / f.name).write_bytes(f.read_bytes())
    return path


def run_variant(args: argparse.Namespace) -> dict:
    import resource

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from facellm_cli.config import FinetuneConfig
    from facellm_cli.models.loader import load_model_and_processor
    from facellm_cli.train.finetune import checkpointing_args, make_trainer_class, prepare_model

    cfg = FinetuneConfig.model_validate(
        {
            "model": {"model": args.model_dir, "dtype": args.dtype, "device": args.device},
            "method": args.method,
            "lora": {"r": 16, "alpha": 32},
            "train": {"batch_size": args.batch, "gradient_checkpointing": args.grad_ckpt},
        }
    )
    lm = load_model_and_processor(cfg.model)
    model = prepare_model(lm.model, cfg)
    conf = lm.model.config
    vocab = conf.text_config.vocab_size
    n_img = int(conf.image_seq_length)
    size = int(
        conf.vision_config.image_size
        if isinstance(conf.vision_config.image_size, int)
        else conf.vision_config.image_size[0]
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 10, (args.seq,), generator=g)
    ids[1 : 1 + n_img] = conf.image_token_id
    labels = torch.full_like(ids, -100)
    labels[-args.answer :] = ids[-args.answer :]
    item = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(1, 3, size, size, generator=g),
    }

    def collate(batch: list[dict]) -> dict:
        out = {k: torch.stack([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}
        out["pixel_values"] = torch.cat([b["pixel_values"] for b in batch]).to(getattr(torch, lm.dtype))
        return out

    times: list[float] = []
    cuda = lm.device.startswith("cuda")

    class Clock(TrainerCallback):
        def on_step_end(self, *a: object, **k: object) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            if len(times) == args.warmup and cuda:
                torch.cuda.reset_peak_memory_stats()

    bf16 = cuda and lm.dtype == "bfloat16"
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        bf16=bf16,
        remove_unused_columns=False,
        use_cpu=not cuda,
        seed=0,
        dataloader_num_workers=0,
        **checkpointing_args(TrainingArguments, args.grad_ckpt),  # the argument's name differs before 5.20
    )
    data = [item] * (args.batch * (args.warmup + args.steps))
    cls = make_trainer_class() if args.variant == "ours" else Trainer
    kwargs = {"samples_log": None} if args.variant == "ours" else {}
    trainer = cls(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Clock()], **kwargs)
    trainer.train()
    steady = times[-1] - times[args.warmup - 1]
    peak = int(torch.cuda.max_memory_allocated()) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": args.variant,
        "samples_per_s": args.batch * args.steps / steady,
        "peak_bytes": peak,
        "peak_kind": "cuda max allocated" if cuda else "process peak RSS",
        "device": lm.device,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "tiny-vocab", *SHAPES], default="tiny")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="tokens per sample (image tokens included)")
    p.add_argument("--answer", type=int, default=16, help="supervised (assistant) tokens at the end of each sample")
    p.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.shape, Path(tmp))
        results = {}
        for variant in ("reference", "ours"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--model-dir", str(model_dir)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, ours = results["reference"], results["ours"]
    print(
        f"shape={args.shape} method={args.method} batch={args.batch} seq={args.seq} answer={args.answer} "
        f"steps={args.steps} device={ours['device']} trainable={ours['trainable']:,}"
    )
    print(f"{'':28}{'samples/s':>12}{'peak GiB':>12}  ({ours['peak_kind']})")
    for name, r in (("plain peft + Trainer", ref), ("facellm finetune", ours)):
        print(f"{name:28}{r['samples_per_s']:12.2f}{r['peak_bytes'] / 2**30:12.3f}")
    print(
        f"{'ratio (ours / reference)':28}{ours['samples_per_s'] / ref['samples_per_s']:12.2f}"
        f"{ours['peak_bytes'] / ref['peak_bytes']:12.3f}"
    )


if __name__ == "__main__":
    main()
