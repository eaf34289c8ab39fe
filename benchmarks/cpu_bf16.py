#!/usr/bin/env python
"""bf16 autocast vs fp32 on this CPU, through the real `run_mae.py`: speed, the loss curve, and what `auto` picks.

For each precision, `run_mae.py` runs the config as a subprocess for `--short` and `--long` steps (no
evaluation during training, one checkpoint at the end for the loss log). The steady-state rate is the
difference in images over the difference in `train_runtime` (start-up costs cancel). The long runs give
the training-loss curves (every `--log-every` steps) and the final validation loss, to check that bf16
tracks fp32. A last short run with `precision: auto` records what the start-up measurement chose.
Prints a table, writes JSON and a PNG of the two loss curves.

    python benchmarks/cpu_bf16.py                                   # quickstart, 30 and 300 steps
    python benchmarks/cpu_bf16.py --config configs/seed001_model1_p8.yaml --long 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch

from hf_medmae.performance import cpu_has_native_bf16
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]


def run_mae(config: str, precision: str, steps: int, out: Path, log_every: int) -> dict:
    """One run_mae.py run; (all_results.json, the logged training losses by step)."""
    flags = {
        "precision": precision,
        "max_steps": steps,
        "output_dir": str(out),
        "eval_strategy": "no",
        "save_strategy": "steps",
        "save_steps": steps,
        "logging_steps": log_every,
        "disable_tqdm": True,
        "report_to": "none",
        "attn_implementation": "sdpa",
    }
    cmd = [sys.executable, str(ROOT / "run_mae.py"), "--config", config] + [
        x for k, v in flags.items() for x in (f"--{k}", str(v))
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads((out / "all_results.json").read_text())
    history = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())["log_history"]
    results["losses"] = {int(h["step"]): h["loss"] for h in history if "loss" in h}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--short", type=int, default=30)
    parser.add_argument("--long", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--repeats", type=int, default=2, help="(short, long) pairs per precision, alternating precisions"
    )
    parser.add_argument("--output", default="benchmarks/results/cpu_bf16.json")
    args = parser.parse_args()
    batch = 32  # the configs' per_device_train_batch_size; read back from all_results below
    rates, finals, curves, evals = {"fp32": [], "bf16": []}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for precision in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):  # alternate: drift hits both alike
                short = run_mae(args.config, precision, args.short, Path(tmp) / f"{precision}_{r}_s", args.log_every)
                long = run_mae(args.config, precision, args.long, Path(tmp) / f"{precision}_{r}_l", args.log_every)
                assert long["precision"] == precision, long["precision"]
                batch = long["train_samples_per_second"] * long["train_runtime"] / args.long
                rates[precision].append(
                    (args.long - args.short) * batch / (long["train_runtime"] - short["train_runtime"])
                )
                if r == 0:
                    curves[precision], evals[precision] = long["losses"], long.get("eval_loss")
                    finals[precision] = statistics.mean(list(long["losses"].values())[-5:])
                print(
                    f"repeat {r} {precision}: {rates[precision][-1]:.1f} img/s steady state; final train loss "
                    f"{statistics.mean(list(long['losses'].values())[-5:]):.4f}; eval loss {long.get('eval_loss')}",
                    flush=True,
                )
        auto = run_mae(args.config, "auto", args.short, Path(tmp) / "auto", args.log_every)
    steps = sorted(set(curves["fp32"]) & set(curves["bf16"]))
    relative = [abs(curves["bf16"][s] - curves["fp32"][s]) / curves["fp32"][s] for s in steps]
    rate = {p: statistics.median(v) for p, v in rates.items()}
    result = dict(
        hardware=hardware_description(),
        torch=torch.__version__,
        native_bf16=cpu_has_native_bf16(),
        config=args.config,
        short=args.short,
        long=args.long,
        repeats=args.repeats,
        batch=round(batch),
        steady_img_s={p: round(v, 1) for p, v in rate.items()},
        steady_img_s_repeats={p: [round(x, 1) for x in v] for p, v in rates.items()},
        speedup_bf16=round(rate["bf16"] / rate["fp32"], 3),
        final_train_loss={p: round(v, 5) for p, v in finals.items()},
        eval_loss=evals,
        loss_curve_max_relative_difference=round(max(relative), 4),
        loss_curve_mean_relative_difference=round(statistics.mean(relative), 4),
        auto_choice=auto["precision"],
        auto_measured_s_per_step=auto.get("precision_step_runtime"),
        loss_curves={p: {str(s): v for s, v in c.items()} for p, c in curves.items()},
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    figure = Path(args.output).with_suffix(".png")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for precision, style in (("fp32", "-"), ("bf16", "--")):
        ax.plot(
            steps, [curves[precision][s] for s in steps], style, label=f"{precision} ({rate[precision]:.0f} img/s)"
        )
    ax.set(
        xlabel="optimizer step",
        ylabel="training loss (MSE, masked patches)",
        title=f"{Path(args.config).stem}: bf16 autocast vs fp32 on {result['hardware'].split(',')[0]}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    print(f"\n{'precision':>9} {'img/s':>7} {'final loss':>10} {'eval loss':>10}")
    for p in ("fp32", "bf16"):
        print(
            f"{p:>9} {rate[p]:>7.1f} {finals[p]:>10.4f} {evals[p] if evals[p] is None else round(evals[p], 4)!s:>10}"
        )
    print(
        f"bf16 speed-up {result['speedup_bf16']}x; loss curves differ by "
        f"{result['loss_curve_mean_relative_difference']:.2%} on average "
        f"(max {result['loss_curve_max_relative_difference']:.2%}); precision: auto chose {auto['precision']}"
    )
    print(f"hardware: {result['hardware']}\nwrote {args.output} and {figure}")


if __name__ == "__main__":
    main()
