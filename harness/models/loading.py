"""Load vision-language checkpoints: Hub ids, local folders, and the models bundled with the project.

Every model, bundled or downloaded, goes through ``load_model``: transformers'
``AutoModelForImageTextToText`` and ``AutoProcessor`` pick the classes from the folder's config,
and the family's adapter (``harness.models.family``) is chosen from the config before any weight
is read, so an unsupported family fails at once with the list of supported ones. The bundled
default is a faithful stand-in for ``llava-hf/llava-1.5-7b-hf``: same classes, same processor,
same hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp64": torch.float64, "float64": torch.float64}


class ModelNotFoundError(RuntimeError):
    """The model name is neither bundled, a local folder, nor reachable on the Hub."""


# Bundled models whose folder a training run still has to make: name -> what to do (may hold
# ``{path}``). A suite or a load that names one fails at once, naming the missing folder and how to
# make it, instead of trying the name as a Hub id (a minute of retries offline, then one failed
# record per cell). Empty since issue 29's deep model (qvlm-deep-llava) was trained and bundled.
PENDING_BUNDLED: dict[str, str] = {}


def pending_model_error(name: str) -> str | None:
    """Why ``name`` cannot load yet, if it is a bundled model still to be trained (else None)."""
    if name not in PENDING_BUNDLED or name in bundled_models():
        return None
    path = BUNDLED_DIR / name
    return (f"bundled model {name!r} is missing: {path} has no config.json; "
            + PENDING_BUNDLED[name].format(path=path))


def bundled_models() -> dict[str, Path]:
    """Bundled checkpoints by name: every folder under harness/models/bundled with a config.json."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / "config.json").is_file()}


def resolve_model_path(name_or_path: str) -> str:
    """Bundled name -> its folder; an existing local folder -> itself; anything else is a Hub id."""
    bundled = bundled_models()
    if name_or_path in bundled:
        return str(bundled[name_or_path])
    pending = pending_model_error(name_or_path)
    if pending:
        raise ModelNotFoundError(pending)
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path


# Weight folders up to this size are hashed in full; larger ones by a content sample (below).
FULL_HASH_BYTES = 512 * 2**20
SAMPLE_BYTES = 4096  # bytes read at each sampled offset of a large weight file
SPREAD_SAMPLES = 256  # evenly spaced samples of a large file that is not safetensors
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_FINGERPRINTS: dict[tuple, str] = {}


def model_fingerprint(name_or_path: str) -> str:
    """What identifies a model's weights, for cache keys: retraining a bundled model or replacing a
    local folder's files gives a new fingerprint, so stale results and states are never reused.

    A local or bundled folder: sha256 over its config and weight files, from content only, so a
    folder rebuilt or copied with identical bytes keeps its cell keys (an mtime would not). Up to
    ``FULL_HASH_BYTES`` in all, every byte; above, hashing 13 GB on every run would cost minutes,
    so each large file contributes its size and a sample (``_sampled_digest``). A Hub id: the id
    and the commit of its locally cached snapshot (no network), so a new revision downloaded into
    the cache recomputes the cells; an id not yet cached is just "hub:<id>" until its first load.
    """
    import hashlib

    path = resolve_model_path(name_or_path)
    folder = Path(path)
    if not folder.is_dir():
        commit = cached_hub_commit(name_or_path)
        return f"hub:{name_or_path}" + (f"@{commit}" if commit else "")
    files = sorted(f for f in folder.iterdir() if f.is_file() and (
        f.name == "config.json" or f.suffix in _WEIGHT_SUFFIXES or f.name.endswith(".index.json")))
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (str(folder.resolve()), stats)  # memo only (this process): the digest uses no mtime
    if key not in _FINGERPRINTS:
        full = sum(st[1] for st in stats) <= FULL_HASH_BYTES
        h = hashlib.sha256()
        for f, (name, size, _) in zip(files, stats):
            h.update(f"{name}:{size}".encode())
            if full or f.suffix not in _WEIGHT_SUFFIXES:  # configs and indexes: small, in full
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            else:
                h.update(_sampled_digest(f, size))
        _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]


