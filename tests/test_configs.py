"""Every shipped config parses into run_mae.py's arguments and builds a valid model config."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from hf_medmae.tasks import pretrain
from hf_medmae.cli import parse_config

MAE_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml")
                     if not any(word in p.name for word in ("classification", "segmentation", "accelerate")))


@pytest.mark.parametrize("path", MAE_CONFIGS, ids=lambda p: Path(p).name)
def test_shipped_mae_configs_parse(path):
    model_args, data_args, training_args = parse_config(pretrain.Pretrain.arguments, ["--config", str(path)])
    config = pretrain.mae_config(model_args, model_args.num_channels or 3)
    assert config.image_size % config.patch_size == 0 and training_args.output_dir.startswith("outputs/")


def test_multinode_launch_config_is_one_accelerate_reads():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate_multinode.yaml"))
    assert config.num_machines == 2 and config.num_processes == 16 and config.distributed_type == "MULTI_GPU"
