"""Benchmark: torch CPU threads on a machine other jobs keep busy — torch's own default vs facellm's choice.

The workload is what the quickstart spends its time on: fine-tuning steps of the tiny model
(forward, backward, AdamW) at batch 16, measured for a fixed wall time. Each setting runs in a
fresh process, first on the machine as it is, then with ``--burners`` CPU-burning neighbours
(``python -c 'while True: pass'``) started before it.

* reference: torch's default thread count (OMP_NUM_THREADS unset: one per core it sees).
* ours: the count ``facellm_cli.runtime.configure_threads()`` chooses (usable cores less busy ones).

Run: PYTHONPATH=src python bench/threads.py [--seconds 8] [--burners 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import sys, time, torch
from facellm_cli.testing import build_tiny_model
from transformers import AutoModelForImageTextToText
mode, model_dir, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if mode == "facellm":
    from facellm_cli.runtime import configure_threads
    configure_threads()
threads = torch.get_num_threads()
torch.manual_seed(0)
model = AutoModelForImageTextToText.from_pretrained(model_dir)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, 200, (16, 64))
def step():
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
step()
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < seconds:
    step(); n += 1
print(threads, n / (time.perf_counter() - t0))
"""


def run(mode: str, model: Path, seconds: float) -> tuple[int, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(model), str(seconds)], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    threads, rate = out.stdout.split()
    return int(threads), float(rate)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--burners", type=int, default=2)
    args = ap.parse_args()
    from facellm_cli.runtime import usable_cores
    from facellm_cli.testing import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny", "internvl")
        print(f"usable cores {usable_cores()}, load average {os.getloadavg()[0]:.1f} before the burners")
        for label, burners in (("as it is", 0), (f"+{args.burners} burners", args.burners)):
            procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)]
            try:
                time.sleep(1.0 if burners else 0)
                ref_t, ref = run("torch", model, args.seconds)
                our_t, ours = run("facellm", model, args.seconds)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            print(
                f"{label:>12}: torch default {ref_t} threads {ref:7.2f} steps/s | facellm {our_t} threads "
                f"{ours:7.2f} steps/s | ratio {ours / ref:5.2f}x"
            )


if __name__ == "__main__":
    main()
