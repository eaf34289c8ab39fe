"""MSMAE: supervised attention-driven masking in pre-training, attention-driven token dropping in fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, WBC, require, tiny_config
from transformers import ViTConfig, ViTImageProcessorPil, ViTModel, default_data_collator

from hf_medmae import MedClsForImageClassification, MedMAEConfig, MedMAEForPreTraining, load_encoder
from hf_medmae.classification import MedClsConfig
from hf_medmae.data.pretraining import PretrainingDataset
from hf_medmae.data.transforms import Augment, apply_view, resize
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.hub import render_model_card
from hf_medmae.masking import MASKED, THROWN
from hf_medmae.optim import DropPathHook, param_groups_layer_decay

NAMES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
CSV = WBC.parent / "Class Labels of Dataset 1.csv"


def supervised_config(**overrides) -> MedMAEConfig:
    values = dict(
        mask_generator="attention", mask_ratio=0.75, throw_ratio=0.25, supervised_loss_weight=0.5, num_labels=3
    )
    return tiny_config(**{**values, **overrides})


def classifier(channels: int = 3, size: int = 32, patch: int = 4, **cfg) -> MedClsForImageClassification:
    torch.manual_seed(0)
    encoder = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=size,
            patch_size=patch,
            num_channels=channels,
        ),
        add_pooling_layer=False,
    )
    cfg.setdefault("drop_path_rate", 0.0)
    return MedClsForImageClassification.from_encoder(encoder, 3, **cfg)


def block_inputs(model) -> list[torch.Tensor]:
    """Records the hidden states entering the first encoder block of `model` (its sequence length is the cost)."""
    seen = []
    model.vit.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen


# ----------------------------------------------------------------------------- attention maps


@pytest.mark.parametrize("kind", ["mae", "classifier"])
def test_attention_maps_are_equal_under_eager_and_sdpa(kind):
    x = torch.randn(3, 3, 32, 32)
    maps = {}
    for attn in ("eager", "sdpa"):
        torch.manual_seed(0)
        if kind == "mae":
            model = MedMAEForPreTraining._from_config(supervised_config(), attn_implementation=attn)
        else:
            model = classifier(throw_ratio=0.3)
            model.vit.set_attn_implementation(attn)
        assert model.vit.config._attn_implementation == attn
        maps[attn] = model.train().attention_map(x)
    assert maps["eager"].shape == (3, 64) and bool((maps["eager"] >= 0).all() and (maps["eager"] <= 1).all())
    torch.testing.assert_close(maps["eager"], maps["sdpa"], rtol=1e-5, atol=1e-6)
    assert maps["eager"].std() > 0


# ----------------------------------------------------------------------------- pre-training


def test_thrown_patches_reach_neither_the_encoder_nor_the_loss():
    model = MedMAEForPreTraining(supervised_config()).eval()
    latents = []
    model.vit.register_forward_hook(lambda module, args, out: latents.append(out.last_hidden_state))
    x = torch.randn(2, 3, 32, 32)
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    codes[:, :32], codes[:, 32:48] = MASKED, THROWN
    changed = model.patchify(x).clone()
    changed[:, 32:48] = torch.randn_like(changed[:, 32:48]) * 10  # new pixels in every thrown patch, nowhere else
    changed = model.unpatchify(changed, (32, 32))
    labels = torch.tensor([0, 2])
    a, b = model(x, mask_codes=codes, labels=labels), model(changed, mask_codes=codes, labels=labels)
    assert a.mask.sum(1).tolist() == [48, 48] and latents[0].shape[1] == 1 + 16  # CLS + the visible patches only
    assert torch.equal(latents[0], latents[1])
    assert torch.equal(a.loss, b.loss) and torch.equal(a.reconstruction_loss, b.reconstruction_loss)
    assert not torch.equal(
        model(changed, mask_codes=torch.where(codes == THROWN, MASKED, codes)).loss, a.loss
    )  # the control


def test_reconstruction_figure_of_a_throwing_model_hides_every_patch_it_does_not_show(tmp_path):
    from hf_medmae.evaluation.reconstruction import save_reconstructions

    model = MedMAEForPreTraining(supervised_config())
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("mask_codes")), with_kwargs=True
    )
    items = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(3)]
    assert Path(save_reconstructions(model, items, str(tmp_path))).is_file()
    codes = seen[-1]  # in training 25% of the grid would be thrown: never trained to be reconstructed, so not drawn so
    assert not (codes == THROWN).any() and (codes == MASKED).sum(1).tolist() == [48, 48, 48]


def test_supervised_head_gradient_reaches_the_encoder():
    model = MedMAEForPreTraining(supervised_config(mask_generator="random", throw_ratio=0.0))
    out = model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 1]))
    torch.testing.assert_close(out.loss, out.reconstruction_loss + 0.5 * out.supervised_loss)
    out.supervised_loss.backward()  # the cross-entropy alone: no reconstruction gradient
    encoder = [
        model.vit.layers[0].attention.q_proj.weight,
        model.vit.layers[-1].mlp.fc2.weight,
        model.vit.embeddings.patch_embeddings.projection.weight,
        model.vit.embeddings.cls_token,
    ]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
    assert model.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.parameters())


def test_unlabeled_images_are_ignored_and_a_batch_without_labels_adds_zero():
    weights = [1.0, 3.0, 0.5]
    model = MedMAEForPreTraining(supervised_config(class_weights=weights))
    logits = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([1, -100, 0, -100, 2])
    expected = torch.nn.functional.cross_entropy(
        logits[labels >= 0], labels[labels >= 0], weight=torch.tensor(weights)
    )
    torch.testing.assert_close(model.supervised_loss(logits, labels), expected)
    none = model.supervised_loss(logits, torch.full((5,), -100))
    assert none.item() == 0.0 and torch.isfinite(none)
    none.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))  # finite, and no pull on any class
    out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([-100, -100]))
    assert out.supervised_loss.item() == 0.0 and torch.equal(out.loss, out.reconstruction_loss)
    with pytest.raises(DataError, match=r"labels \[3\] are outside \[0, 3\)"):
        model(torch.randn(2, 3, 32, 32), labels=torch.tensor([3, -100]))


def test_labels_reach_the_model_through_dataset_and_collator():
    images = [np.random.default_rng(i).random((3, 40, 40), dtype=np.float32) for i in range(4)]
    plain = PretrainingDataset(images, [0.5] * 3, [0.3] * 3, 32, Augment(32), seed=0, mask_noise_patches=64)
    labelled = PretrainingDataset(
        images,
        [0.5] * 3,
        [0.3] * 3,
        32,
        Augment(32),
        seed=0,
        mask_noise_patches=64,
        labels=np.array([2, -100, 0, -100]),
    )
    for i in range(4):  # labels change nothing else: the same pixels and noise (same draws) as a plain MAE's items
        a, b = plain[i], labelled[i]
        assert a.keys() == {"pixel_values", "sample_ids", "noise"} and b.keys() == a.keys() | {"labels"}
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["noise"], b["noise"])
    batch = default_data_collator([labelled[i] for i in range(4)])
    assert batch["labels"].tolist() == [2, -100, 0, -100]
    out = MedMAEForPreTraining(supervised_config(mask_generator="random", throw_ratio=0.0))(**batch)
    assert out.supervised_loss > 0
    with pytest.raises(ConfigError, match="without a supervised head"):
        MedMAEForPreTraining(tiny_config())(**batch)


def test_plain_mae_is_stock_vitmae_and_keeps_its_trainer_contract():
    from transformers import ViTMAEForPreTraining
    from transformers.utils import can_return_loss, find_labels

    config = tiny_config()
    ours, stock = MedMAEForPreTraining(config).eval(), ViTMAEForPreTraining(config).eval()
    stock.load_state_dict(ours.state_dict())
    assert ours.classifier is None and not any(k.startswith("classifier") for k in ours.state_dict())
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    a, b = ours(x, noise=noise), stock(x, noise=noise)
    assert type(a) is type(b) and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    # no `labels` parameter: Trainer keeps treating the MAE as label-free, so batches without labels have an eval loss
    assert find_labels(MedMAEForPreTraining) == [] and can_return_loss(MedMAEForPreTraining)


def test_save_load_round_trip_keeps_the_head_and_its_settings(tmp_path):
    config = supervised_config(class_weights=[1.0, 2.0, 0.5], id2label={0: "a", 1: "b", 2: "c"})
    model = MedMAEForPreTraining(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["supervised_loss_weight"] == 0.5 and saved["class_weights"] == [1.0, 2.0, 0.5]
    assert saved["mask_generator"] == "attention" and saved["throw_ratio"] == 0.25 and saved["id2label"]["2"] == "c"
    loaded = MedMAEForPreTraining.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.classifier.weight, model.classifier.weight) and loaded.config.class_weights == [
        1.0,
        2.0,
        0.5,
    ]
    x, noise, labels = torch.randn(2, 3, 32, 32), torch.rand(2, 64), torch.tensor([1, -100])
    a, b = model(x, noise=noise, labels=labels), loaded(x, noise=noise, labels=labels)
    assert torch.equal(a.class_logits, b.class_logits) and torch.equal(a.loss, b.loss)
    encoder = load_encoder(tmp_path)  # the head is left out of the encoder, like the decoder
    assert isinstance(encoder, ViTModel) and not any("classifier" in k for k in encoder.state_dict())
    card = render_model_card(tmp_path).text
    for row in (
        "| mask generator | attention |",
        "| throw ratio | 0.25 |",
        "| supervised loss weight | 0.5 |",
        '| supervised classes | ["a", "b", "c"] |',
        "| class weights | [1.0, 2.0, 0.5] |",
    ):
        assert row in card, row

    cls = classifier(throw_ratio=0.3, attention_refresh_epochs=2.0)
    cls.save_pretrained(tmp_path / "cls")
    again = MedClsForImageClassification.from_pretrained(tmp_path / "cls")
    assert again.config.throw_ratio == 0.3 and again.config.attention_refresh_epochs == 2.0
    assert "| attention refresh (epochs) | 2.0 |" in render_model_card(tmp_path / "cls").text


@pytest.mark.parametrize(
    "values,message",
    [
        ({"supervised_loss_weight": -0.1}, "is negative"),
        ({"supervised_loss_weight": 0.1, "num_labels": 1}, "needs at least 2 classes"),
        (
            {"supervised_loss_weight": 0.1, "num_labels": 3, "class_weights": [1.0, 1.0]},
            "class_weights has 2 entries for num_labels=3",
        ),
        ({"supervised_loss_weight": 0.1, "num_labels": 2, "class_weights": [1.0, 0.0]}, "must be > 0"),
        ({"class_weights": [1.0, 1.0]}, "only the supervised head uses it"),
    ],
)
def test_mae_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**values)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"throw_ratio": -0.1}, "must lie in"),
        ({"throw_ratio": 1.0}, "must lie in"),
        ({"throw_ratio": 0.995}, "keep at least one"),
        ({"throw_ratio": 0.3, "attention_refresh_epochs": 0}, "must be > 0"),
    ],
)
def test_classifier_config_errors(values, message):
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4)
    with pytest.raises(ConfigError, match=message):
        MedClsConfig(vit_config=vit, **values)


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("channels,size,patch,ratio", [(1, 32, 4, 0.3), (3, 48, 8, 0.5), (16, 32, 2, 0.3)])
def test_training_drops_the_least_attended_tokens_before_the_blocks(channels, size, patch, ratio):
    model = classifier(channels, size, patch, throw_ratio=ratio).train()
    seen = block_inputs(model)
    x = torch.randn(2, channels, size, size)
    num_patches = (size // patch) ** 2
    thrown = round(ratio * num_patches)
    bank = torch.rand(2, num_patches)
    model.attention_bank = {7: bank[0], 9: bank[1]}
    model(x, labels=torch.tensor([0, 2]), sample_ids=torch.tensor([7, 9])).loss.backward()
    assert seen[0].shape == (2, 1 + num_patches - thrown, 32)
    full = model.vit.embeddings(x)  # [B, 1 + L, D]: no dropout in this config, so the same tokens as in training
    for b in range(2):
        kept = bank[b].argsort(descending=True)[: num_patches - thrown].sort().values  # all but the least attended
        assert torch.equal(seen[0][b], torch.cat([full[b, :1], full[b, 1 + kept]]))
    assert model.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    model.attention_bank = {}  # before the first refresh: as many tokens, drawn at random
    model(x)
    assert seen[-1].shape == seen[0].shape


def test_maps_move_along_with_flips_and_rotations():
    """A view's map must rank the patches the view put there: pixels that encode each patch's map value prove it."""
    grid, patch = 8, 4
    scores = torch.rand(1, grid * grid)
    image = (
        scores.reshape(1, grid, grid)
        .repeat_interleave(patch, 1)
        .repeat_interleave(patch, 2)
        .expand(3, -1, -1)
        .contiguous()
    )
    augment = Augment(32, hflip=True, vflip=True, rot90=True, crop=False)
    model = classifier(throw_ratio=0.5).train()
    model.attention_bank = {0: scores[0]}
    codes = set()
    for seed in range(12):
        view, code = augment.with_view(image.clone(), torch.Generator().manual_seed(seed))
        codes.add(code)
        assert torch.equal(view, apply_view(resize(image, 32), code))
        kept = model.kept_patches(view[None], torch.tensor([0]), torch.tensor([code]))[0]
        patch_values = view[0, ::patch, ::patch].reshape(-1)  # what each patch of the view shows = its map value
        assert torch.equal(kept, patch_values.argsort(descending=True)[:32].sort().values)
    assert len(codes) > 4


def test_pretraining_masks_follow_the_map_through_flips_and_rotations():
    """MSMAE's masks come from maps of the un-augmented images: a flipped or turned training view must be masked
    where the view put the attended patches (each patch's pixels encode whether its map value is high)."""
    grid, patch = 8, 4
    high = torch.zeros(grid * grid, dtype=torch.bool)
    high[torch.randperm(grid * grid, generator=torch.Generator().manual_seed(0))[:32]] = True
    scores = torch.where(high, 1.0, 1e-30)  # log-gap ~69: no Gumbel draw reorders the two halves
    image = (
        high.float()
        .reshape(1, grid, grid)
        .repeat_interleave(patch, 1)
        .repeat_interleave(patch, 2)
        .expand(3, -1, -1)
        .numpy()
    )
    data = PretrainingDataset(
        [image], [0.0] * 3, [1.0] * 3, 32, Augment(32, hflip=True, vflip=True, rot90=True, crop=False)
    )
    model = MedMAEForPreTraining(tiny_config(mask_generator="attention", mask_ratio=0.5)).train()
    model.attention_bank = {0: scores}
    views = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        item = data[0]
        views.add(item["view_ids"])
        codes = model.generate_codes(
            item["pixel_values"][None], torch.tensor([0]), view_ids=torch.tensor([item["view_ids"]])
        )[0]
        assert torch.equal(codes == MASKED, item["pixel_values"][0, ::patch, ::patch].reshape(-1) == 1)
    assert len(views) > 4


def test_run_mae_attention_maps_are_of_the_training_views_before_their_flips(tmp_path):
    """The bank's images (what the maps are computed on) and the training views must be the same pixels up to the
    view's flips and turn, also when the files are larger than image_size (a crop there would misalign them)."""
    from hf_medmae.cli import parse_config
    from hf_medmae.tasks.pretrain import Pretrain
    from hf_medmae.training import AttentionRefreshCallback

    require(WBC)
    task = Pretrain()
    model_args, data_args, args = parse_config(
        task.arguments,
        [
            "--train_data",
            str(WBC),
            "--file_pattern",
            "*.bmp",
            "--max_images",
            "8",
            "--mask_generator",
            "attention",
            "--throw_ratio",
            "0.25",
            "--rot90",
            "true",
            "--image_size",
            "32",
            "--patch_size",
            "4",
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
            "--validation_fraction",
            "0",
            "--output_dir",
            str(tmp_path),
            "--report_to",
            "none",
            "--precision",
            "fp32",
        ],
    )
    setup = task.setup(model_args, data_args, args)
    plain = next(c for c in setup.callbacks if isinstance(c, AttentionRefreshCallback)).dataset
    views = set()
    for i in range(len(setup.train_dataset)):
        item = setup.train_dataset[i]
        views.add(item["view_ids"])
        assert torch.equal(item["pixel_values"], apply_view(plain[i]["pixel_values"], item["view_ids"]))
    assert len(views) > 1


def test_dropping_is_off_in_eval_and_drop_path_still_fires_with_fewer_tokens():
    dropping, plain = classifier(throw_ratio=0.5, drop_path_rate=0.2), classifier(throw_ratio=0.0, drop_path_rate=0.2)
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(4, 3, 32, 32)
    seen = block_inputs(dropping)
    assert torch.equal(dropping.eval()(x).logits, plain.eval()(x).logits)
    assert seen[-1].shape[1] == 65  # every token in eval
    last = dropping.vit.layers[-1]  # drop path rates 0, 0.2: the last block has the hook
    hook = next(h for h in last._forward_hooks.values() if isinstance(h, DropPathHook))
    hook.rate = 1.0  # a fired hook makes the block an identity in training
    blocks = []
    last.register_forward_hook(
        lambda module, args, out: blocks.append((args[0], out))
    )  # runs after the (prepended) drop path
    optimizer = torch.optim.AdamW(param_groups_layer_decay(dropping, 1e-3, 0.05, 0.75))
    before = dropping.vit.layers[0].mlp.fc1.weight.detach().clone()
    dropping.train()(x, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    optimizer.step()
    block_in, block_out = blocks[-1]
    assert seen[-1].shape[1] == 33 and block_out.shape == (4, 33, 32)  # 1 + 64 - 32 tokens
    assert torch.equal(block_in, block_out)
    assert not torch.equal(before, dropping.vit.layers[0].mlp.fc1.weight)  # the layer-decay groups train the blocks


# ----------------------------------------------------------------------------- the scripts


def test_run_mae_with_partial_labels_writes_the_msmae_settings_and_rebuilds_from_the_hub(
    tmp_path, one_thread, hub_server
):
    from huggingface_hub import ModelCard

    from hf_medmae.hub import pull_checkpoint
    from hf_medmae.tasks import pretrain

    require(WBC)
    part = tmp_path / "part.csv"  # the first 100 of the 300 images labelled; the rest of the pool unlabeled
    part.write_text("\n".join(CSV.read_text().splitlines()[:101]) + "\n")
    out = tmp_path / "mae"
    metrics = pretrain.main(
        [
            "--train_data",
            str(WBC),
            "--file_pattern",
            "*.bmp",
            "--max_images",
            "150",
            "--labels_csv",
            str(part),
            "--id_column",
            "image ID",
            "--label_column",
            "class label",
            "--filename_template",
            "{id:03d}.bmp",
            "--label_offset",
            "1",
            "--class_names",
            json.dumps(NAMES),
            "--supervised_loss_weight",
            "0.1",
            "--class_weighting",
            "balanced",
            "--mask_generator",
            "attention",
            "--mask_ratio",
            "0.75",
            "--throw_ratio",
            "0.25",
            "--attention_refresh_epochs",
            "1",
            "--image_size",
            "32",
            "--patch_size",
            "4",
            "--hidden_size",
            "32",
            "--num_hidden_layers",
            "2",
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
            "--attn_implementation",
            "sdpa",
            "--validation_fraction",
            "0.2",
            "--max_steps",
            "6",
            "--per_device_train_batch_size",
            "32",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "6",
            "--save_strategy",
            "steps",
            "--save_steps",
            "6",
            "--output_dir",
            str(out),
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--dataloader_num_workers",
            "0",
            "--seed",
            "0",
            "--precision",
            "fp32",
            "--logging_steps",
            "3",
            "--push_to_hub",
            "--hub_model_id",
            "medmae-test/msmae-wbc",
        ]
    )
    for folder in (out, out / "checkpoint-6"):
        config = json.loads((folder / "config.json").read_text())
        assert (
            config["mask_generator"] == "attention" and config["throw_ratio"] == 0.25 and config["mask_ratio"] == 0.75
        )
        assert config["supervised_loss_weight"] == 0.1 and list(config["id2label"].values()) == NAMES
        assert len(config["class_weights"]) == 5
    # labels for part of the pool: some training images labelled, the others not (the CSV has 100 of the 150)
    assert 0 < metrics["labelled_train_images"] < metrics["num_train_images"]
    # prediction_loss_only evaluation: the loss adds the labelled validation images' cross-entropy
    assert metrics["eval_loss"] > metrics["eval_reconstruction_loss"] > 0
    # the training log keeps the two terms of the loss apart, and they add up to it
    logged = [
        e for e in json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ]
    assert [e["step"] for e in logged] == [3, 6]
    for entry in logged:
        assert entry["supervised_loss"] > 0 and entry["reconstruction_loss"] > 0
        assert entry["loss"] == pytest.approx(entry["reconstruction_loss"] + 0.1 * entry["supervised_loss"], abs=2e-4)
    local = MedMAEForPreTraining.from_pretrained(out)
    assert local.classifier.weight.shape == (5, 32)
    # published by the Trainer's Hub arguments; rebuilt by repo id: same weights, same generator and head settings
    hub = MedMAEForPreTraining.from_pretrained("medmae-test/msmae-wbc")
    drop = {"transformers_version", "_name_or_path"}
    assert {k: v for k, v in hub.config.to_dict().items() if k not in drop} == {
        k: v for k, v in local.config.to_dict().items() if k not in drop
    }
    assert all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), local.state_dict().values()))
    assert (
        type(hub.mask_generator).__name__ == type(local.mask_generator).__name__
        and hub.mask_generator.num_thrown == local.mask_generator.num_thrown == 16
    )
    card = ModelCard.load(
        Path(pull_checkpoint("medmae-test/msmae-wbc", cache_dir=tmp_path / "cache")) / "README.md"
    ).text
    for row in (
        "| mask generator | attention |",
        "| throw ratio | 0.25 |",
        "| supervised loss weight | 0.1 |",
        "neutrophil",
    ):
        assert row in card


