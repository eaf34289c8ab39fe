"""Bad inputs to the three run scripts: each is a named ConfigError / DataError / CheckpointError with a fix.

One parametrised matrix calls `pretrain.main`, `classify.main` and `segment.main`
in-process with one thing wrong and checks the error's kind, that its message names the problem
(often the offending file or value) and that it carries the "Fix:" line. Everything is built in
`tmp_path` from a few tiny images and tiny checkpoints, so no case needs the shared data. Every case
fails before training starts; only `on_bad_file: skip` (the last test) trains, for one step.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, ViTImageProcessorPil

from hf_medmae import MedMAEForPreTraining
from hf_medmae.errors import CheckpointError, ConfigError, DataError, MedMAEError
from hf_medmae.tasks import classify, pretrain, segment

SCRIPTS = {"mae": pretrain, "cls": classify, "seg": segment}
MAE_TINY = [
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
]
COMMON = ["--max_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
CLS_TRAIN = ["--eval_strategy", "epoch", "--save_strategy", "epoch", "--image_size", "32"]
SEG_TRAIN = ["--image_glob", "*.bmp", "--class_map", "{0: 0, 255: 1}", "--image_size", "32"]


# ----------------------------------------------------------------------------- tiny inputs


def rgb(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def image_folder(root: Path, n: int = 4, size: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rgb(i, size)).save(root / f"img{i}.png")
    return root


def class_folders(root: Path, counts: dict[str, int]) -> Path:
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rgb(100 * k + i)).save(root / name / f"{name}{i}.png")
    return root


def seg_pairs(root: Path, n: int = 6, bad_mask: int | None = None) -> Path:
    """`k.bmp` images with `k.png` masks (0 / 255); mask `bad_mask` is 20x20 instead of 32x32."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rgb(i)).save(root / f"{i}.bmp")
        side = 20 if i == bad_mask else 32
        Image.fromarray(((np.arange(side * side).reshape(side, side) % 3 == 0) * 255).astype(np.uint8)).save(
            root / f"{i}.png"
        )
    return root


def mae_checkpoint(folder: Path, channels: int = 3, **overrides) -> Path:
    """A tiny MAE as run_mae.py saves it: weights, config and the preprocessor's image statistics."""
    MedMAEForPreTraining(tiny_config(num_channels=channels, **overrides)).save_pretrained(folder)
    ViTImageProcessorPil(
        do_resize=False, do_rescale=False, image_mean=[120.0] * channels, image_std=[60.0] * channels
    ).save_pretrained(folder)
    return folder


def bert_checkpoint(folder: Path) -> Path:
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    ).save_pretrained(folder)
    return folder


