"""A non-editable install (a wheel, as `pip install .` makes) renders model cards and pushes checkpoints.

The wheel is built once, from a copy of the checkout (so no `build/` folder lands in the repo and a stale one
cannot leak into the wheel), and installed with `pip install --target`: no new virtual environment, the
dependencies come from this one. A subprocess whose `PYTHONPATH` is that folder, run outside the repo, then
pushes one tiny checkpoint per card kind to the local test Hub (tests/hub_server.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download

ROOT = Path(__file__).resolve().parents[1]
# Console command -> module of its `cli()` ([project.scripts] in pyproject.toml).
SCRIPTS = {
    "medmae-pretrain": "hf_medmae.tasks.pretrain",
    "medmae-classify": "hf_medmae.tasks.classify",
    "medmae-segment": "hf_medmae.tasks.segment",
}
# Left out of the copy the wheel is built from: VCS data, build leftovers and run outputs (.gitignore).
NOT_COPIED = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".benchmarks",
    "outputs",
    "runs",
    ".whl",
    ".gl",
)

# repo name -> (architecture, base tags, extra tag, pipeline_tag, a sentence only that card kind's template has)
MAE_TAGS = ["medical-imaging", "masked-autoencoder", "vit-mae", "hf_medmae"]
EXPECTED = {
    "mae": (
        "MedMAEForPreTraining",
        MAE_TAGS,
        "self-supervised",
        None,
        "A Vision Transformer **masked autoencoder (MAE)** pre-trained",
    ),
    "classifier": (
        "MedClsForImageClassification",
        MAE_TAGS,
        "image-classification",
        "image-classification",
        "A Vision Transformer **image classifier** fine-tuned",
    ),
    "unetr": (
        "MedSegForSegmentation",
        MAE_TAGS,
        "image-segmentation",
        "image-segmentation",
        "A Vision Transformer **semantic segmenter** fine-tuned",
    ),
    "unet": (
        "MedUNetForSegmentation",
        ["medical-imaging", "unet", "hf_medmae"],
        "image-segmentation",
        "image-segmentation",
        "A **U-Net semantic segmenter** (MONAI `BasicUNet`) trained from scratch",
    ),
}

# Runs in the subprocess: argv = site folder, checkpoints folder, result JSON path.
PUSH_SCRIPT = r"""
import json, sys
from importlib import resources
from pathlib import Path

import torch

site, work, result = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), Path(sys.argv[3])
torch.set_num_threads(1)  # two shared cores
torch.manual_seed(0)

import hf_medmae
from hf_medmae import (MedClsForImageClassification, MedMAEConfig, MedMAEForPreTraining, MedSegForSegmentation,
                       build_unet_baseline)
from hf_medmae.hub import CARD_KINDS, TEMPLATE_PACKAGE, push_checkpoint

templates = resources.files(TEMPLATE_PACKAGE)
mae = MedMAEForPreTraining(MedMAEConfig(
    num_channels=3, image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
    decoder_intermediate_size=64))
models = {
    "mae": mae,
    "classifier": MedClsForImageClassification.from_encoder(mae.vit, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}),
    "unetr": MedSegForSegmentation.from_encoder(mae.vit, num_labels=2),
    "unet": build_unet_baseline(3, 2, features=(4, 4, 8, 8, 16, 4)),
}
shas = {}
for name, model in models.items():
    model.save_pretrained(work / name)
    shas[name] = push_checkpoint(work / name, f"medmae-test/{name}")
result.write_text(json.dumps({
    "shas": shas,
    # Every hf_medmae module this process imported, so the test can check none came from the checkout.
    "modules": sorted({str(Path(m.__file__).resolve()) for n, m in sys.modules.items()
                       if n.split(".")[0] == "hf_medmae" and getattr(m, "__file__", None)}),
    "templates": {kind: str(templates.joinpath(f"{kind}.md")) for kind in sorted(set(CARD_KINDS.values()))},
    "templates_exist": all(templates.joinpath(f"{kind}.md").is_file() for kind in CARD_KINDS.values()),
}))
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(wheel, copy of the checkout it was built from, `pip install --target` folder), built once per module."""
    pytest.importorskip(
        "setuptools",
        minversion="68",
        reason="building the wheel without network needs "
        "setuptools>=68 in this environment (pip wheel --no-build-isolation)",
    )
    tmp = tmp_path_factory.mktemp("install")
    src, dist, site = tmp / "src", tmp / "dist", tmp / "site"
    shutil.copytree(ROOT, src, ignore=NOT_COPIED)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("hf_medmae-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--no-compile", "--target", str(site), str(wheel)])
    return wheel, src, site


def test_wheel_ships_every_module_the_templates_and_the_scripts(installed):
    wheel, src, site = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    # packages in pyproject.toml is an explicit list (see the comment there): a new sub-package must be added.
    modules = {
        p.relative_to(src).as_posix() for p in (src / "hf_medmae").rglob("*.py") if "__pycache__" not in p.parts
    }
    assert modules - names == set(), "add these modules' packages to [tool.setuptools] packages in pyproject.toml"
    cards = {f"hf_medmae/model_cards/{p.name}" for p in (src / "model_cards").glob("*.md")}
    assert (
        {"hf_medmae/model_cards/mae.md", "hf_medmae/model_cards/classifier.md", "hf_medmae/model_cards/segmenter.md"}
        <= cards
        <= names
    )
    assert not any(name.startswith("model_cards/") for name in names)  # no top-level `model_cards` package
    for script, module in SCRIPTS.items():
        text = (site / "bin" / script).read_text()
        assert f"from {module} import cli" in text, text


def test_installed_wheel_pushes_a_rendered_card_per_kind(installed, hub_server, tmp_path):
    _, _, site = installed
    site = site.resolve()
    work, result, script = tmp_path / "checkpoints", tmp_path / "result.json", tmp_path / "push.py"
    script.write_text(PUSH_SCRIPT)
    # Only the installed copy on the path; the hub_server fixture put the local Hub's HF_* variables in os.environ.
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PYTHONNOUSERSITE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    _run([sys.executable, str(script), str(site), str(work), str(result)], cwd=tmp_path, env=env, timeout=300)
    out = json.loads(result.read_text())

    outside = [m for m in out["modules"] if not Path(m).is_relative_to(site)]
    assert outside == [] and str(site / "hf_medmae" / "__init__.py") in out["modules"]
    assert out["templates_exist"] is True
    assert all(Path(path).is_relative_to(site / "hf_medmae" / "model_cards") for path in out["templates"].values())

    api = HfApi()
    for name, (architecture, base_tags, tag, pipeline_tag, sentence) in EXPECTED.items():
        repo_id = f"medmae-test/{name}"
        assert {"README.md", "config.json", "model.safetensors"} <= set(api.list_repo_files(repo_id))
        readme = Path(hf_hub_download(repo_id, "README.md", revision=out["shas"][name], cache_dir=tmp_path / "cache"))
        assert readme.read_text() == (work / name / "README.md").read_text()  # the card it rendered is the one pushed
        card = ModelCard.load(readme)
        assert card.data.tags == [*base_tags, tag]
        assert card.data.to_dict().get("pipeline_tag") == pipeline_tag
        assert sentence in card.text, card.text
        assert f'{architecture}.from_pretrained("{repo_id}")' in card.text and "not a medical device" in card.text
        assert "{{" not in card.text and "{%" not in card.text  # every template placeholder was filled
    unet = ModelCard.load(work / "unet" / "README.md").text
    assert "| U-Net features | [4, 4, 8, 8, 16, 4] |" in unet and "Vision Transformer" not in unet
    assert hub_server.unhandled == []