def _sampled_digest(f: Path, size: int) -> bytes:
    """A content digest of a large weight file that reads a few MB, not the file.

    safetensors: its whole header (every tensor's name, dtype, shape and byte range) plus
    ``SAMPLE_BYTES`` at the start, middle and end of every tensor, so any retrained or replaced
    tensor changes it (training changes essentially all of a tensor's bytes) while a 7B
    checkpoint costs ~1k tensors × 12 KB ≈ 10 MB of reads. Other formats (pickles): the first
    and last MB plus ``SPREAD_SAMPLES`` evenly spaced samples. An edit confined to bytes no
    sample touches would go unseen; a rebuilt folder with identical bytes is always recognized.
    """
    import hashlib
    import json
    import struct

    h = hashlib.sha256()
    with open(f, "rb") as fh:
        offsets: list[tuple[int, int]] = []
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if f.suffix == ".safetensors" and len(head) == 8 else 0
        header = fh.read(n) if 0 < n <= min(size - 8, 100 << 20) else b""
        try:
            entries = json.loads(header) if header else None
        except ValueError:
            entries = None
        if isinstance(entries, dict):
            h.update(head + header)
            base = 8 + n
            for name, info in sorted(entries.items()):
                if name == "__metadata__" or not isinstance(info, dict):
                    continue
                start, end = (base + int(x) for x in info["data_offsets"])
                for at in (start, (start + end) // 2, end - SAMPLE_BYTES):
                    offsets.append((max(start, at), min(SAMPLE_BYTES, end - max(start, at))))
        else:
            offsets = [(0, 1 << 20), (max(0, size - (1 << 20)), 1 << 20)]
            offsets += [(size * i // SPREAD_SAMPLES, SAMPLE_BYTES) for i in range(SPREAD_SAMPLES)]
        for at, length in offsets:
            if length > 0:
                fh.seek(at)
                h.update(fh.read(length))
    return h.digest()


def cached_hub_commit(repo_id: str, cache_dir: str | Path | None = None) -> str | None:
    """The commit of the snapshot the local Hugging Face cache serves for ``repo_id`` (its default
    revision), read from the cache alone; None when the model isn't cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # not a valid repo id, or no huggingface_hub: nothing cached to name
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name (``DTYPES``: fp16, bf16, ...) as a ``torch.dtype``; a ``torch.dtype`` passes through.
    ``auto`` is resolved before (``auto_dtype``; a suite's dtype: ``cells.suite_dtype``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(sorted(DTYPES))}") from None


def auto_dtype(device: str) -> str:
    """The one ``auto`` dtype rule of the project (accuracy suites, ``load_model``, ``qvlm-bench perf``):
    fp16 on GPUs, as the papers; fp64 on the CPU, where float64 makes every computation reproducible
    across x86 SIMD paths and thread counts (docs/design.md) and fp16 matmuls are slow or missing."""
    return "fp16" if str(device).startswith("cuda") else "fp64"


@dataclass
class LoadedModel:
    """A model with its processor and where it came from (recorded in every result)."""

    name: str
    path: str
    model: Any
    processor: Any
    dtype: torch.dtype
    device: str
    adapter: Any = None  # the family's ModelAdapter (harness.models.family)

    @property
    def family(self) -> str | None:
        return getattr(self.adapter, "name", None)


def image_only_processor(cls):
    """``cls`` without its video processor: the harness asks one image per question, and
    transformers' video processors need torchvision, which this project does not install.
    A folder it saves names ``cls`` itself as its ``processor_class`` (``load_processor`` reads
    such a folder back through this class)."""
    base_attrs = [a for a in cls.get_attributes() if "video" not in a]

    class ImageOnly(cls):  # cls.__init__ itself: transformers reads its code for the accepted kwargs
        video_processor = None  # the family's __init__ passes it on; ProcessorMixin drops it

        @classmethod
        def get_attributes(klass):
            return list(base_attrs)

        def to_dict(self):
            d = super().to_dict()
            d["processor_class"] = cls.__name__
            return d

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


def load_processor(path: str, config=None, **kwargs):
    """``AutoProcessor`` for the folder or Hub id (``kwargs`` override its saved settings).
    Where transformers cannot build the family's video processor (no torchvision here, or a
    folder saved without one, as the tiny test folders are), the same processor class without
    it: the harness asks one image per question."""
    import transformers
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, **kwargs)
    except (OSError, ImportError, AttributeError, ValueError) as exc:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        config = config or load_config(path)
        name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None))
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is None or not any("video" in a for a in cls.get_attributes()):
            raise
        try:
            return image_only_processor(cls).from_pretrained(path, **kwargs)
        except Exception:
            raise exc from None


def load_config(name_or_path: str):
    """The model's transformers config (a local folder, or a Hub id cached or reachable)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(name_or_path))


def check_family(name_or_path: str) -> str | None:
    """The family name of a model from its config alone (no weights read); raises
    ``UnknownFamilyError`` naming the supported families for an unsupported one. None when the
    config cannot be read here (a Hub id with no Hub): ``load_model`` reports that later."""
    from .family import adapter_for_config

    try:
        config = load_config(name_or_path)
    except (OSError, ValueError):
        return None
    return adapter_for_config(config).name


def load_model(name_or_path: str, *, dtype: str | torch.dtype | None = None,
               device: str = "cpu") -> LoadedModel:
    """Load an image-text-to-text checkpoint of a supported family, its processor and adapter."""
    from transformers import AutoModelForImageTextToText

    from .family import adapter_for, adapter_for_config

    path = resolve_model_path(name_or_path)
    torch_dtype = to_torch_dtype(auto_dtype(device) if dtype in (None, "auto") else dtype)
    try:
        config = load_config(path)
        family = adapter_for_config(config)  # an unknown family fails here, before any weight is read
        processor = load_processor(path, config, **family.processor_kwargs(config))
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
    except OSError as exc:
        valid = ", ".join(bundled_models()) or "(none)"
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}\n"
            f"Use a bundled model ({valid}), a local folder in Hugging Face format, or a Hub id "
            f"such as llava-hf/llava-1.5-7b-hf with the Hub reachable."
        ) from exc
    adapter = adapter_for(model)
    model.to(device).eval()
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"  # batched greedy generation must not depend on batch size
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token or tok.eos_token
    return LoadedModel(name=name_or_path, path=path, model=model, processor=processor,
                       dtype=torch_dtype, device=str(device), adapter=adapter)