def truncated_checkpoint(folder: Path) -> Path:
    """A tiny MAE whose model.safetensors lost one encoder tensor (a copy cut short, a bad conversion)."""
    mae_checkpoint(folder)
    state = load_file(folder / "model.safetensors")
    del state["vit.layers.1.attention.q_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(rgb(7, 64)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # a download or copy cut off half-way
    return path


def hub_pickle_repo(request) -> str:
    """A repo on the local test Hub with config.json and only a pickled pytorch_model.bin."""
    from huggingface_hub import HfApi

    request.getfixturevalue("hub_server")
    repo_id, api = "medmae-test/pickles-only", HfApi()
    api.create_repo(repo_id)
    api.upload_file(
        path_or_fileobj=tiny_config().to_json_string().encode(), path_in_repo="config.json", repo_id=repo_id
    )
    api.upload_file(path_or_fileobj=b"\x80\x04never unpickled", path_in_repo="pytorch_model.bin", repo_id=repo_id)
    return repo_id


# ----------------------------------------------------------------------------- the matrix


@dataclass
class Case:
    script: str
    build: Callable[[Path, pytest.FixtureRequest], list[str]]  # (tmp_path, request) -> argv without --output_dir
    error: type
    problem: str  # regex the message must match: it names what is wrong


def mae(build):
    return lambda t, r: [*MAE_TINY, *COMMON, "--train_data", *build(t, r)]  # the case's flags last: they win


def cls(build):
    return lambda t, r: [*CLS_TRAIN, *COMMON, *build(t, r)]


def seg(build):
    return lambda t, r: [*SEG_TRAIN, *COMMON, *build(t, r)]


def nan_npy(t: Path) -> str:
    stack = np.random.default_rng(0).random((4, 1, 32, 32)).astype(np.float32)
    stack[2, 0, 5, 5] = np.nan
    np.save(t / "stack.npy", stack)
    return str(t / "stack.npy")


def csv_out_of_range(t: Path) -> list[str]:
    image_folder(t / "imgs", 6)
    rows = "\n".join(f"img{i}.png,{label}" for i, label in enumerate([0, 1, 0, 1, 0, 7]))
    (t / "labels.csv").write_text(f"filename,label\n{rows}\n")
    return [
        "--init",
        "scratch",
        "--data_dir",
        str(t / "imgs"),
        "--labels_csv",
        str(t / "labels.csv"),
        "--class_names",
        "[a, b]",
    ]


def corrupt_folder(t: Path) -> str:
    image_folder(t / "imgs", 3)
    truncated_png(t / "imgs" / "slide_017.png")
    return str(t / "imgs")


def typo_config(t: Path) -> list[str]:
    (t / "c.yaml").write_text("train_data: embedded:nuclei16\nmask_ration: 0.5\n")
    return ["--config", str(t / "c.yaml")]


def wrong_type_config(t: Path) -> list[str]:
    (t / "c.yaml").write_text("train_data: embedded:nuclei16\nhflip: sometimes\n")
    return ["--config", str(t / "c.yaml")]


def two_classes(t: Path) -> str:
    return str(class_folders(t / "cls", {"a": 8, "b": 8}))


CASES = {
    # run_mae.py
    "mae-channels-vs-checkpoint": Case(
        "mae",
        mae(lambda t, r: [str(image_folder(t / "imgs")), "--model_name_or_path", str(mae_checkpoint(t / "ck16", 16))]),
        DataError,
        "checkpoint expects 16 channels, the data has 3",
    ),
    "mae-size-not-divisible-by-patch": Case(
        "mae",
        mae(lambda t, r: ["embedded:nuclei16", "--image_size", "30"]),
        ConfigError,
        "not divisible by patch_size",
    ),
    "mae-corrupt-image": Case("mae", mae(lambda t, r: [corrupt_folder(t)]), DataError, r"slide_017\.png"),
    "mae-empty-dataset": Case(
        "mae", mae(lambda t, r: [str(image_folder(t / "empty", 0))]), DataError, "no images found in .*empty"
    ),
    "mae-nan-pixels": Case("mae", mae(lambda t, r: [nan_npy(t)]), DataError, r"stack\.npy\[\d+\] has 1 NaN/inf pixel"),
    "mae-unknown-mask-generator": Case(
        "mae",
        mae(lambda t, r: ["embedded:nuclei16", "--mask_generator", "checkerboard"]),
        ConfigError,
        "unknown mask_generator 'checkerboard'",
    ),
    "mae-unknown-config-key": Case(
        "mae", lambda t, r: [*typo_config(t), *COMMON], ConfigError, "'mask_ration' \\(did you mean 'mask_ratio'"
    ),
    "mae-wrong-value-type": Case(
        "mae", lambda t, r: [*wrong_type_config(t), *COMMON], ConfigError, "'hflip' expects bool, got 'sometimes'"
    ),
    "mae-other-architecture": Case(
        "mae",
        mae(lambda t, r: [str(image_folder(t / "imgs")), "--model_name_or_path", str(bert_checkpoint(t / "bert"))]),
        CheckpointError,
        "type 'bert', not an MAE",
    ),
    "mae-missing-encoder-key": Case(
        "mae",
        mae(
            lambda t, r: [str(image_folder(t / "imgs")), "--model_name_or_path", str(truncated_checkpoint(t / "cut"))]
        ),
        CheckpointError,
        r"missing_keys.*vit\.layers\.1\.attention\.q_proj\.weight",
    ),
    "mae-hub-repo-with-only-pickles": Case(
        "mae",
        mae(lambda t, r: [str(image_folder(t / "imgs")), "--model_name_or_path", hub_pickle_repo(r)]),
        CheckpointError,
        r"pickles-only has only pickled weights \(pytorch_model\.bin\)",
    ),
    # run_classification.py
    "cls-labels-out-of-range": Case("cls", cls(lambda t, r: csv_out_of_range(t)), DataError, r"\b7\b"),
    "cls-fraction-empties-a-class": Case(
        "cls",
        cls(
            lambda t, r: [
                "--init",
                "scratch",
                "--data_dir",
                str(class_folders(t / "cls", {"common": 16, "rare": 4})),
                "--train_fraction",
                "0.2",
                "--strict_fraction",
                "true",
            ]
        ),
        DataError,
        "leaves class 'rare'",
    ),
    "cls-channels-vs-checkpoint": Case(
        "cls",
        cls(lambda t, r: ["--data_dir", two_classes(t), "--model_name_or_path", str(mae_checkpoint(t / "grey", 1))]),
        DataError,
        "1-channel images, the data has 3",
    ),
    "cls-other-architecture": Case(
        "cls",
        cls(lambda t, r: ["--data_dir", two_classes(t), "--model_name_or_path", str(bert_checkpoint(t / "bert"))]),
        CheckpointError,
        "type 'bert'",
    ),
    "cls-missing-encoder-key": Case(
        "cls",
        cls(lambda t, r: ["--data_dir", two_classes(t), "--model_name_or_path", str(truncated_checkpoint(t / "cut"))]),
        CheckpointError,
        r"missing \['layers\.1\.attention\.q_proj\.weight'\]",
    ),
    "cls-hub-repo-with-only-pickles": Case(
        "cls",
        cls(lambda t, r: ["--data_dir", two_classes(t), "--model_name_or_path", hub_pickle_repo(r)]),
        CheckpointError,
        "pytorch_model.bin is refused",
    ),
    # run_segmentation.py
    "seg-mask-size-mismatch": Case(
        "seg",
        seg(
            lambda t, r: [
                "--model",
                "unet",
                "--init",
                "scratch",
                "--train_data",
                str(seg_pairs(t / "pairs", bad_mask=3)),
            ]
        ),
        DataError,
        r"3.bmp: the image is \[H, W\] \(32, 32\) but its mask is \(20, 20\)",
    ),
    "seg-mask-value-not-in-class-map": Case(
        "seg",
        seg(
            lambda t, r: [
                "--model",
                "unet",
                "--init",
                "scratch",
                "--train_data",
                str(seg_pairs(t / "pairs")),
                "--class_map",
                "{0: 0, 128: 1}",
            ]
        ),
        DataError,
        r"mask values \[255\] are not in class_map",
    ),
    "seg-channels-vs-checkpoint": Case(
        "seg",
        seg(
            lambda t, r: [
                "--train_data",
                str(seg_pairs(t / "pairs")),
                "--model_name_or_path",
                str(mae_checkpoint(t / "ck16", 16)),
            ]
        ),
        DataError,
        "16-channel images but .* has 3 channels",
    ),
    "seg-unet-given-a-checkpoint": Case(
        "seg",
        seg(
            lambda t, r: [
                "--model",
                "unet",
                "--init",
                "scratch",
                "--train_data",
                str(seg_pairs(t / "pairs")),
                "--model_name_or_path",
                str(mae_checkpoint(t / "ck3", 3)),
            ]
        ),
        ConfigError,
        "model unet takes no checkpoint",
    ),
    "cls-predict-labels-per-set": Case(  # one labels CSV for two sets: which set it belongs to is unknowable
        "cls",
        cls(
            lambda t, r: [
                "--predict_only",
                "true",
                "--model_name_or_path",
                str(t / "run"),
                "--predict_data",
                two_classes(t),
                str(image_folder(t / "imgs")),
                "--predict_labels_csv",
                str(t / "labels.csv"),
            ]
        ),
        ConfigError,
        "1 predict_labels_csv for 2 predict_data sets",
    ),
    "seg-predict-masks-per-set": Case(
        "seg",
        seg(
            lambda t, r: [
                "--predict_only",
                "true",
                "--model_name_or_path",
                str(t / "run"),
                "--predict_images",
                str(image_folder(t / "imgs")),
                "--predict_mask_dirs",
                str(t / "a"),
                str(t / "b"),
            ]
        ),
        ConfigError,
        "2 predict_mask_dirs for 1 predict_images sets",
    ),
    "seg-output-dir-not-writable": Case(
        "seg",
        seg(lambda t, r: ["--model", "unet", "--init", "scratch", "--output_dir", str(blocked_dir(t))]),
        ConfigError,
        "output_dir .*blocker.* is not writable",
    ),
}


def blocked_dir(t: Path) -> Path:
    (t / "blocker").write_text("a file where a folder is needed")
    return t / "blocker" / "out"


def _argv(case: Case, tmp_path: Path, request) -> list[str]:
    argv = case.build(tmp_path, request)
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "out")]
    return argv


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_named_with_a_fix(name, tmp_path, request):
    case = CASES[name]
    with pytest.raises(MedMAEError) as info:
        SCRIPTS[case.script].main(_argv(case, tmp_path, request))
    err = info.value
    assert type(err) is case.error, f"{name}: {type(err).__name__} instead of {case.error.__name__}: {err}"
    assert re.search(case.problem, err.problem), f"{name}: problem not named: {err.problem}"
    assert "\n  Fix: " in str(err) and len(err.fix) > 20, f"{name}: no usable fix in {err}"
    if "hub" in name:  # every request was one the Hub serves: no detour such as transformers' conversion bot
        assert request.getfixturevalue("hub_server").unhandled == []


def test_skipped_files_are_counted_never_silent(tmp_path):
    """on_bad_file: skip trains on the good images and reports the one it left out in all_results.json."""
    folder = corrupt_folder(tmp_path)
    out = tmp_path / "out"
    metrics = pretrain.main(
        [
            "--train_data",
            folder,
            "--on_bad_file",
            "skip",
            "--validation_fraction",
            "0",
            "--save_strategy",
            "no",
            "--output_dir",
            str(out),
            *MAE_TINY,
            *COMMON,
        ]
    )
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["num_skipped_files"] == metrics["num_skipped_files"] == 1
    # the folder is indexed from file headers (the truncated PNG's header reads): 4 items; when the truncated one is
    # decoded it fails, the next readable image takes its place, and it is counted once
    assert saved["num_train_images"] == 4
    assert (out / "model.safetensors").is_file()
    with pytest.raises(DataError, match=r"slide_017\.png"):  # the default still stops at the bad file
        pretrain.main(["--train_data", folder, "--output_dir", str(out), *MAE_TINY, *COMMON])
