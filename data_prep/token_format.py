"""The one definition of token data: token shards (made by ``pipeline.tokenize`` from clip shards)
and single codes files (``pipeline.tokenize encode-file``). Readers and writers import this module.

A token dataset folder::

    DIR/tokens-clips-n0000-w000-000000.tar   the codes of one clip shard, same sample keys
    DIR/manifest.json                        TokenManifest: tokenizer, settings, shards, skipped
    DIR/.records/                            one record per finished shard (resume bookkeeping)

A token sample is two tar members with the clip sample's key: ``<key>.npy`` (the codes, a numpy
array of shape (t, h, w), or (t, h, w, c) with c codebooks; int16 when the codebook has at most
32768 entries, else int32) and ``<key>.json`` (``TokenMeta``, which carries the clip's own
``SampleMeta`` under ``source``). Code index conventions are model/quantizers.py's.

A codes file holds the codes of one video, (t, h, w) or (t, h, w, c), and ``CodesMeta``:
``.npz`` (arrays ``codes`` and ``meta``, a JSON string) or ``.safetensors`` (tensor ``codes``,
JSON under the metadata key ``meta``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TOKEN_FORMAT_VERSION = 1
CODES_KEY = "npy"
META_KEY = "json"
TOKEN_SHARD_PREFIX = "tokens-"
RECORDS_DIR = ".records"
CODES_FILE_SUFFIXES = (".npz", ".safetensors")
_INT16_MAX_CODEBOOK = 2**15


def codes_dtype(codebook_size: int) -> np.dtype:
    """int16 when every index fits (codebook_size <= 32768), else int32."""
    return np.dtype(np.int16 if codebook_size <= _INT16_MAX_CODEBOOK else np.int32)


def token_shard_name(clip_shard: str) -> str:
    """Output name for a clip shard path: ``tokens-<clip shard file name>``."""
    return TOKEN_SHARD_PREFIX + Path(clip_shard).name


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = (
        sorted(set(data) - names),
        sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ),
    )
    if unknown or missing:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}, missing fields {missing}")
    return cls(**data)


@dataclass(frozen=True, kw_only=True)
class TokenMeta:
    """The ``json`` member of a token sample."""

    source: dict[str, Any]
    """The clip sample's SampleMeta (data_prep/format.py) as a dict."""
    source_shard: str
    """File name of the clip shard the sample came from."""
    num_frames: int
    """Frames encoded: the first 1 + k*f frames of the clip."""
    frame_height: int
    frame_width: int
    """Size of the frames the tokenizer saw (after resizing and cropping)."""
    shape: list[int]
    """Shape of the codes array."""
    dtype: str
    codebook_size: int
    num_codebooks: int

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> TokenMeta:
        return _from_dict(cls, json.loads(data))


@dataclass(frozen=True, kw_only=True)
class TokenShardEntry:
    name: str
    source_shard: str
    """Path of the clip shard it was made from."""
    num_samples: int
    bytes: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Samples of the clip shard that could not be encoded: {"key", "reason"}."""


@dataclass(kw_only=True)
class TokenManifest:
    """``manifest.json`` of a token dataset."""

    format_version: int = TOKEN_FORMAT_VERSION
    kind: str = "tokens"
    tokenizer: dict[str, Any] = field(default_factory=dict)
    """The TokenizerConfig (model/config.py) as a dict."""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    """SHA-256 of the export's model.safetensors: codes only mean something with these weights."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How clips became frames and codes (size, crop, frame limit, chunking, precision)."""
    shards: list[TokenShardEntry] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Clip shards without a finished token shard (the run stopped early); rerun to finish."""

    @property
    def complete(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["complete"] = self.complete
        data["totals"] = {
            "num_shards": len(self.shards),
            "num_samples": sum(s.num_samples for s in self.shards),
            "num_skipped": sum(len(s.skipped) for s in self.shards),
            "bytes": sum(s.bytes for s in self.shards),
        }
        return data


@dataclass(frozen=True, kw_only=True)
class CodesMeta:
    """What a codes file says about its codes."""

    format_version: int = TOKEN_FORMAT_VERSION
    tokenizer: dict[str, Any]
    """The TokenizerConfig as a dict: decode with a tokenizer of this architecture."""
    checkpoint_sha256: str = ""
    shape: list[int]
    dtype: str
    num_frames: int
    """Frames encoded (1 + k*f; a longer source's extra frames are left out)."""
    fps: float
    frame_height: int
    frame_width: int
    source: str = ""
    precision: str = ""
    """Arithmetic the encoder ran in ('fp32' IEEE, or 'bf16' autocast; '' in older files):
    the two can give different codes for the same clip."""


def save_codes(path: str | Path, codes: np.ndarray, meta: CodesMeta) -> Path:
    """Writes a codes file (.npz or .safetensors, by suffix) under a temporary name, renamed
    when complete."""
    path = Path(path)
    check_codes_array(codes, where=str(path))
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    text = json.dumps(dataclasses.asdict(meta), sort_keys=True)
    if path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, codes=codes, meta=np.array(text))
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"codes": np.ascontiguousarray(codes)}, str(tmp), metadata={"meta": text})
    else:
        raise ValueError(f"{path}: a codes file ends in one of {CODES_FILE_SUFFIXES}")
    tmp.replace(path)
    return path


def load_codes(path: str | Path) -> tuple[np.ndarray, CodesMeta]:
    """Reads a codes file; ValueError naming what was expected for anything malformed."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "codes" not in data or "meta" not in data:
                    raise ValueError(f"expected arrays 'codes' and 'meta', found {data.files}")
                codes, text = data["codes"], str(data["meta"])
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                text = (f.metadata() or {}).get("meta")
                if "codes" not in f.keys() or text is None:
                    raise ValueError("expected a tensor 'codes' and metadata 'meta'")
                codes = f.get_tensor("codes")
        else:
            raise ValueError(f"expected a file ending in one of {CODES_FILE_SUFFIXES}")
        meta = _from_dict(CodesMeta, json.loads(text))
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable codes file ({exc})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    check_codes_array(codes, where=str(path))
    if list(codes.shape) != list(meta.shape) or str(codes.dtype) != meta.dtype:
        raise ValueError(
            f"{path}: codes are {codes.dtype} {list(codes.shape)} but the metadata says "
            f"{meta.dtype} {meta.shape}"
        )
    return codes, meta


def check_codes_array(codes: np.ndarray, where: str = "codes") -> None:
    """ValueError unless an integer array (t, h, w) or (t, h, w, c)."""
    if not isinstance(codes, np.ndarray) or codes.dtype.kind not in "iu":
        dtype = getattr(codes, "dtype", type(codes).__name__)
        raise ValueError(f"{where}: expected integer codes (int16 or int32), got {dtype}")
    if codes.ndim not in (3, 4) or 0 in codes.shape:
        raise ValueError(
            f"{where}: expected codes of shape (t, h, w) or (t, h, w, codebooks), got "
            f"{tuple(codes.shape)}"
        )
