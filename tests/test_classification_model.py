"""Classifier on an MAE encoder, drop path, freeze modes and layer-decay parameter groups."""

from __future__ import annotations

import tempfile

import pytest
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTModel

from hf_medmae.classification import MedClsConfig, MedClsForImageClassification, freeze
from hf_medmae.encoder import load_encoder, mae_encoder_state_dict
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.optim import DropPathHook, add_drop_path, drop_path_rates, param_groups_layer_decay


def tiny_encoder(channels: int = 3, layers: int = 2) -> ViTModel:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        num_channels=channels,
    )
    config.image_mean, config.image_std = [0.5] * channels, [0.25] * channels
    return ViTModel(config, add_pooling_layer=False)


def tiny_classifier(num_labels: int = 3, **cfg) -> MedClsForImageClassification:
    cfg.setdefault("drop_path_rate", 0.0)
    return MedClsForImageClassification.from_encoder(tiny_encoder(), num_labels, **cfg)


def pixels(n: int = 4, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def test_from_encoder_copies_the_encoder_and_inits_the_head_small():
    encoder = tiny_encoder()
    model = MedClsForImageClassification.from_encoder(encoder, 5, id2label={i: f"c{i}" for i in range(5)})
    for key, value in mae_encoder_state_dict(encoder).items():
        assert torch.equal(model.vit.state_dict()[key], value)
    assert model.vit is not encoder  # a copy, not shared
    assert model.head.weight.std() < 1e-4 and torch.all(model.head.bias == 0)
    assert model.config.label2id == {f"c{i}": i for i in range(5)}
    assert model.config.vit_config["image_mean"] == [0.5] * 3


def test_from_encoder_accepts_an_mae_model():
    from hf_medmae.configuration import MedMAEConfig
    from hf_medmae.modeling_mae import MedMAEForPreTraining

    mae = MedMAEForPreTraining(
        MedMAEConfig(
            num_channels=1,
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
    )
    model = MedClsForImageClassification.from_encoder(mae, 2)
    assert torch.equal(model.vit.embeddings.position_embeddings, mae.vit.embeddings.position_embeddings)
    assert model.vit.embeddings.position_embeddings.requires_grad
    assert model(pixels(channels=1)).logits.shape == (4, 2)


def test_single_label_loss_and_backward():
    model = tiny_classifier(3, label_smoothing=0.1, class_weights=[1.0, 2.0, 3.0])
    labels = torch.tensor([0, 1, 2, 1])
    out = model(pixels(), labels=labels)
    assert out.logits.shape == (4, 3)
    expected = torch.nn.functional.cross_entropy(
        out.logits, labels, weight=torch.tensor([1.0, 2.0, 3.0]), label_smoothing=0.1
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.vit.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_multi_label_loss():
    model = tiny_classifier(4, problem_type="multi_label_classification")
    labels = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    out = model(pixels(), labels=labels)
    torch.testing.assert_close(
        out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels.float())
    )


def test_mean_and_cls_pooling_differ():
    mean, cls = tiny_classifier(3, pooling="mean").eval(), tiny_classifier(3, pooling="cls").eval()
    cls.head.load_state_dict(mean.head.state_dict())
    with torch.no_grad():
        torch.nn.init.normal_(mean.head.weight)  # a visible head, so pooled features show in the logits
        cls.head.weight.copy_(mean.head.weight)
        a, b = mean(pixels()).logits, cls(pixels()).logits
    assert isinstance(cls.fc_norm, torch.nn.Identity) and isinstance(mean.fc_norm, torch.nn.LayerNorm)
    assert not torch.allclose(a, b)


def test_load_encoder_reads_the_classifier_backbone_and_its_normalisation(tmp_path):
    """The classifier's own save/load round trip is in test_modeling_common; this is its encoder read back."""
    model = tiny_classifier(3, pooling="cls", drop_path_rate=0.2, class_weights=[1.0, 1.0, 4.0]).eval()
    model.save_pretrained(tmp_path)
    encoder = load_encoder(tmp_path)
    reference = mae_encoder_state_dict(model)
    assert set(encoder.state_dict()) == set(reference)
    for key, value in reference.items():
        assert torch.equal(encoder.state_dict()[key], value), key
    assert encoder.image_mean == [0.5] * 3 and encoder.image_std == [0.25] * 3


def test_drop_path_is_inactive_in_eval_mode():
    plain = tiny_classifier(3, drop_path_rate=0.0).eval()
    dropped = tiny_classifier(3, drop_path_rate=0.9).eval()
    dropped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(pixels()).logits, dropped(pixels()).logits)
    assert drop_path_rates(3, 0.2) == pytest.approx([0.0, 0.1, 0.2])


def test_drop_path_rate_one_makes_the_last_block_an_identity_in_training():
    model = tiny_classifier(3, drop_path_rate=1.0).train()
    hidden = model.vit(pixels(), output_hidden_states=True).hidden_states  # embeddings + one per block
    assert len(hidden) == 3
    assert torch.equal(hidden[2], hidden[1])  # last block: rate 1.0 -> identity for every sample
    assert not torch.equal(hidden[1], hidden[0])  # first block: rate 0 (linear schedule), still active


def test_drop_path_drops_whole_samples_and_rescales_survivors():
    encoder = tiny_encoder(layers=1).eval()
    layer, inputs = encoder.layers[0], torch.randn(64, 5, 32)
    with torch.no_grad():
        update = layer(inputs) - inputs  # [64, 5, 32] the block's residual update
        layer.register_forward_hook(DropPathHook(0.5), prepend=True, with_kwargs=True)
        layer.train()
        torch.manual_seed(0)
        out = layer(inputs)
    dropped = torch.tensor([torch.equal(o, i) for o, i in zip(out, inputs)])
    assert 0 < int(dropped.sum()) < 64  # some samples dropped, some kept
    torch.testing.assert_close(out[~dropped], inputs[~dropped] + 2.0 * update[~dropped])


def test_label_and_input_checks_raise_data_errors():
    single = tiny_classifier(3)
    with pytest.raises(DataError, match=r"\[3, 7\]"):
        single(pixels(), labels=torch.tensor([0, 3, 7, 1]))
    with pytest.raises(DataError, match="multi_label_classification"):
        single(pixels(), labels=torch.zeros(4, 3))
    multi = tiny_classifier(3, problem_type="multi_label_classification")
    with pytest.raises(DataError, match="(?s)multi-label config with single-label data.*single_label"):
        multi(pixels(), labels=torch.tensor([0, 1, 2, 1]))
    with pytest.raises(DataError, match="(?s)1 channels.*expects 3"):
        single(pixels(channels=1))
    with pytest.raises(DataError, match="48x48"):
        single(pixels(size=48))


def test_config_validation_raises_config_errors():
    vit = {"hidden_size": 32, "num_attention_heads": 2, "image_size": 32, "patch_size": 4}
    with pytest.raises(ConfigError, match="pooling"):
        MedClsConfig(vit_config=vit, pooling="max")
    with pytest.raises(ConfigError, match="class_weights"):
        MedClsConfig(vit_config=vit, num_labels=3, class_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="problem_type"):
        MedClsConfig(vit_config=vit, problem_type="regression")
    with pytest.raises(ConfigError, match="patch_size"):
        MedClsConfig(vit_config={**vit, "image_size": 30})
    assert MedClsConfig().vit_config["hidden_size"] == 768  # default construction works (to_diff_dict needs it)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_freeze_modes_count_trainable_parameters():
    model = tiny_classifier(3)
    head = count(model.fc_norm) + count(model.head)
    assert freeze(model, "full") == count(model)
    assert freeze(model, "linear_probe") == head
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "fc_norm.weight",
        "fc_norm.bias",
        "head.weight",
        "head.bias",
    }
    assert freeze(model, "last_k:1") == head + count(model.vit.layers[1]) + count(model.vit.layernorm)
    assert freeze(model, "last_k:0") == head + count(model.vit.layernorm)
    for bad in ("last_k:3", "last_k:x", "partial"):
        with pytest.raises(ConfigError, match="last_k"):
            freeze(model, bad)


