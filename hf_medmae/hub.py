"""Publish checkpoints to the Hugging Face Hub with a model card, and pull them back safely.

`push_checkpoint` uploads a `save_pretrained` folder (safetensors only) and writes its `README.md` from a
template in `model_cards/` (installed as package data `hf_medmae.model_cards`), filled from the folder's own
files: `config.json`, `preprocessor_config.json`, an optional `run_info.json` and the metrics JSON the Trainer
wrote. Nothing in the card is typed by hand.

`run_info.json` (all keys optional) describes how the checkpoint was made::

    {"hardware": "2-core AMD EPYC CPU", "epochs": 40.0, "steps": 6000, "dataset": "wbc_zheng2018",
     "num_images": 300, "seed": 0, "command": "python scripts/pretrain.py configs/wbc.yaml",
     "population": "...", "scanner": "..."}

`pull_checkpoint` downloads only JSON, safetensors and Markdown, and turns the client's errors into
`CheckpointError`s that say what to fix.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import CheckpointError

# The repo's top-level `model_cards/` folder, installed as this package (pyproject.toml `package-dir`), so wheels
# and editable installs both find the templates; a path beside the package only exists in a source checkout.
TEMPLATE_PACKAGE = "hf_medmae.model_cards"

# config.json `model_type` -> card template (model_cards/<kind>.md). Extend when a new head is added.
CARD_KINDS = {
    "medmae": "mae",
    "medmae3d": "mae",
    "medmae_classifier": "classifier",
    "medmae_cnn": "classifier",
    "medmae_segmenter": "segmenter",
    "medmae_unet": "segmenter",
}
# kind -> (extra tag, pipeline_tag, model-index task type)
KIND_TASKS = {
    "mae": ("self-supervised", None, "masked-image-modeling"),
    "classifier": ("image-classification", "image-classification", "image-classification"),
    "segmenter": ("image-segmentation", "image-segmentation", "image-segmentation"),
}
BASE_TAGS = ["medical-imaging", "masked-autoencoder", "vit-mae", "hf_medmae"]
# model_type -> base tags where BASE_TAGS would be wrong: the U-Net and CNN baselines have no ViT or MAE pre-training.
MODEL_TYPE_BASE_TAGS = {
    "medmae_unet": ["medical-imaging", "unet", "hf_medmae"],
    "medmae_cnn": ["medical-imaging", "cnn", "hf_medmae"],
    "medmae3d": ["medical-imaging", "masked-autoencoder", "videomae", "3d", "hf_medmae"],
}

PUSH_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.png"]
PULL_PATTERNS = ["*.json", "*.safetensors", "*.md"]
METRICS_FILES = ["metrics.json", "eval_results.json", "all_results.json"]  # earlier files win on equal keys
RUN_INFO_TYPES = {
    "hardware": str,
    "epochs": (int, float),
    "steps": int,
    "dataset": str,
    "num_images": int,
    "seed": int,
    "command": str,
    "population": str,
    "scanner": str,
}

# (label, config.json key) rows of the "setup" table, shown when the key is present (keys of a head's
# `vit_config` count as the config's own).
CONFIG_ROWS = [
    ("channels", "num_channels"),
    ("depth (slices)", "num_frames"),
    ("image size", "image_size"),
    ("patch size", "patch_size"),
    ("patch depth", "tubelet_size"),
    ("encoder width", "hidden_size"),
    ("encoder layers", "num_hidden_layers"),
    ("encoder heads", "num_attention_heads"),
    ("encoder MLP width", "intermediate_size"),
    ("decoder width", "decoder_hidden_size"),
    ("decoder layers", "decoder_num_hidden_layers"),
    ("decoder heads", "decoder_num_attention_heads"),
    ("mask generator", "mask_generator"),
    ("mask generator settings", "mask_generator_kwargs"),
    ("mask ratio", "mask_ratio"),
    ("throw ratio", "throw_ratio"),
    ("attention refresh (epochs)", "attention_refresh_epochs"),
    ("supervised loss weight", "supervised_loss_weight"),
    ("supervised classes", "supervised_classes"),
    ("normalised-pixel loss", "norm_pix_loss"),
    ("channels", "in_channels"),
    ("CNN", "architecture"),
    ("U-Net features", "features"),
    ("segmentation decoder", "decoder"),
    ("decoder feature size", "feature_size"),
    ("encoder blocks feeding the decoder", "skip_layers"),
    ("pooling", "pooling"),
    ("loss", "loss"),
    ("class weights", "class_weights"),
]
RUN_ROWS = [
    ("hardware", "hardware"),
    ("epochs", "epochs"),
    ("optimizer steps", "steps"),
    ("dataset", "dataset"),
    ("data the weights saw, in order (earlier checkpoints first)", "lineage"),
    ("training images", "num_images"),
    ("seed", "seed"),
]

PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt"]


def check_safetensors(folder: Path, where: str | None = None) -> None:
    """Raise unless `folder` holds `*.safetensors` weights; pickled weights are refused by name, never opened."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    where = where or str(folder)
    if pickles:
        raise CheckpointError(
            f"{where} has only pickled weights ({', '.join(pickles)}); refusing pickled weights: pickled weights are "
            "refused because unpickling can run arbitrary code.",
            "load the model where it was trained and re-save it with save_pretrained(..., safe_serialization=True) "
            "(the default), which writes model.safetensors.",
        )
    raise CheckpointError(
        f"{where} has no model.safetensors (nor any *.safetensors weights); pickled weights are never loaded.",
        "save the model with `model.save_pretrained(dir)` and point to that folder.",
    )


