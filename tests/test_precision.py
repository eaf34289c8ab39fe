"""The requested precision reaches the Trainer's accelerator, and a bf16 run trains (close to fp32, not equal)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import Trainer

from hf_medmae import MedMAEForPreTraining, MedTrainingArguments
from hf_medmae.performance import cpu_has_native_bf16
from hf_medmae.tasks.run import TaskSetup, settle


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 32):
        self.x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "noise": torch.rand(64, generator=torch.Generator().manual_seed(i))}


def args_for(tmp_path, precision: str, **kw) -> MedTrainingArguments:
    return MedTrainingArguments(
        output_dir=str(tmp_path / precision),
        precision=precision,
        use_cpu=True,
        report_to="none",
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kw,
    )


@pytest.mark.parametrize("precision, expected", [("bf16", "bf16"), ("fp32", "no")])
def test_requested_precision_reaches_the_accelerator(tmp_path, precision, expected):
    args = args_for(tmp_path, precision)
    trainer = Trainer(model=MedMAEForPreTraining(tiny_config()), args=args, train_dataset=Images())
    assert trainer.accelerator.mixed_precision == expected


def test_bf16_run_tracks_fp32_but_differs(tmp_path, one_thread):
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        trainer = Trainer(
            model=MedMAEForPreTraining(tiny_config()), args=args_for(tmp_path, precision), train_dataset=Images()
        )
        trainer.train()
        losses[precision] = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses["fp32"]) == 8
    assert not torch.equal(losses["fp32"], losses["bf16"])  # autocast really ran: bf16 matmuls round differently
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=0.05, atol=0.0)  # ...and the run still tracks fp32


def test_auto_measures_only_on_cpus_with_native_bf16(tmp_path):
    args = args_for(tmp_path, "auto")
    assert args.measure_precision == cpu_has_native_bf16() and args.bf16 is False
    setup = TaskSetup(MedMAEForPreTraining(tiny_config()), Images(), None, None, "generated")
    settled, chosen = settle(args, setup)
    if cpu_has_native_bf16():  # measured: bf16 only where it was more than the 15% margin faster
        seconds = chosen["precision_step_runtime"]
        assert seconds["fp32"] > 0 and seconds["bf16"] > 0
        assert chosen["precision"] == ("bf16" if seconds["bf16"] * 1.15 < seconds["fp32"] else "fp32")
    else:  # emulated bf16 is slower: fp32 without measuring
        assert chosen == {"precision": "fp32"}
    assert settled.bf16 == (chosen["precision"] == "bf16")
    assert settled.mixed_precision == ("bf16" if settled.bf16 else "no")  # what the Trainer's accelerator will read


def test_lr_rule_and_push_are_settled_before_the_trainer(tmp_path):
    args = args_for(tmp_path, "fp32", base_learning_rate=1.5e-4, gradient_accumulation_steps=2, push_to_hub=True)
    assert args.learning_rate == pytest.approx(1.5e-4 * 8 * 2 / 256)
    assert args.push_at_end and not args.push_to_hub  # the Trainer never pushes its own card or training_args.bin


def test_transformers_own_bf16_flag_is_honoured(tmp_path):
    args = MedTrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none")
    assert args.precision == "bf16" and args.mixed_precision == "bf16"