def test_layer_decay_groups():
    model = tiny_classifier(3)
    groups = param_groups_layer_decay(model, base_lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(names) == len(set(names))  # each parameter in exactly one group
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    depth = [
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.layers.0.mlp.fc1.weight",
        "vit.layers.1.mlp.fc1.weight",
        "head.weight",
    ]
    lrs = [lr_of[n] for n in depth]
    assert lrs == sorted(set(lrs)) and lrs[-1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 * 0.5**3)
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    decay = {n for g in groups if g["weight_decay"] == 0.05 for n in g["param_names"]}
    assert {
        "vit.layers.0.attention.q_proj.bias",
        "vit.layers.1.layernorm_before.weight",
        "fc_norm.weight",
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "head.bias",
    } <= no_decay
    assert {"vit.layers.0.attention.q_proj.weight", "head.weight"} <= decay
    freeze(model, "linear_probe")
    frozen = param_groups_layer_decay(model, 1e-3, 0.05)
    trainable = sorted(n for g in frozen for n in g["param_names"])
    assert trainable == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_layer_decay_groups_pass_through_trainer_and_scheduler_keeps_ratios():
    model = tiny_classifier(3)
    groups = param_groups_layer_decay(model, base_lr=1e-3, weight_decay=0.05)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        report_to=[],
        warmup_steps=4,
        lr_scheduler_type="linear",
        learning_rate=5.0,
    )
    optimizer = (torch.optim.AdamW, {"params": groups, "betas": (0.9, 0.999)})
    trainer = Trainer(model, args, optimizer_cls_and_kwargs=optimizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    opt_groups = trainer.optimizer.param_groups
    # torch keeps the group dicts themselves, so the scheduler has already rewritten groups[i]["lr"]
    assert [g["initial_lr"] for g in opt_groups] == pytest.approx([1e-3 * g["lr_scale"] for g in groups])
    assert len({g["initial_lr"] for g in opt_groups}) == 3 + 1  # 2 blocks + embeddings + head ids
    for _ in range(2):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    factors = [g["lr"] / g["initial_lr"] for g in opt_groups]
    assert factors == pytest.approx([0.5] * len(groups))  # warm-up step 2 of 4 scales every group alike


def test_add_drop_path_rejects_models_without_vit():
    with pytest.raises(ConfigError, match="vit"):
        add_drop_path(torch.nn.Linear(2, 2), 0.1)