def _read_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing.", "pass the folder written by `model.save_pretrained(dir)`.")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}).", "re-write the file or delete it.") from err
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} holds a {type(data).__name__}, not a JSON object.",
            "write a {key: value} object.",
        )
    return data


def infer_card_kind(config: dict, card_kind: str | None = None) -> str:
    """Card template for a checkpoint's `config.json`: `mae`, `classifier` or `segmenter`.

    Args:
        config: the parsed `config.json`.
        card_kind: the kind the caller expects; must agree with the config's `model_type`.

    Example:
        >>> infer_card_kind({"model_type": "medmae"})
        'mae'
    """
    model_type = config.get("model_type")
    if model_type not in CARD_KINDS:
        raise CheckpointError(
            f"checkpoint of another architecture: model_type {model_type!r} is not one of {sorted(CARD_KINDS)}.",
            "push a folder saved by an hf_medmae model (MedMAEForPreTraining or its classifier/segmenter), "
            "or use `huggingface_hub.upload_folder` directly for other models.",
        )
    kind = CARD_KINDS[model_type]
    if card_kind is not None and card_kind != kind:
        raise CheckpointError(
            f"card_kind={card_kind!r} does not match model_type {model_type!r} (a {kind} checkpoint).",
            f"leave card_kind unset or pass card_kind={kind!r}.",
        )
    return kind


def read_run_info(folder: Path) -> dict:
    """`run_info.json` of a checkpoint (see the module docstring), type-checked; `{}` when absent."""
    info = _read_json(folder / "run_info.json")
    for key, value in info.items():
        expected = RUN_INFO_TYPES.get(key)
        if expected is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            raise CheckpointError(
                f"run_info.json: {key}={value!r} should be of type {getattr(expected, '__name__', 'number')}.",
                f"fix the value of {key!r} in {folder / 'run_info.json'}.",
            )
    return info


def read_metrics(folder: Path) -> dict[str, float]:
    """Evaluation metrics of a checkpoint: flat numeric entries of its metrics JSON files.

    Training bookkeeping (`train_*`, `epoch`, runtimes, throughputs, FLOPs, memory) is left out.

    Example:
        >>> read_metrics(Path("outputs/mae"))  # doctest: +SKIP
        {'eval_loss': 0.41}
    """
    metrics: dict[str, float] = {}
    for name in METRICS_FILES:
        for key, value in _read_json(folder / name).items():
            if key in metrics or _metric_split(key) is None:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[key] = value
    return metrics


def _metric_split(key: str) -> tuple[str | None, str] | None:
    """`eval_acc` -> ("validation", "acc"), `test_dice` -> ("test", "dice"); None for bookkeeping keys."""
    if key == "epoch" or key.startswith("train_") or any(s in key for s in ("runtime", "per_second", "flos", "_mem_")):
        return None
    for prefix, split in (("eval_", "validation"), ("test_", "test")):
        if key.startswith(prefix):
            return split, key[len(prefix) :]
    return None, key


def eval_results(metrics: dict[str, float], kind: str, dataset: str | None) -> list[EvalResult]:
    """One `EvalResult` per metric, for the card's `model-index`."""
    task_type = KIND_TASKS[kind][2]
    results = []
    for key, value in metrics.items():
        split, name = _metric_split(key)
        results.append(
            EvalResult(
                task_type=task_type,
                dataset_type=dataset or "unspecified",
                dataset_name=dataset or "unspecified",
                dataset_split=split,
                metric_type=name,
                metric_name=key,
                metric_value=value,
            )
        )
    return results


