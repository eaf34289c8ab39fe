"""Fast-path choices made by measurement or by what the hardware supports, not by assumption.

On a CPU the faster attention kernel depends on the sequence length and the machine, so
`attn_implementation: auto` times both on the real model and batch shape before training. On a GPU
sdpa (flash / memory-efficient kernels) always wins, and bf16, TF32 and fused AdamW are the defaults.
The measurements are on the documentation's Performance page (`docs/performance.md`).
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn
from transformers import TrainingArguments

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "sdpa", "eager")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (a container, a Slurm job or a lent
    GPU machine often allows fewer than `os.cpu_count()`, the machine's total), else the total."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _step_seconds(model: nn.Module, batch: torch.Tensor, names: tuple[str, ...], rounds: int) -> dict[str, float]:
    """Median seconds of forward + backward per implementation, alternating them step by step so that
    machine noise hits both alike (no optimizer step: the weights are left as they were)."""
    times = {name: [] for name in names}
    for r in range(rounds + 1):
        for name in names:
            model.set_attn_implementation(name)
            start = time.perf_counter()
            model(pixel_values=batch).loss.backward()
            if r > 0:  # round 0 pays for lazy initialisation and is dropped
                times[name].append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def choose_attention(model: nn.Module, batch_size: int, margin: float = 0.15, steps: int = 5) -> str:
    """The attention implementation to train `model` with: sdpa on a GPU, the measured faster one on a CPU.

    eager replaces sdpa only when it is more than `margin` faster, so that near-ties (which timing noise
    would flip from run to run) always resolve to the same choice. Timing uses a random batch of the
    training shape (at most 16 images) under a forked RNG, so the training run's random stream is untouched.

    Args:
        model: a `MedMAEForPreTraining` (or any model whose forward takes `pixel_values` and returns `.loss`).
        batch_size: the per-device training batch size.
        margin: the relative speed-up eager must show over sdpa to be chosen.
        steps: timed forward+backward passes per implementation (median), alternating between them.

    Example:
        >>> choose_attention(model, batch_size=32)  # doctest: +SKIP
        'sdpa'
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        return "sdpa"
    config = model.config
    size = config.image_size if isinstance(config.image_size, int) else tuple(config.image_size)
    hw = (size, size) if isinstance(size, int) else size
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        batch = torch.randn(min(batch_size, 16), config.num_channels, *hw)
        model.train()
        seconds = _step_seconds(model, batch, ("sdpa", "eager"), steps)
    model.train(was_training)
    choice = "eager" if seconds["eager"] * (1 + margin) < seconds["sdpa"] else "sdpa"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        decided = [choice]  # every rank must run the same kernels: rank 0's measurement decides
        torch.distributed.broadcast_object_list(decided, src=0)
        choice = decided[0]
    model.set_attn_implementation(choice)
    logger.info(
        "attention: %s (measured s/step at batch %d: sdpa %.3f, eager %.3f)",
        choice,
        len(batch),
        seconds["sdpa"],
        seconds["eager"],
    )
    return choice


def choose_precision(
    model: nn.Module, batch: dict, margin: float = 0.15, steps: int = 5
) -> tuple[bool, dict[str, float]]:
    """Whether to train `model` with bf16 autocast on this CPU: only when a measurement shows it > `margin` faster.

    Called only where the CPU has native bf16 (`cpu_has_native_bf16`): emulated bf16 is several times slower.
    Forward + backward on the real training batch, fp32 and bf16 alternating step by step, under a forked RNG
    (the run's random stream is untouched) and without an optimizer step (the weights are left as they were).

    Args:
        model: the model to train; `model(**batch).loss` must exist.
        batch: one collated training batch.
        margin: the relative speed-up bf16 must show.
        steps: timed steps per precision (median).

    Returns:
        (use bf16, {"fp32": s/step, "bf16": s/step}).

    Example:
        >>> choose_precision(model, next(iter(trainer.get_train_dataloader())))  # doctest: +SKIP
        (True, {'fp32': 0.41, 'bf16': 0.22})
    """
    was_training, times = model.training, {"fp32": [], "bf16": []}
    model.train()
    with torch.random.fork_rng(devices=[]):
        for r in range(steps + 1):
            for name in times:
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                    loss = model(**batch).loss
                loss.backward()
                if r > 0:  # round 0 pays for lazy initialisation and is dropped
                    times[name].append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    seconds = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    use = seconds["bf16"] * (1 + margin) < seconds["fp32"]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        decided = [use]  # every rank must train alike: rank 0's measurement decides
        torch.distributed.broadcast_object_list(decided, src=0)
        use = decided[0]
    logger.info(
        "precision: %s (measured s/step: fp32 %.3f, bf16 %.3f)",
        "bf16" if use else "fp32",
        seconds["fp32"],
        seconds["bf16"],
    )
    return use, seconds


def apply_fast_defaults(args: TrainingArguments) -> None:
    """Fast settings the user did not choose otherwise: TF32 matmuls on Ampere+ GPUs.

    Precision and pinned memory are settled by `MedTrainingArguments`; fused AdamW is already the Trainer's default
    optimizer. On a CPU-only run, dataloader workers take cores from the training step itself: that is warned
    about, not overridden, since heavy augmentation can still make workers worth it.
    """
    if torch.cuda.is_available() and not args.use_cpu:
        if args.tf32 is None and torch.cuda.get_device_capability()[0] >= 8:
            args.tf32 = True
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls the bf16 autocast leaves
            torch.backends.cudnn.allow_tf32 = True
    else:
        cores = usable_cores()
        if args.dataloader_num_workers and 2 * args.dataloader_num_workers >= cores:
            logger.warning(
                "dataloader_num_workers=%d on a CPU-only run with %d cores: the workers compete with the training "
                "step for cores. Set dataloader_num_workers: 0 unless a short run with workers shows a higher "
                "train_samples_per_second in its all_results.json (see the Performance page of the documentation).",
                args.dataloader_num_workers,
                cores,
            )
