"""Common tests run over every model class, as transformers' `ModelTesterMixin`: one tiny tester per model.

Each `ModelTester` builds its class from a tiny config (image 32 or volume 8x16x16, patch 4, hidden 32 or 48,
2 layers, 2 heads) for a channel count, and says what a forward must return. The common tests are parametrised
over every tester x channels (1, 3, 16): save/load round trip (state dict, module types, computed tables,
outputs in eval mode under a fixed mask), Auto class and `load_checkpoint` round trip, output shapes, a finite
loss, gradients into every trainable parameter, safetensors only on disk, config `to_dict`/`from_dict`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
    PreTrainedModel,
    ViTConfig,
)

import hf_medmae
from hf_medmae import (
    MedClsConfig,
    MedClsForImageClassification,
    MedCNNConfig,
    MedCNNForImageClassification,
    MedMAE3DConfig,
    MedMAE3DForPreTraining,
    MedMAE3DModel,
    MedMAEForPreTraining,
    MedSegConfig,
    MedSegForSegmentation,
    MedUNetConfig,
    MedUNetForSegmentation,
    load_checkpoint,
)
from hf_medmae.encoder import vit_config_dict
from hf_medmae.masking import MASKED, THROWN, VISIBLE

CHANNELS = (1, 3, 16)
BATCH, LABELS = 2, 3
TINY_VIT = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
# 3D sin-cos positions need widths divisible by 6: 48 instead of 32.
TINY_3D = dict(
    num_frames=8,
    image_size=16,
    patch_size=4,
    tubelet_size=4,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=96,
    decoder_hidden_size=48,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=96,
)
TINY_UNET = [4, 4, 8, 8, 16, 4]


def fixed_codes(batch: int, num_patches: int, visible: int, thrown: int = 0) -> torch.Tensor:
    """[B, L] mask codes, a different seeded order per row: `visible` 0s, `thrown` 2s, the rest 1s."""
    gen = torch.Generator().manual_seed(7)
    codes = torch.full((batch, num_patches), MASKED, dtype=torch.long)
    for row in codes:
        order = torch.randperm(num_patches, generator=gen)
        row[order[:visible]], row[order[visible : visible + thrown]] = VISIBLE, THROWN
    return codes


@dataclass
class ModelTester:
    """What the common tests need to know about one model class.

    Args:
        model_class: the class under test.
        config: channels -> a tiny config.
        inputs: (config, batch) -> forward kwargs, with a fixed mask (`noise` / `mask_codes`) for the MAEs.
        shapes: (config, batch) -> {output field: expected shape}.
        auto_class: the Auto class it is registered with, or None.
        loss: output -> the scalar the gradient test backpropagates (default: `output.loss`).
        no_grad: trainable parameter names that legitimately get no gradient, each with the reason.
        computed: model -> tensors that are computed at construction, not saved (must survive a reload).
        spatial_dims: 2 or 3.
    """

    model_class: type[PreTrainedModel]
    config: Callable[[int], object]
    inputs: Callable[[object, int], dict]
    shapes: Callable[[object, int], dict]
    auto_class: type | None = None
    loss: Callable[[object], torch.Tensor] = lambda out: out.loss
    no_grad: dict[str, str] = field(default_factory=dict)
    computed: Callable[[PreTrainedModel], dict] = lambda model: {}
    spatial_dims: int = 2

    def build(self, channels: int) -> PreTrainedModel:
        return self.model_class(self.config(channels))


def images(channels: int, batch: int = BATCH, size: tuple[int, ...] = (32, 32)) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(3))


def class_labels(batch: int) -> torch.Tensor:
    return torch.arange(batch) % LABELS


def pixel_labels(batch: int, size: tuple[int, ...]) -> torch.Tensor:
    labels = torch.randint(0, LABELS, (batch, *size), generator=torch.Generator().manual_seed(4))
    labels[:, :2] = 255  # unlabelled pixels: ignore_index
    return labels


def tiny_vit(channels: int) -> dict:
    return vit_config_dict(ViTConfig(**TINY_VIT, intermediate_size=64, num_channels=channels))


def mae2d_inputs(config, batch: int) -> dict:
    noise = torch.rand(batch, config.num_patches, generator=torch.Generator().manual_seed(5))
    inputs = {"pixel_values": images(config.num_channels, batch), "noise": noise}
    if config.supervised_loss_weight > 0:
        inputs["labels"] = torch.tensor([0, -100, 2, 1][:batch])  # -100: an unlabeled image
    return inputs


def mae2d_shapes(config, batch: int) -> dict:
    patch_values = config.patch_size**2 * config.num_channels
    shapes = {"logits": (batch, config.num_patches, patch_values), "mask": (batch, config.num_patches)}
    if config.supervised_loss_weight > 0:
        shapes["class_logits"] = (batch, config.num_labels)
    return shapes


def mae3d_config(channels: int, **overrides) -> MedMAE3DConfig:
    return MedMAE3DConfig(**{**TINY_3D, "num_channels": channels, **overrides})


def mae3d_codes(config, batch: int) -> torch.Tensor:
    thrown = round(config.throw_ratio * config.num_patches)
    return fixed_codes(batch, config.num_patches, round((1 - config.mask_ratio) * config.num_patches), thrown)


def mae3d_shapes(config, batch: int) -> dict:
    codes = mae3d_codes(config, batch)
    masked = int((codes[0] == MASKED).sum())
    patch_values = config.tubelet_size * config.patch_size**2 * config.num_channels
    return {"logits": (batch, masked, patch_values), "mask": (batch, config.num_patches)}


def volumes(config: MedMAE3DConfig, batch: int) -> torch.Tensor:
    return images(config.num_channels, batch, config.volume_size)


def seg3d_config(channels: int) -> MedSegConfig:
    encoder = {k: TINY_3D[k] for k in TINY_3D if not k.startswith("decoder")}
    return MedSegConfig(
        vit_config={**encoder, "num_channels": channels}, num_labels=LABELS, feature_size=4, spatial_dims=3
    )


def seg_inputs(config, batch: int) -> dict:
    size = tuple(config.input_size) if hasattr(config, "input_size") else unet_size(config)
    channels = config.vit_config["num_channels"] if hasattr(config, "vit_config") else config.in_channels
    return {"pixel_values": images(channels, batch, size), "labels": pixel_labels(batch, size)}


def seg_shapes(config, batch: int) -> dict:
    size = tuple(config.input_size) if hasattr(config, "input_size") else unet_size(config)
    return {"logits": (batch, config.num_labels, *size)}


def unet_size(config: MedUNetConfig) -> tuple[int, ...]:
    # multiples of 16 (four halvings), and more than one voxel left for the instance norm at the bottom
    return (32, 32) if config.spatial_dims == 2 else (16, 32, 32)


def position_tables_3d(model) -> dict:
    encoder = model.videomae if hasattr(model, "videomae") else model
    tables = {"encoder": encoder.embeddings.position_embeddings}
    if hasattr(model, "videomae"):
        tables["decoder"] = model.position_embeddings
    return tables


TESTERS = {
    "mae2d": ModelTester(
        MedMAEForPreTraining,
        lambda c: tiny_config(num_channels=c),
        mae2d_inputs,
        mae2d_shapes,
        AutoModelForPreTraining,
    ),
    # MSMAE: attention-driven masking that throws patches, and the supervised head on the CLS token.
    "mae2d_msmae": ModelTester(
        MedMAEForPreTraining,
        lambda c: tiny_config(
            num_channels=c,
            mask_generator="attention",
            throw_ratio=0.25,
            supervised_loss_weight=0.1,
            num_labels=LABELS,
            class_weights=[1.0, 2.0, 0.5],
        ),
        mae2d_inputs,
        mae2d_shapes,
        AutoModelForPreTraining,
    ),
    "mae3d": ModelTester(
        MedMAE3DForPreTraining,
        mae3d_config,
        lambda config, batch: {"pixel_values": volumes(config, batch), "mask_codes": mae3d_codes(config, batch)},
        mae3d_shapes,
        AutoModelForPreTraining,
        computed=position_tables_3d,
        spatial_dims=3,
    ),
    "mae3d_attention": ModelTester(
        MedMAE3DForPreTraining,
        lambda c: mae3d_config(c, mask_generator="attention", throw_ratio=0.25, norm_pix_loss=False),
        lambda config, batch: {"pixel_values": volumes(config, batch), "mask_codes": mae3d_codes(config, batch)},
        mae3d_shapes,
        AutoModelForPreTraining,
        computed=position_tables_3d,
        spatial_dims=3,
    ),
    # The 3D backbone `load_encoder` returns; it has no loss, so the gradient test backpropagates its features.
    "encoder3d": ModelTester(
        MedMAE3DModel,
        lambda c: mae3d_config(c),
        lambda config, batch: {"pixel_values": volumes(config, batch)},
        lambda config, batch: {"last_hidden_state": (batch, config.num_patches, config.hidden_size)},
        loss=lambda out: out.last_hidden_state.square().mean(),
        computed=position_tables_3d,
        spatial_dims=3,
    ),
    "classifier": ModelTester(
        MedClsForImageClassification,
        lambda c: MedClsConfig(
            vit_config=tiny_vit(c),
            num_labels=LABELS,
            drop_path_rate=0.1,
            label_smoothing=0.1,
            class_weights=[1.0, 1.0, 4.0],
        ),
        lambda config, batch: {
            "pixel_values": images(config.vit_config["num_channels"], batch),
            "labels": class_labels(batch),
        },
        lambda config, batch: {"logits": (batch, config.num_labels)},
        AutoModelForImageClassification,
    ),
    # CLS pooling (no fc_norm), multi-label BCE, MSMAE token dropping in training.
    "classifier_cls": ModelTester(
        MedClsForImageClassification,
        lambda c: MedClsConfig(
            vit_config=tiny_vit(c),
            num_labels=LABELS,
            pooling="cls",
            drop_path_rate=0.2,
            problem_type="multi_label_classification",
            throw_ratio=0.25,
        ),
        lambda config, batch: {
            "pixel_values": images(config.vit_config["num_channels"], batch),
            "labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[:batch],
        },
        lambda config, batch: {"logits": (batch, config.num_labels)},
        AutoModelForImageClassification,
    ),
    "cnn": ModelTester(
        MedCNNForImageClassification,
        lambda c: MedCNNConfig(architecture="resnet10", num_channels=c, num_labels=LABELS, image_size=32),
        lambda config, batch: {"pixel_values": images(config.num_channels, batch), "labels": class_labels(batch)},
        lambda config, batch: {"logits": (batch, config.num_labels)},
        AutoModelForImageClassification,
    ),
    "segmenter2d": ModelTester(
        MedSegForSegmentation,
        lambda c: MedSegConfig(vit_config=tiny_vit(c), num_labels=LABELS, feature_size=8),
        seg_inputs,
        seg_shapes,
        AutoModelForSemanticSegmentation,
    ),
    "segmenter3d": ModelTester(
        MedSegForSegmentation,
        seg3d_config,
        seg_inputs,
        seg_shapes,
        AutoModelForSemanticSegmentation,
        computed=lambda model: position_tables_3d(model.vit),
        spatial_dims=3,
    ),
    "unet2d": ModelTester(
        MedUNetForSegmentation,
        lambda c: MedUNetConfig(in_channels=c, num_labels=LABELS, features=TINY_UNET, loss="dice_ce"),
        seg_inputs,
        seg_shapes,
        AutoModelForSemanticSegmentation,
    ),
    "unet3d": ModelTester(
        MedUNetForSegmentation,
        lambda c: MedUNetConfig(in_channels=c, num_labels=LABELS, features=TINY_UNET, spatial_dims=3),
        seg_inputs,
        seg_shapes,
        AutoModelForSemanticSegmentation,
        spatial_dims=3,
    ),
}
CASES = [pytest.param(name, c, id=f"{name}-{c}ch") for name in TESTERS for c in CHANNELS]


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def forward(model: PreTrainedModel, inputs: dict, grad: bool = False):
    with torch.set_grad_enabled(grad):
        return model(**inputs)


def output_tensors(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def assert_same_outputs(a, b) -> None:
    a, b = output_tensors(a), output_tensors(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def saved(tester: ModelTester, channels: int, folder: Path) -> tuple[PreTrainedModel, dict]:
    model = tester.build(channels).eval()
    model.save_pretrained(folder)
    return model, tester.inputs(model.config, BATCH)


def test_every_model_class_has_a_tester():
    """A new `PreTrainedModel` in the package must join TESTERS."""
    classes = {
        obj
        for name in hf_medmae.__all__
        if isinstance(obj := getattr(hf_medmae, name), type) and issubclass(obj, PreTrainedModel)
    }
    assert classes == {tester.model_class for tester in TESTERS.values()}


@pytest.mark.parametrize("name, channels", CASES)
def test_save_load_round_trip_is_exact(name, channels, tmp_path):
    tester = TESTERS[name]
    model, inputs = saved(tester, channels, tmp_path)
    loaded = tester.model_class.from_pretrained(tmp_path).eval()
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]  # class swaps survive
    reference, weights = model.state_dict(), loaded.state_dict()
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(weights[key], value), key
    for key, table in tester.computed(model).items():  # rebuilt on load, on the CPU, not left on the meta device
        rebuilt = tester.computed(loaded)[key]
        assert rebuilt.device.type == "cpu" and torch.equal(rebuilt, table), key
    assert_same_outputs(forward(loaded, inputs), forward(model, inputs))
    fresh = tester.build(channels).eval()
    changed = [k for k, v in fresh.state_dict().items() if v.is_floating_point() and not torch.equal(v, reference[k])]
    assert changed  # a fresh model differs, so the equal outputs above come from the loaded weights


@pytest.mark.parametrize("name, channels", CASES)
def test_checkpoint_is_safetensors_under_the_current_key_names(name, channels, tmp_path):
    """Only JSON and safetensors on disk; the keys are the model's own, so the Trainer's non-strict, non-renaming
    `load_state_dict` (resume, best-model reload) restores every weight."""
    model, _ = saved(TESTERS[name], channels, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    result = model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("name, channels", CASES)
def test_auto_class_and_load_checkpoint_round_trip(name, channels, tmp_path):
    tester = TESTERS[name]
    model, inputs = saved(tester, channels, tmp_path)
    config_type = json.loads((tmp_path / "config.json").read_text())["model_type"]
    assert config_type == model.config.model_type == AutoConfig.from_pretrained(tmp_path).model_type
    reference = forward(model, inputs)
    loaders = [lambda: load_checkpoint(tester.model_class, tmp_path)]
    if tester.auto_class is not None:
        loaders += [
            lambda: tester.auto_class.from_pretrained(tmp_path),
            lambda: load_checkpoint(tester.auto_class, tmp_path),
        ]
    for load in loaders:
        loaded = load().eval()
        assert type(loaded) is tester.model_class
        assert_same_outputs(forward(loaded, inputs), reference)


@pytest.mark.parametrize("name, channels", CASES)
def test_output_shapes_and_finite_loss(name, channels):
    tester = TESTERS[name]
    model = tester.build(channels).train()
    out = forward(model, tester.inputs(model.config, BATCH))
    for key, shape in tester.shapes(model.config, BATCH).items():
        assert tuple(out[key].shape) == shape, key
    loss = tester.loss(out)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("name, channels", CASES)
def test_gradients_reach_every_trainable_parameter(name, channels):
    tester = TESTERS[name]
    model = tester.build(channels).train()
    tester.loss(forward(model, tester.inputs(model.config, BATCH), grad=True)).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    without = sorted(n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0)
    assert without == sorted(tester.no_grad)
    assert all(torch.isfinite(p.grad).all() for p in trainable.values() if p.grad is not None)


@pytest.mark.parametrize("name, channels", CASES)
def test_eval_outputs_are_deterministic(name, channels):
    """Eval mode: no dropout, no drop path, no token dropping; the MAEs' masks come from a batch-seeded generator."""
    tester = TESTERS[name]
    model = tester.build(channels).eval()
    inputs = {k: v for k, v in tester.inputs(model.config, BATCH).items() if k not in ("noise", "mask_codes")}
    assert_same_outputs(forward(model, inputs), forward(model, inputs))


