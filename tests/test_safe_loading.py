"""Weights and data are never unpickled: a source lint, and every loading path refusing a pickle-only checkpoint.

The lint walks the syntax tree of the package, the run scripts, the benchmarks and the studies (comments and
docstrings cannot trip it) and flags every loading call that could run code from a file: `torch.load`
without `weights_only=True`, `np.load` without `allow_pickle=False`, pickle-family modules, remote
code, and `from_pretrained` of weights without `use_safetensors=True`. The behavioural half hands a
checkpoint whose only weights are a booby-trapped pickle to each entry point and checks that every one
refuses it by name and that the trap never fired.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config
from PIL import Image
from transformers import ViTImageProcessorPil

from hf_medmae import MedMAEForPreTraining, load_checkpoint
from hf_medmae.encoder import load_encoder
from hf_medmae.errors import CheckpointError
from hf_medmae.tasks import classify, pretrain, segment

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# from_pretrained of these reads JSON only; everything else loads weights and must insist on safetensors
JSON_ONLY = ("Config", "Processor", "Tokenizer", "FeatureExtractor")


def _keyword(call: ast.Call, name: str):
    """The constant value of keyword `name` (missing: the string "<missing>"; not a constant: "<expr>")."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return "<missing>"


def _dotted(node: ast.AST) -> str:
    """`torch.hub.load` for the call's function, as far as it is made of names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _call_problems(call: ast.Call) -> list[str]:
    name = _dotted(call.func)
    problems = []
    if name == "torch.load" and _keyword(call, "weights_only") is not True:
        problems.append("torch.load without weights_only=True")
    if name in {"np.load", "numpy.load"} and _keyword(call, "allow_pickle") is not False:
        problems.append("np.load without allow_pickle=False")
    if name.split(".")[0] in PICKLE_MODULES:
        problems.append(f"{name}: a pickle-family loader")
    if name in {"torch.hub.load", "torch.package.PackageImporter"}:
        problems.append(f"{name} runs code from the loaded package")
    if _keyword(call, "trust_remote_code") not in ("<missing>", False):
        problems.append("trust_remote_code is not False")
    if _keyword(call, "use_safetensors") is False:
        problems.append("use_safetensors=False")
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    if (
        name.endswith(".from_pretrained")
        and not any(word in owner for word in JSON_ONLY)
        and _keyword(call, "use_safetensors") is not True
    ):
        problems.append(f"{name} without use_safetensors=True (falls back to pytorch_model.bin)")
    return problems


def unsafe_loading(source: str) -> list[str]:
    """Problems found in Python `source`, as "line N: what" strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            found += [f"line {node.lineno}: {p}" for p in _call_problems(node)]
        elif isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            aliased_load = root in {"torch", "numpy"} and any(a.name == "load" for a in node.names)
            if (
                root in PICKLE_MODULES or aliased_load
            ):  # `from torch import load` would hide the call from the rule above
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
    return found


def scanned_files() -> list[Path]:
    patterns = ("hf_medmae/**/*.py", "run_*.py", "benchmarks/**/*.py", "studies/**/*.py")
    return sorted(path for pattern in patterns for path in ROOT.glob(pattern))


@pytest.mark.parametrize(
    "snippet",
    [
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "torch.load(path, weights_only=flag)",
        "np.load(path)",
        "numpy.load(path, allow_pickle=True)",
        "import pickle",
        "from pickle import loads",
        "data = joblib.load(path)",
        "from torch import load",
        "AutoModel.from_pretrained(repo, trust_remote_code=True)",
        "MedMAEForPreTraining.from_pretrained(path)",
        "MedMAEForPreTraining.from_pretrained(path, use_safetensors=False)",
        "torch.hub.load('owner/repo', 'model')",
    ],
)
def test_lint_flags_unsafe_loading(snippet):
    assert unsafe_loading(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "torch.load(path, weights_only=True)",
        "np.load(path, allow_pickle=False)",
        "MedMAEForPreTraining.from_pretrained(path, use_safetensors=True)",
        "ViTImageProcessorPil.from_pretrained(path)",
        "MedMAEConfig.from_pretrained(path)",
        "AutoModel.from_pretrained(repo, trust_remote_code=False, use_safetensors=True)",
        '"""docstring: torch.load(path) and pickle.load(f)"""  # comment: np.load(x)',
    ],
)
def test_lint_passes_safe_loading(snippet):
    assert unsafe_loading(snippet) == []


def test_package_scripts_and_benchmarks_load_nothing_unsafely():
    files = scanned_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {
        "run_mae.py",
        "run_classification.py",
        "run_segmentation.py",
        "hf_medmae/encoder.py",
        "hf_medmae/data/io.py",
    } <= names
    assert any(n.startswith("benchmarks/") for n in names) and any(n.startswith("studies/") for n in names)
    problems = [f"{p.relative_to(ROOT)} {problem}" for p in files for problem in unsafe_loading(p.read_text())]
    assert problems == []


