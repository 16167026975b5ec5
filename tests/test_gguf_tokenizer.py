"""GGUF tokenizers tokenize as the file says (models.check_gguf_tokenizer): transformers < 5.23 drops Gemma 3's BOS,
and < 5.18 splits its words into the wrong pieces. Measured on the H200 with transformers 5.17 (runs 9-17 of
docs/quality.md): Gemma's text perplexity ~100x what it is here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from headwise import models as hw_models
from headwise.errors import ModelLoadError
from headwise.models import check_gguf_tokenizer

BOS = {"add_bos_token": True, "bos_token_id": 1}


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<bos>": 1, "a": 2, "b": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>")


def test_a_missing_bos_is_added_and_survives_save_and_load(tmp_path):
    tok = _tokenizer()
    assert tok("a b").input_ids == [2, 3]
    assert check_gguf_tokenizer(tok, BOS, SimpleNamespace(model_type="llama"), "x.gguf") is True
    assert tok("a b").input_ids == [1, 2, 3]
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again("a b").input_ids == [1, 2, 3]
    assert check_gguf_tokenizer(again, BOS, SimpleNamespace(model_type="llama"), "x.gguf") is False


@pytest.mark.parametrize("meta", [{"add_bos_token": False, "bos_token_id": 1}, {"add_bos_token": None, "bos_token_id": None}])
def test_no_bos_is_added_where_the_file_does_not_ask_for_one(meta):
    tok = _tokenizer()
    assert check_gguf_tokenizer(tok, meta, SimpleNamespace(model_type="llama"), "x.gguf") is False
    assert tok("a b").input_ids == [2, 3]


def test_gemma_with_a_transformers_that_splits_its_words_is_refused(monkeypatch):
    monkeypatch.setattr(hw_models, "transformers_version", lambda: "5.17.0")
    with pytest.raises(ModelLoadError, match=r"install transformers>=5\.18"):
        check_gguf_tokenizer(_tokenizer(), BOS, SimpleNamespace(model_type="gemma3_text"), "g.gguf")
    # other architectures convert fine with it
    assert check_gguf_tokenizer(_tokenizer(), BOS, SimpleNamespace(model_type="llama"), "x.gguf") is True


def test_bundled_gemma_starts_with_bos_and_keeps_whole_words(gemma3):
    """The bundled Gemma 3 as the loader gives it (its converted cache): BOS first, words as the model knows them."""
    tok = gemma3.tokenizer
    assert tok.convert_ids_to_tokens(tok("The pass key").input_ids) == ["<bos>", "The", "▁pass", "▁key"]