def test_run_mae_label_settings_are_checked(tmp_path):
    from hf_medmae.tasks import pretrain

    require(WBC)
    base = [
        "--train_data",
        str(WBC),
        "--file_pattern",
        "*.bmp",
        "--max_images",
        "20",
        "--image_size",
        "32",
        "--patch_size",
        "4",
        "--output_dir",
        str(tmp_path / "o"),
        "--max_steps",
        "1",
        "--report_to",
        "none",
    ]
    with pytest.raises(ConfigError, match="needs labels for the supervised head"):
        pretrain.main(base + ["--supervised_loss_weight", "0.1"])
    with pytest.raises(ConfigError, match="supervised_loss_weight is 0"):
        pretrain.main(base + ["--labels_csv", str(CSV), "--id_column", "image ID", "--label_column", "class label"])


def test_run_classification_with_token_dropping(tmp_path, monkeypatch, one_thread):
    from hf_medmae.tasks import classify

    require(WBC)
    mae = tmp_path / "mae"
    MedMAEForPreTraining(tiny_config()).save_pretrained(mae)
    ViTImageProcessorPil(
        do_resize=False, do_rescale=False, image_mean=[200.0] * 3, image_std=[40.0] * 3
    ).save_pretrained(mae)
    banked = []
    original = MedClsForImageClassification.kept_patches
    monkeypatch.setattr(
        MedClsForImageClassification,
        "kept_patches",
        lambda self, *a: banked.append(len(self.attention_bank)) or original(self, *a),
    )
    flags = [
        "--data_dir",
        str(WBC),
        "--labels_csv",
        str(CSV),
        "--id_column",
        "image ID",
        "--label_column",
        "class label",
        "--filename_template",
        "{id:03d}.bmp",
        "--label_offset",
        "1",
        "--class_names",
        json.dumps(NAMES),
        "--model_name_or_path",
        str(mae),
        "--image_size",
        "32",
        "--throw_ratio",
        "0.3",
        "--attention_refresh_epochs",
        "1",
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "64",
        "--eval_strategy",
        "epoch",
        "--save_strategy",
        "epoch",
        "--output_dir",
        str(tmp_path / "cls"),
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        "0",
        "--precision",
        "fp32",
    ]
    metrics = classify.main(flags)
    assert "test_accuracy" in metrics and (tmp_path / "cls" / "test_metrics.json").is_file()
    assert json.loads((tmp_path / "cls" / "config.json").read_text())["throw_ratio"] == 0.3
    # epoch 0 drops at random (empty bank); the refresh before epoch 1 gives every training image (~195) a map
    train_images = banked[-1]
    assert 150 < train_images < 220 and len(banked) == 8  # 2 epochs x 4 steps of 64
    assert banked == [0] * 4 + [train_images] * 4
    with pytest.raises(ConfigError, match="baseline has none"):
        classify.main(flags + ["--architecture", "resnet10"])


def test_label_fraction_keeps_a_stratified_share_of_the_rows(tmp_path):
    """labels for part of the pool from one full CSV: `label_fraction` keeps a seeded, per-class share of its rows."""
    from hf_medmae.tasks import pretrain

    require(WBC)
    metrics = pretrain.main(
        [
            "--config",
            str(ROOT / "configs" / "wbc_msmae.yaml"),
            "--label_fraction",
            "0.3",
            "--max_steps",
            "2",
            "--image_size",
            "32",
            "--hidden_size",
            "48",
            "--num_hidden_layers",
            "1",
            "--num_attention_heads",
            "2",
            "--intermediate_size",
            "96",
            "--decoder_hidden_size",
            "32",
            "--decoder_num_hidden_layers",
            "1",
            "--decoder_num_attention_heads",
            "2",
            "--decoder_intermediate_size",
            "64",
            "--per_device_train_batch_size",
            "32",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--output_dir",
            str(tmp_path / "run"),
            "--disable_tqdm",
            "true",
            "--precision",
            "fp32",
            "--attn_implementation",
            "sdpa",
        ]
    )
    full = metrics["num_train_images"]  # every training image has a row in the full CSV
    assert 0.25 * full < metrics["labelled_train_images"] < 0.35 * full