# ----------------------------------------------------------------------------- refusing a pickle-only checkpoint


class _Trap:
    """Unpickling this creates a file: proof that the pickle was (or was not) executed."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return open, (str(self.sentinel), "w")


@pytest.fixture
def pickle_only(tmp_path):
    """A checkpoint folder as run_mae.py / run_segmentation.py write them, but with weights only in a
    trapped pytorch_model.bin; and the file the trap creates if anything unpickles it."""
    folder, sentinel = tmp_path / "pickled", tmp_path / "TRAP_FIRED"
    tiny_config().save_pretrained(folder)
    ViTImageProcessorPil(
        do_resize=False, do_rescale=False, image_mean=[120.0] * 3, image_std=[60.0] * 3
    ).save_pretrained(folder)
    (folder / "inference_config.json").write_text(
        json.dumps({"image_size": 32, "scale": 1.0, "class_names": ["a", "b"]})
    )
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))
    return folder, sentinel


def test_the_trap_fires_when_unpickled(pickle_only):
    folder, sentinel = pickle_only
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # what torch.load(weights_only=False) would do
    assert sentinel.exists()


def _images(folder: Path) -> Path:
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i}.bmp"
        )
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / f"{i}.png")
    return folder


ENTRY_POINTS = {
    "load_encoder": lambda ck, t: load_encoder(ck),
    "run_mae": lambda ck, t: pretrain.main(
        [
            "--train_data",
            str(_images(t / "imgs")),
            "--file_pattern",
            "*.bmp",
            "--model_name_or_path",
            str(ck),
            "--image_size",
            "32",
            "--output_dir",
            str(t / "out"),
            "--max_steps",
            "1",
            "--report_to",
            "none",
        ]
    ),
    "run_classification": lambda ck, t: classify.main(
        [
            "--data_dir",
            str(_class_folders(t / "cls")),
            "--model_name_or_path",
            str(ck),
            "--image_size",
            "32",
            "--eval_strategy",
            "epoch",
            "--save_strategy",
            "epoch",
            "--output_dir",
            str(t / "out"),
        ]
    ),
    "run_segmentation": lambda ck, t: segment.main(
        [
            "--train_data",
            str(_images(t / "imgs")),
            "--image_glob",
            "*.bmp",
            "--class_map",
            "{0: 0, 255: 1}",
            "--model_name_or_path",
            str(ck),
            "--image_size",
            "32",
            "--output_dir",
            str(t / "out"),
        ]
    ),
    "run_segmentation_predict_only": lambda ck, t: segment.main(
        [
            "--predict_only",
            "true",
            "--model_name_or_path",
            str(ck),
            "--predict_images",
            str(_images(t / "imgs")),
            "--output_dir",
            str(t / "out"),
        ]
    ),
}


def _class_folders(root: Path) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    return root


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_pickle_only_checkpoint_is_refused_by_name(entry, pickle_only, tmp_path):
    folder, sentinel = pickle_only
    with pytest.raises(CheckpointError) as err:
        ENTRY_POINTS[entry](folder, tmp_path)
    assert "pickle" in err.value.problem and "safetensors" in str(err.value), err.value
    assert (
        "pytorch_model.bin" in err.value.problem or entry == "run_mae"
    )  # run_mae quotes transformers' "no model.safetensors"
    assert not sentinel.exists(), f"{entry} unpickled the weights"


def test_from_pretrained_with_use_safetensors_never_reads_the_pickle(pickle_only):
    """The flag every from_pretrained in our code passes (see the lint): the .bin beside it is not a fallback."""
    folder, sentinel = pickle_only
    with pytest.raises(OSError, match="model.safetensors"):
        MedMAEForPreTraining.from_pretrained(folder, use_safetensors=True)
    assert not sentinel.exists()


def test_run_mae_takes_only_safetensors_from_the_hub(pickle_only, tmp_path, request):
    """A Hub repo with both formats: run_mae loads the safetensors weights and never downloads the .bin."""
    from huggingface_hub import HfApi

    hub = request.getfixturevalue("hub_server")
    folder, sentinel = pickle_only
    model = MedMAEForPreTraining(tiny_config()).eval()
    model.save_pretrained(folder)  # beside the trapped pytorch_model.bin
    HfApi().create_repo("medmae-test/both")
    HfApi().upload_folder(folder_path=str(folder), repo_id="medmae-test/both")
    loaded = load_checkpoint(MedMAEForPreTraining, "medmae-test/both")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert list(cache.rglob("model.safetensors")) and not list(cache.rglob("*.bin"))
    assert not sentinel.exists() and hub.unhandled == []
