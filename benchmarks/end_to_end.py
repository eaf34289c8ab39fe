#!/usr/bin/env python
"""End-to-end `run_mae.py` throughput vs the raw training-step rate: is anything but the model the bottleneck?

For each config and dataloader worker count, `run_mae.py` runs as a subprocess (the real command,
with data loading, augmentation, mask generation, Trainer bookkeeping and logging), for `--short` and
`--long` steps without evaluation or checkpoints. The difference of the two `train_runtime`s divided by
the difference in images is the steady-state rate, free of start-up costs (reading data, first-step
allocation). The raw rate times the same model, batch and attention kernel on a fixed tensor in this
process, right after each pair, so that each repeat's ratio sees one machine state; the row reports
medians over `--repeats` repeats. The raw step is forward, backward, the config's
gradient clipping (`max_grad_norm`, 1.0 by default) and AdamW, the optimisation step the Trainer runs.

    python benchmarks/end_to_end.py                        # quickstart and seed 001 Model 1 p8, workers 0 and 2
    python benchmarks/end_to_end.py --configs configs/quickstart.yaml --workers 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hf_medmae import MedMAEForPreTraining
from hf_medmae.cli import parse_config
from hf_medmae.pretraining import mae_config
from hf_medmae.tasks import pretrain
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]


def time_steps(model, optimizer, batch: torch.Tensor, steps: int, max_grad_norm: float) -> float:
    """Images per second over `steps` fp32 training steps (forward, backward, clipping, AdamW)."""
    start = time.perf_counter()
    for _ in range(steps):
        model(batch).loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if batch.is_cuda:
        torch.cuda.synchronize()
    return steps * batch.shape[0] / (time.perf_counter() - start)


def run_script(config: str, overrides: dict, steps: int, workdir: Path) -> dict:
    """Run run_mae.py for `steps` steps; its all_results.json."""
    out = workdir / f"run_{steps}_{overrides['dataloader_num_workers']}"
    flags = {
        **overrides,
        "max_steps": steps,
        "output_dir": str(out),
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": max(steps // 4, 1),
        "disable_tqdm": True,
        "report_to": "none",
    }
    cmd = [sys.executable, str(ROOT / "run_mae.py"), "--config", config] + [
        x for k, v in flags.items() for x in (f"--{k}", str(v))
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "all_results.json").read_text())


def raw_stepper(config: str, batch_size: int, attn: str):
    """A function giving the median img/s of bare training steps with the config's model and batch size."""
    model_args, _, train_args = parse_config(
        pretrain.Pretrain.arguments, ["--config", config, "--output_dir", tempfile.mkdtemp()]
    )
    channels = model_args.num_channels or 16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = (
        MedMAEForPreTraining._from_config(mae_config(model_args, channels), attn_implementation=attn)
        .train()
        .to(device)
    )
    batch = torch.randn(batch_size, channels, model_args.image_size, model_args.image_size, device=device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True
    )  # the Trainer's default optimizer
    clip = train_args.max_grad_norm or 0.0  # part of the configured optimisation step, like AdamW
    time_steps(model, opt, batch, 2, clip)
    return lambda: statistics.median(time_steps(model, opt, batch, 5, clip) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/quickstart.yaml", "configs/seed001_model1_p8.yaml"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=60)
    parser.add_argument(
        "--repeats", type=int, default=3, help="(short, long) run pairs per row; the median is reported"
    )
    parser.add_argument("--output", default="benchmarks/results/end_to_end.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            raw = None
            for workers in args.workers:
                overrides = {"per_device_train_batch_size": args.batch_size, "dataloader_num_workers": workers}
                ratios, rates, raws = [], [], []
                for _ in range(args.repeats):  # the machine's speed drifts: raw step and run pair timed together
                    short, long = (run_script(config, overrides, n, Path(tmp)) for n in (args.short, args.long))
                    if raw is None:  # the same kernel the runs chose
                        raw = raw_stepper(config, args.batch_size, long["attn_implementation"])
                    raws.append(raw())
                    rates.append(
                        (args.long - args.short) * args.batch_size / (long["train_runtime"] - short["train_runtime"])
                    )
                    ratios.append(rates[-1] / raws[-1])
                e2e, raw_rate = statistics.median(rates), statistics.median(raws)
                rows.append(
                    dict(
                        config=Path(config).stem,
                        workers=workers,
                        batch=args.batch_size,
                        attn=long["attn_implementation"],
                        end_to_end_img_s=round(e2e, 1),
                        raw_img_s=round(raw_rate, 1),
                        ratio=round(statistics.median(ratios), 3),
                        ratios=[round(x, 3) for x in ratios],
                    )
                )
                r = rows[-1]
                print(
                    f"{r['config']:>22} workers {workers}  attn {r['attn']:>5}  end-to-end {r['end_to_end_img_s']:>6} "
                    "img/s  "
                    f"raw step {r['raw_img_s']:>6} img/s  ratio {r['ratio']:.3f}",
                    flush=True,
                )
    hardware = hardware_description()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps(
            dict(
                hardware=hardware,
                torch=torch.__version__,
                short=args.short,
                long=args.long,
                repeats=args.repeats,
                rows=rows,
            ),
            indent=2,
        )
    )
    print(f"hardware: {hardware}\nwrote {args.output}")


if __name__ == "__main__":
    main()
