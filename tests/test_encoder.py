"""`load_encoder`: strict, safetensors-only conversion of MAE / ViT / hf_medmae checkpoints to a ViTModel."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

from hf_medmae.configuration import MedMAEConfig
from hf_medmae.encoder import interpolate_pos_embed, load_encoder, mae_encoder_state_dict, vit_config_from
from hf_medmae.errors import CheckpointError, ConfigError
from hf_medmae.modeling_mae import MedMAEForPreTraining

MEAN, STD = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]


def tiny_mae(channels: int = 3) -> MedMAEForPreTraining:
    config = MedMAEConfig(
        num_channels=channels,
        image_size=32,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    torch.manual_seed(0)
    return MedMAEForPreTraining(config)


@pytest.fixture(scope="module")
def mae_dir(tmp_path_factory):
    model, folder = tiny_mae(), tmp_path_factory.mktemp("mae")
    model.save_pretrained(folder)
    ViTImageProcessor(image_mean=MEAN, image_std=STD, do_resize=False, do_rescale=False).save_pretrained(folder)
    return model, folder


def copy_dir(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("channels", [1, 16])
def test_round_trip_is_tensor_for_tensor(channels, tmp_path):
    model = tiny_mae(channels)
    model.save_pretrained(tmp_path)
    encoder = load_encoder(tmp_path)
    reference, loaded = mae_encoder_state_dict(model), encoder.state_dict()
    assert set(loaded) == set(reference)
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key
    assert encoder.config.num_channels == channels and encoder.pooler is None
    assert encoder.image_mean is None and encoder.image_std is None  # no preprocessor saved


def test_position_embeddings_become_learnable_and_normalisation_travels(mae_dir, tmp_path):
    model, folder = mae_dir
    assert not model.vit.embeddings.position_embeddings.requires_grad  # MAE: fixed sin-cos
    encoder = load_encoder(folder)
    assert isinstance(encoder.embeddings.position_embeddings, torch.nn.Parameter)
    assert encoder.embeddings.position_embeddings.requires_grad
    assert encoder.image_mean == pytest.approx(MEAN) and encoder.image_std == pytest.approx(STD)
    encoder.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["image_mean"] == pytest.approx(MEAN) and saved["image_std"] == pytest.approx(STD)
    assert load_encoder(tmp_path).image_std == pytest.approx(STD)  # read back from config.json


def test_forward_matches_the_mae_encoder_blocks(mae_dir):
    model, folder = mae_dir
    encoder = load_encoder(folder).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = encoder(pixels).last_hidden_state  # [2, 1 + 64, 32]
        emb, vit = model.vit.embeddings, model.vit.eval()
        tokens = emb.patch_embeddings(pixels) + emb.position_embeddings[:, 1:]
        hidden = torch.cat([(emb.cls_token + emb.position_embeddings[:, :1]).expand(2, -1, -1), tokens], dim=1)
        for layer in vit.layers:
            hidden = layer(hidden, None)
        expected = vit.layernorm(hidden)
    assert out.shape == (2, 65, 32)
    torch.testing.assert_close(out, expected)


def rewrite_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_encoder_key_is_named(mae_dir, tmp_path):
    folder = copy_dir(mae_dir[1], tmp_path)
    victim = next(k for k in load_file(folder / "model.safetensors") if k.startswith("vit.") and ".1." in k)
    rewrite_weights(folder, lambda s: s.pop(victim))
    with pytest.raises(CheckpointError, match="missing") as err:
        load_encoder(folder)
    # the on-disk name may be the pre-v5 spelling; the error names the ViTModel key of the same block
    assert "layers.1." in str(err.value)


def test_unexpected_and_misshaped_keys_are_named(mae_dir, tmp_path):
    folder = copy_dir(mae_dir[1], tmp_path)
    rewrite_weights(folder, lambda s: s.update({"vit.layers.7.mlp.fc1.weight": torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError, match=r"layers\.7\.mlp\.fc1\.weight"):
        load_encoder(folder)
    folder = copy_dir(mae_dir[1], tmp_path / "b")
    rewrite_weights(folder, lambda s: s.update({"vit.layernorm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"(?s)layernorm\.weight.*\(31,\).*\(32,\)"):
        load_encoder(folder)


def test_decoder_keys_are_ignored_but_only_those(mae_dir, tmp_path):
    folder = copy_dir(mae_dir[1], tmp_path)
    rewrite_weights(folder, lambda s: [s.pop(k) for k in [k for k in s if k.startswith("decoder.")]])
    load_encoder(folder)  # an MAE checkpoint without its decoder still has a complete encoder


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_mae().config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: loading it would fail differently")
    with pytest.raises(CheckpointError, match="pickled weights are refused") as err:
        load_encoder(tmp_path)
    assert "safe_serialization" in str(err.value)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_encoder(tmp_path)


def test_unsupported_model_type_is_named(mae_dir, tmp_path):
    folder = copy_dir(mae_dir[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="(?s)'bert'.*medmae"):
        load_encoder(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_encoder(tmp_path / "does-not-exist")


def test_image_size_change_interpolates_position_embeddings(mae_dir):
    model, folder = mae_dir
    same = load_encoder(folder, image_size=32)
    assert torch.equal(same.embeddings.position_embeddings, model.vit.embeddings.position_embeddings)
    bigger = load_encoder(folder, image_size=48)
    pos = bigger.embeddings.position_embeddings
    assert pos.shape == (1, 1 + 12 * 12, 32) and pos.requires_grad and bigger.config.image_size == 48
    assert torch.equal(pos[:, 0], model.vit.embeddings.position_embeddings[:, 0])  # CLS position kept
    assert bigger(torch.randn(2, 3, 48, 48)).last_hidden_state.shape == (2, 145, 32)
    with pytest.raises(ConfigError, match="multiple"):
        load_encoder(folder, image_size=30)


def test_interpolation_is_identity_on_same_grid_and_keeps_constant_fields():
    pos = torch.randn(1, 1 + 8 * 8, 16)
    assert interpolate_pos_embed(pos, (8, 8), (8, 8)) is pos
    constant = torch.ones(1, 1 + 8 * 8, 4) * torch.arange(4.0)  # each channel constant over the grid
    resized = interpolate_pos_embed(constant, (8, 8), (4, 6))
    assert resized.shape == (1, 1 + 24, 4)
    torch.testing.assert_close(resized, torch.ones(1, 25, 4) * torch.arange(4.0))


def test_plain_vit_checkpoints_with_and_without_prefix(tmp_path):
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        num_labels=3,
    )
    classifier = ViTForImageClassification(config)
    classifier.save_pretrained(tmp_path / "cls")  # keys vit.* + classifier.*
    with_pooler = ViTModel(config)  # pooler.* is ignored, not an error
    with_pooler.save_pretrained(tmp_path / "base")
    for folder, source in ((tmp_path / "cls", classifier.vit), (tmp_path / "base", with_pooler)):
        loaded = load_encoder(folder).state_dict()
        for key, value in mae_encoder_state_dict(source).items():
            assert torch.equal(loaded[key], value), (folder, key)
    # current (v5) key names written directly, without the `vit.` prefix
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "config.json").write_text(config.to_json_string())
    save_file(mae_encoder_state_dict(with_pooler), raw / "model.safetensors")
    assert torch.equal(load_encoder(raw).layers[1].mlp.fc2.weight, with_pooler.layers[1].mlp.fc2.weight)


def test_sharded_checkpoint(tmp_path):
    model = tiny_mae()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_encoder(tmp_path).state_dict()
    for key, value in mae_encoder_state_dict(model).items():
        assert torch.equal(loaded[key], value)


def test_hub_repo_id_from_local_cache_and_offline_miss(mae_dir, tmp_path, monkeypatch):
    # A Hub cache laid out as huggingface_hub writes it: refs/main -> snapshots/<commit>/files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-medmae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(mae_dir[1], repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = load_encoder("someone/tiny-medmae", cache_dir=tmp_path / "cache")
    assert torch.equal(encoder.layernorm.weight, mae_dir[0].vit.layernorm.weight)
    assert encoder.image_mean == pytest.approx(MEAN)
    with pytest.raises(CheckpointError, match=r"not \(completely\) in the local cache"):
        load_encoder("someone/absent-repo", cache_dir=tmp_path / "cache")


def test_vit_config_from_reads_mae_and_nested_configs():
    mae_config = tiny_mae(16).config
    vit = vit_config_from(mae_config)
    assert (vit.model_type, vit.hidden_size, vit.num_channels, vit.patch_size) == ("vit", 32, 16, 4)
    nested = vit_config_from({"model_type": "medmae_classifier", "vit_config": vit.to_dict()})
    assert nested.num_hidden_layers == 2 and nested.num_channels == 16


def test_position_blind_checkpoint_is_warned_about(tmp_path, caplog):
    """Checkpoints from before the sin-cos fix hold all-zero position embeddings: loading says so."""
    model = tiny_mae()
    model.vit.embeddings.position_embeddings.data.zero_()
    model.save_pretrained(tmp_path / "blind")
    with caplog.at_level("WARNING", logger="hf_medmae.encoder"):
        load_encoder(tmp_path / "blind")
    assert "all-zero position embeddings" in caplog.text
    caplog.clear()
    tiny_mae().save_pretrained(tmp_path / "ok")
    with caplog.at_level("WARNING", logger="hf_medmae.encoder"):
        load_encoder(tmp_path / "ok")
    assert "position" not in caplog.text
