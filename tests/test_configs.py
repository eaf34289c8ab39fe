"""Every shipped config parses into run_mae.py's arguments and builds a valid model config."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from hf_medmae.cli import parse_config, read_config_file
from hf_medmae.pretraining import mae_config
from hf_medmae.tasks import pretrain

CONFIGS_3D = sorted(p for p in (ROOT / "configs").glob("*.yaml") if read_config_file(p).get("spatial_dims") == 3)
MAE_CONFIGS = sorted(
    p
    for p in (ROOT / "configs").glob("*.yaml")
    if not any(word in p.name for word in ("classification", "segmentation", "accelerate")) and p not in CONFIGS_3D
)


@pytest.mark.parametrize("path", MAE_CONFIGS, ids=lambda p: Path(p).name)
def test_shipped_mae_configs_parse(path):
    model_args, data_args, training_args = parse_config(pretrain.Pretrain.arguments, ["--config", str(path)])
    config = mae_config(model_args, model_args.num_channels or 3)
    assert config.image_size % config.patch_size == 0 and training_args.output_dir.startswith("outputs/")


@pytest.mark.parametrize("path", CONFIGS_3D, ids=lambda p: Path(p).name)
def test_shipped_3d_configs_parse_into_the_3d_tasks(path):
    from hf_medmae.cli import spatial_dims
    from hf_medmae.modeling_mae3d import MedMAE3DConfig
    from hf_medmae.tasks import segment

    assert spatial_dims(["--config", str(path)]) == 3
    task = segment.TASK if "segmentation" in path.name else pretrain.TASK
    model_args, data_args, training_args = parse_config(task.arguments_for(3), ["--config", str(path)])
    assert len(data_args.roi_size) == 3 and training_args.output_dir.startswith("outputs/")
    if task is pretrain.TASK:  # the MAE it describes is valid for its crop size
        d, h, w = data_args.roi_size
        MedMAE3DConfig(
            num_frames=d,
            image_size=[h, w],
            patch_size=model_args.patch_size,
            tubelet_size=model_args.tubelet_size,
            hidden_size=model_args.hidden_size,
            num_attention_heads=model_args.num_attention_heads,
            decoder_hidden_size=model_args.decoder_hidden_size,
            decoder_num_attention_heads=model_args.decoder_num_attention_heads,
        )


def test_multinode_launch_config_is_one_accelerate_reads():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate_multinode.yaml"))
    assert config.num_machines == 2 and config.num_processes == 16 and config.distributed_type == "MULTI_GPU"
