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