def card_template(kind: str) -> str:
    """Text of the `model_cards/<kind>.md` template, read from the installed package `hf_medmae.model_cards`."""
    try:
        return resources.files(TEMPLATE_PACKAGE).joinpath(f"{kind}.md").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise CheckpointError(
            f"the model card template {kind}.md is not installed ({err}).",
            "reinstall hf_medmae (`pip install .`, or `pip install -e .` for a checkout): the templates ship as "
            f"package data of {TEMPLATE_PACKAGE}.",
        ) from err


def _table_rows(source: dict, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (label, json.dumps(source[key]) if isinstance(source[key], (dict, list)) else str(source[key]))
        for label, key in rows
        if source.get(key) is not None
    ]


def setup_values(config: dict) -> dict:
    """config.json's values for the setup table: a head's `vit_config` keys as its own, plus what MSMAE adds
    (the supervised head's classes; the attention refresh only where tokens are dropped)."""
    values = {**(config.get("vit_config") or {}), **config}
    if config.get("supervised_loss_weight"):
        values["supervised_classes"] = [
            name for _, name in sorted((config.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))
        ]
    if not config.get("throw_ratio"):
        values.pop("attention_refresh_epochs", None)
    return values


def render_model_card(
    checkpoint_dir: str | Path, kind: str | None = None, repo_id: str | None = None, *, license: str = "apache-2.0"
) -> ModelCard:
    """Model card of a checkpoint folder, from `model_cards/<kind>.md` and the folder's own files.

    Args:
        checkpoint_dir: a `save_pretrained` folder, optionally with `preprocessor_config.json`,
            `run_info.json` and `metrics.json` / `eval_results.json` / `all_results.json`.
        kind: `mae`, `classifier` or `segmenter`; inferred from `config.json`'s `model_type` if None.
        repo_id: the Hub id used in the card's title and loading snippet (default: the folder name).
        license: a Hub license id.

    Example:
        >>> card = render_model_card("outputs/mae", repo_id="me/wbc-mae")  # doctest: +SKIP
        >>> card.data.to_dict()["tags"][:2]  # doctest: +SKIP
        ['medical-imaging', 'masked-autoencoder']
    """
    folder = Path(checkpoint_dir)
    config = _read_json(folder / "config.json", required=True)
    kind = infer_card_kind(config, kind)
    run_info, metrics = read_run_info(folder), read_metrics(folder)
    preprocessor = _read_json(folder / "preprocessor_config.json")
    name = repo_id or folder.resolve().name
    tag, pipeline_tag, _ = KIND_TASKS[kind]
    dataset = run_info.get("dataset")
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        tags=[*MODEL_TYPE_BASE_TAGS.get(config["model_type"], BASE_TAGS), tag],
        datasets=[dataset] if dataset else None,
        pipeline_tag=pipeline_tag,
        model_name=name,
        eval_results=eval_results(metrics, kind, dataset) or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=card_template(kind),
        repo_id=name,
        model_type=config["model_type"],
        cnn=config.get("architecture"),
        architecture=(config.get("architectures") or ["MedMAEForPreTraining"])[0],
        encoder_attribute="videomae" if config["model_type"] == "medmae3d" else "vit",
        setup_rows=_table_rows(setup_values(config), CONFIG_ROWS),
        run_rows=_table_rows({**run_info, "lineage": " → ".join(run_info.get("datasets") or []) or None}, RUN_ROWS),
        run_info=run_info,
        image_mean=preprocessor.get("image_mean"),
        image_std=preprocessor.get("image_std"),
        eval_rows=[(key, _metric_split(key)[0] or "-", f"{value:.6g}") for key, value in metrics.items()],
        labels=sorted((config.get("id2label") or {}).items(), key=lambda kv: int(kv[0])),
    )