@pytest.mark.parametrize("name", TESTERS)
def test_config_dict_and_json_round_trip(name, tmp_path):
    tester = TESTERS[name]
    config = tester.config(3)
    config_class = tester.model_class.config_class
    assert type(config) is config_class
    assert config_class.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert reloaded.pop("_name_or_path") == str(tmp_path)  # where it was read from; the rest is equal
    assert reloaded == {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


# The masking strategy travels in the checkpoint: every generator, 2D and 3D.
GENERATORS = [("random", None), ("block", {"min_block": 2}), ("grid", None), ("foreground", {"mix": 0.3})]
GENERATORS += [("attention", None)]


@pytest.mark.parametrize("generator, kwargs", GENERATORS)
@pytest.mark.parametrize("dims", [2, 3])
def test_mae_checkpoint_rebuilds_its_mask_generator(generator, kwargs, dims, tmp_path):
    make = (lambda **o: tiny_config(num_channels=16, **o)) if dims == 2 else (lambda **o: mae3d_config(2, **o))
    config = make(mask_generator=generator, mask_generator_kwargs=kwargs)
    model_class = MedMAEForPreTraining if dims == 2 else MedMAE3DForPreTraining
    model = model_class(config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert loaded.config.mask_generator == generator == loaded.mask_generator.name
    assert loaded.config.mask_generator_kwargs == kwargs
    x = images(16) if dims == 2 else volumes(config, BATCH)
    assert torch.equal(loaded(x).mask, model(x).mask)  # the same generator draws the same seeded eval masks
