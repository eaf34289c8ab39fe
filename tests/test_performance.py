"""Fast-path choices: measured attention choice leaves training untouched; hardware checks; run_mae wiring."""

import json
import logging
import os

import pytest
import torch
from conftest import tiny_config
from transformers import TrainingArguments

from hf_medmae import MedMAEForPreTraining
from hf_medmae.errors import ConfigError
from hf_medmae.performance import apply_fast_defaults, choose_attention, cpu_has_native_bf16, usable_cores


def tiny_model() -> MedMAEForPreTraining:
    torch.manual_seed(0)
    return MedMAEForPreTraining._from_config(tiny_config(), attn_implementation="sdpa")


def measured_choice(caplog) -> tuple[str, int, float, float]:
    """(choice, batch, sdpa s/step, eager s/step) from choose_attention's log record, unrounded."""
    (record,) = [r for r in caplog.records if r.name == "hf_medmae.performance" and r.msg.startswith("attention:")]
    return record.args


def faster(sdpa: float, eager: float, margin: float = 0.15) -> str:
    return "eager" if eager * (1 + margin) < sdpa else "sdpa"


def test_choosing_attention_leaves_weights_grads_and_rng_untouched(caplog):
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="hf_medmae.performance"):
        choice = choose_attention(model, batch_size=4, steps=1)
    logged, batch, sdpa, eager = measured_choice(caplog)
    assert sdpa > 0 and eager > 0 and batch == 4
    assert choice == logged == faster(sdpa, eager)  # the faster of its two timings, by the default margin
    assert model.config._attn_implementation == choice  # the model now runs the chosen kernel
    assert torch.equal(rng, torch.get_rng_state())  # the training run's masks and dropout are unchanged
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("margin, expected", [(1e9, "sdpa"), (-1.0, "eager")])
def test_eager_needs_to_beat_sdpa_by_the_margin(margin, expected):
    # margin 1e9: no measurement can make eager win; margin -1: eager * 0 always beats sdpa.
    assert choose_attention(tiny_model(), batch_size=2, margin=margin, steps=1) == expected


def test_the_chosen_kernel_computes_the_same_loss():
    model = tiny_model().eval()
    batch = torch.randn(2, model.config.num_channels, model.config.image_size, model.config.image_size)
    losses = {}
    for margin, name in ((1e9, "sdpa"), (-1.0, "eager")):
        assert choose_attention(model, batch_size=2, margin=margin, steps=1) == name
        with torch.no_grad():
            losses[name] = model(batch).loss.item()
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-5)


def test_hardware_checks_and_cpu_defaults(tmp_path, caplog):
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            flags = {f for line in cpuinfo if line.startswith("flags") for f in line.split(":", 1)[1].split()}
        assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})  # what the CPU says it has
    else:
        assert isinstance(cpu_has_native_bf16(), bool)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with caplog.at_level(logging.WARNING, logger="hf_medmae.performance"):
        apply_fast_defaults(args)
    assert args.dataloader_pin_memory is False  # pinning needs an accelerator
    assert "dataloader_num_workers" not in caplog.text  # 0 workers: nothing to warn about
    crowded = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", dataloader_num_workers=os.cpu_count()
    )
    with caplog.at_level(logging.WARNING, logger="hf_medmae.performance"):
        apply_fast_defaults(crowded)
    assert (
        f"dataloader_num_workers={os.cpu_count()} on a CPU-only run" in caplog.text
        and "Set dataloader_num_workers: 0" in caplog.text
    )
    # the fix names what a wheel user has: their own run's numbers, not a script of the source repository
    assert "train_samples_per_second" in caplog.text and "benchmarks/" not in caplog.text
    assert crowded.dataloader_num_workers == os.cpu_count()  # warned, not overridden


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux feature")
def test_usable_cores_follow_the_process_affinity_not_the_machine_total():
    allowed = os.sched_getaffinity(0)
    assert usable_cores() == len(allowed) <= os.cpu_count()
    try:
        os.sched_setaffinity(0, {min(allowed)})  # as a container or a batch job that grants one core
        assert usable_cores() == 1
    finally:
        os.sched_setaffinity(0, allowed)


def test_run_mae_reports_the_attention_it_chose(tmp_path, caplog):
    from hf_medmae.tasks import pretrain

    common = [
        "--train_data",
        "embedded:nuclei16",
        "--max_images",
        "2",
        "--tile_size",
        "64",
        "--image_size",
        "32",
        "--patch_size",
        "8",
        "--hidden_size",
        "32",
        "--num_hidden_layers",
        "1",
        "--num_attention_heads",
        "2",
        "--intermediate_size",
        "64",
        "--decoder_hidden_size",
        "32",
        "--decoder_num_hidden_layers",
        "1",
        "--decoder_num_attention_heads",
        "2",
        "--decoder_intermediate_size",
        "64",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    with caplog.at_level(logging.INFO, logger="hf_medmae.performance"):
        pretrain.main([*common, "--output_dir", str(tmp_path / "run")])  # attn_implementation defaults to auto
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    logged, _, sdpa, eager = measured_choice(caplog)
    assert results["attn_implementation"] == logged == faster(sdpa, eager)  # the kernel measured faster
    with pytest.raises(ConfigError, match="(?s)attn_implementation='flash'.*auto, sdpa, eager"):
        pretrain.main([*common, "--output_dir", str(tmp_path / "bad"), "--attn_implementation", "flash"])