def push_checkpoint(
    checkpoint_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    card_kind: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """Upload a checkpoint folder (top-level JSON, safetensors, Markdown, PNG) and return the commit sha.

    Writes `README.md` into the folder first when it has none (see `render_model_card`). The repo is
    created if needed, and so is the branch `revision`.

    Args:
        checkpoint_dir: folder written by `save_pretrained` (+ processor, metrics, run_info, plots).
        repo_id: `namespace/name` on the Hub.
        private: create the repo as private (an existing repo keeps its visibility).
        revision: branch to commit to (default `main`); created from `main` when missing.
        token: Hub token with write access (default: `HF_TOKEN` / the saved login).
        commit_message: defaults to "Upload <kind> checkpoint with hf_medmae".
        card_kind: expected kind (`mae`, `classifier`, `segmenter`); checked against `config.json`.
        license: license id written into a generated card.

    Example:
        >>> sha = push_checkpoint("outputs/mae", "me/wbc-mae")  # doctest: +SKIP
        >>> pull_checkpoint("me/wbc-mae", revision=sha)  # doctest: +SKIP
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist.", "pass the `save_pretrained` output folder."
        )
    kind = infer_card_kind(_read_json(folder / "config.json", required=True), card_kind)
    check_safetensors(folder)
    if not (folder / "README.md").exists():
        render_model_card(folder, kind, repo_id, license=license).save(folder / "README.md")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or f"Upload {kind} checkpoint with hf_medmae",
            allow_patterns=PUSH_PATTERNS,
            ignore_patterns=["*/*"],  # top level only: no Trainer `checkpoint-*/` folders with optimizer state
        )
    except HfHubHTTPError as err:
        if err.response is None or err.response.status_code not in (401, 403):
            raise
        raise CheckpointError(
            f"the Hub refused writing to {repo_id} ({err.response.status_code}).",
            "use a token with write access (HF_TOKEN or `hf auth login`) in a namespace you own.",
        ) from err
    return info.oid


def pull_checkpoint(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> str:
    """Download a checkpoint's JSON, safetensors and Markdown files; return the local folder.

    Works offline (`HF_HUB_OFFLINE=1`) once the revision is cached.

    Args:
        repo_id: `namespace/name` on the Hub.
        revision: branch, tag or commit sha (default `main`).
        token: Hub token for private repos.
        cache_dir: Hub cache folder (default `HF_HUB_CACHE`).

    Example:
        >>> folder = pull_checkpoint("me/wbc-mae")  # doctest: +SKIP
        >>> MedMAEForPreTraining.from_pretrained(folder)  # doctest: +SKIP
    """
    rev = revision or "main"
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=PULL_PATTERNS,
            local_files_only=bool(local_files_only),  # None/False: huggingface_hub still honours HF_HUB_OFFLINE
        )
    except HFValidationError as err:
        raise CheckpointError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub repo id.",
            "check the path (it must exist) or use a repo id such as 'user/medmae-wbc'.",
        ) from err
    except RevisionNotFoundError as err:
        raise CheckpointError(
            f"revision {rev!r} does not exist in {repo_id}.",
            f"list branches/tags with `HfApi().list_repo_refs({repo_id!r})` and commits with "
            f"`HfApi().list_repo_commits({repo_id!r})`, or leave revision unset for main.",
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(
            f"repo {repo_id} does not exist or is private.",
            "check the id / token: the id is `namespace/name`, a private repo needs HF_TOKEN with read access.",
        ) from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise CheckpointError(
            f"{repo_id}@{rev} is not (completely) in the local cache and the Hub cannot be reached or downloads "
            f"are off ({err}).",
            "pull it once with network access (unset HF_HUB_OFFLINE), or pass a local checkpoint folder.",
        ) from err
    folder = Path(local)
    _read_json(folder / "config.json", required=True)
    if not any(folder.glob("*.safetensors")):
        _raise_for_remote_weights(repo_id, revision, token, folder)
    return str(folder)


def _raise_for_remote_weights(repo_id: str, revision: str | None, token: str | None, folder: Path) -> None:
    """The snapshot has no safetensors: name the pickles the repo holds instead (if the Hub is reachable)."""
    try:
        remote = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError):
        remote = []
    pickles = [f for f in remote if any(Path(f).match(p) for p in PICKLE_PATTERNS)]
    if pickles:
        raise CheckpointError(
            f"{repo_id} has only pickled weights ({', '.join(pickles)}); refusing pickled weights: "
            f"{', '.join(pickles)} is refused "
            "(unpickling can run arbitrary code).",
            "ask the owner to re-save with `save_pretrained` (safetensors), or convert it yourself in a sandbox.",
        )
    check_safetensors(folder, where=f"{repo_id}@{revision or 'main'}")


__all__ = [
    "push_checkpoint",
    "pull_checkpoint",
    "render_model_card",
    "infer_card_kind",
    "read_metrics",
    "read_run_info",
    "CARD_KINDS",
]
