"""Safetensors checkpoints: a memory-mapped reader, a streaming atomic writer, block-FP8 (de)quantisation.

File format: an 8-byte little-endian u64 N, N bytes of JSON header
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(space-padded), then the data buffer; offsets are relative to the start of the buffer, data is
row-major little-endian. A checkpoint is a directory holding ``model.safetensors``, or shards plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": int}, "weight_map": {name: file}}``).

Block FP8 (DeepSeek-V3 / Kimi K2): a weight ``W`` [out, in] is stored as fp8 ``name`` plus F32
``name + "_scale_inv"`` [ceil(out/bo), ceil(in/bi)] for block size (bo, bi), and
``W[r, c] = fp8[r, c] * scale_inv[r // bo, c // bi]``; the last block of each axis may be partial.
"""
import json
import math
import operator
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
from numpy.typing import DTypeLike

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(bool),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
_MAX_HEADER_BYTES = 100 * 1024 * 1024

TensorSpec = tuple[str, Sequence[int], DTypeLike, Callable[[], np.ndarray]]


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in `file`
    end: int


def weight_block_size(hf_config: Mapping) -> tuple[int, int]:
    """(bo, bi) from an HF config dict's quantization_config.weight_block_size; [128, 128] if absent."""
    block = (hf_config.get("quantization_config") or {}).get("weight_block_size", DEFAULT_BLOCK)
    return _check_block(block)


def _check_block(block) -> tuple[int, int]:
    block = tuple(block)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"weight block size must be two positive ints, got {block!r}")
    return block


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_header(file: Path) -> dict[str, _Entry]:
    """Parses and validates one file's header: dtypes, shapes, offsets in range, sizes, no overlaps."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file}: truncated safetensors file ({size} bytes, no 8-byte header length)")
        n = int.from_bytes(prefix, "little")
        if n > size - 8 or n > _MAX_HEADER_BYTES:
            raise ValueError(f"{file}: header length {n} does not fit in the file of {size} bytes")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    entries, spans = {}, []
    for name, info in header.items():
        where = f"{file}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{where}: entry needs dtype, shape and data_offsets, got {info!r}")
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{where}: unsupported dtype {info['dtype']!r}")
        dtype, shape, offsets = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative ints")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise ValueError(f"{where}: data_offsets {offsets!r} is not two non-negative ints")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise ValueError(f"{where}: data_offsets {offsets} outside the data buffer of {data_size} bytes")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ValueError(f"{where}: data_offsets span {end - begin} bytes, shape {shape} "
                             f"of {info['dtype']} needs {nbytes}")
        entries[name] = _Entry(file, dtype, tuple(shape), data_start + begin, data_start + end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise ValueError(f"{file}: tensors {name0!r} and {name1!r} overlap in the data buffer")
    return entries


def _load_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to file names")
    return weight_map


def _positions(index, shape: tuple[int, int]) -> list[np.ndarray]:
    """Per axis of a 2-D tensor, the positions a tuple of slices / ints selects."""
    index = () if index is None else index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape):
        raise IndexError(f"index {index!r} has more entries than the tensor has axes {shape}")
    out = []
    for size, ix in zip(shape, index + (slice(None),) * (len(shape) - len(index))):
        if isinstance(ix, slice):
            out.append(np.arange(*ix.indices(size)))
        else:
            i = operator.index(ix)
            if not -size <= i < size:
                raise IndexError(f"index {i} out of range for an axis of size {size}")
            out.append(np.array([i % size]))
    return out


class CheckpointReader:
    """Memory-mapped read access to a safetensors checkpoint; nothing is loaded until read.

    `path` is a .safetensors file, or a directory holding `model.safetensors.index.json` (its
    weight_map decides which file holds which tensor) or else any number of *.safetensors files
    (their union; a name in two files is an error). `weight_block_size` is the block-FP8 block
    (bo, bi) (see `weight_block_size(hf_config)`).
    """

    def __init__(self, path: str | os.PathLike, *, weight_block_size: Sequence[int] = DEFAULT_BLOCK):
        self.path = Path(path)
        self.weight_block_size = _check_block(weight_block_size)
        self._maps: dict[Path, np.memmap] | None = {}
        self._entries: dict[str, _Entry] = {}
        index = self.path / INDEX_FILE
        if self.path.is_file():
            self._entries = _read_header(self.path)
        elif index.is_file():
            weight_map = _load_weight_map(index)
            headers = {}
            for file_name in sorted(set(weight_map.values())):
                if not (self.path / file_name).is_file():
                    raise FileNotFoundError(f"{index}: weight_map refers to missing file {file_name}")
                headers[file_name] = _read_header(self.path / file_name)
            for name, file_name in weight_map.items():
                if name not in headers[file_name]:
                    raise ValueError(f"{index}: weight_map puts {name!r} in {file_name}, "
                                     f"whose header does not list it")
                self._entries[name] = headers[file_name][name]
        elif self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.path}")
            for file in files:
                for name, entry in _read_header(file).items():
                    if name in self._entries:
                        raise ValueError(f"tensor {name!r} is in both {self._entries[name].file} and {file}")
                    self._entries[name] = entry
        else:
            raise FileNotFoundError(f"checkpoint {self.path} does not exist")

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drops the memory maps; arrays already returned stay valid (they are copies)."""
        self._maps = None

    def _scale_of(self, name: str) -> str | None:
        scale = name + SCALE_SUFFIX
        return scale if scale in self._entries else None

    def _is_scale(self, name: str) -> bool:
        return name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in self._entries

    def names(self) -> list[str]:
        """Sorted tensor names, without the `*_scale_inv` tensors of quantized weights."""
        return sorted(n for n in self._entries if not self._is_scale(n))

    def scale_names(self) -> list[str]:
        """Sorted names of the `*_scale_inv` tensors that belong to a weight in the checkpoint."""
        return sorted(n for n in self._entries if self._is_scale(n))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.path}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        """The stored numpy dtype (ml_dtypes for BF16 / F8_E4M3 / F8_E5M2)."""
        return self._entry(name).dtype

    def is_quantized(self, name: str) -> bool:
        """True if `name` has a block scale `name + "_scale_inv"`."""
        self._entry(name)
        return self._scale_of(name) is not None

    def _view(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        if self._maps is None:
            raise ValueError(f"checkpoint reader for {self.path} is closed")
        if entry.file not in self._maps:
            self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
        raw = self._maps[entry.file][entry.start:entry.end]
        return raw.view(entry.dtype).reshape(entry.shape)

    def read(self, name: str, index=None) -> np.ndarray:
        """The tensor, or `tensor[index]` for a numpy basic index (tuple of slices / ints).

        Returns a fresh in-memory array of the stored dtype. Only the pages holding the selected
        elements are read from disk (a row slice along axis 0 reads just those rows).
        """
        view = self._view(name)
        return np.array(view if index is None else view[index])

    def read_dequantized(self, name: str, index=None, dtype=np.float32) -> np.ndarray:
        """`tensor[index]` as `dtype`; a block-FP8 weight [out, in] is multiplied by its block scale.

        For a quantized weight, index is a tuple of slices / ints over (out, in); only the rows of
        the weight and the blocks of `name_scale_inv` that the index touches are read. The product
        fp8.astype(f32) * scale_inv is taken in float32, then cast to `dtype`.
        """
        scale_name = self._scale_of(name)
        if scale_name is None:
            return self.read(name, index).astype(dtype)
        shape, (bo, bi) = self.shape(name), self.weight_block_size
        if len(shape) != 2:
            raise ValueError(f"quantized tensor {name!r} in {self.path} must be 2-D, has shape {shape}")
        expected = (-(-shape[0] // bo), -(-shape[1] // bi))
        if self.shape(scale_name) != expected:
            raise ValueError(f"{scale_name!r} in {self.path} has shape {self.shape(scale_name)}, expected "
                             f"{expected} for {name!r} {shape} with blocks {(bo, bi)}")
        rows, cols = _positions(index, shape)
        weight = self.read(name, index)
        if rows.size == 0 or cols.size == 0:
            return np.zeros(weight.shape, dtype)
        rb, cb = rows // bo, cols // bi
        r0, c0 = int(rb.min()), int(cb.min())
        scale = self.read(scale_name, (slice(r0, int(rb.max()) + 1), slice(c0, int(cb.max()) + 1)))
        scale = scale.astype(np.float32)[np.ix_(rb - r0, cb - c0)].reshape(weight.shape)  # int axes: size 1
        return (weight.astype(np.float32) * scale).astype(dtype)


def quantize_fp8_blocks(w: np.ndarray, block: Sequence[int] = DEFAULT_BLOCK,
                        dtype=ml_dtypes.float8_e4m3fn) -> tuple[np.ndarray, np.ndarray]:
    """Block-FP8 quantisation, the inverse of `CheckpointReader.read_dequantized`.

    w: [out, in] finite floats. Returns (q [out, in] `dtype`, scale_inv [ceil(out/bo), ceil(in/bi)]
    float32) with scale_inv = max(block amax / finfo(dtype).max, float32 tiny) and
    q = round(w / scale_inv), so that q * scale_inv ~= w per block.
    """
    w = np.asarray(w, np.float32)
    bo, bi = _check_block(block)
    if w.ndim != 2:
        raise ValueError(f"quantize_fp8_blocks takes a 2-D weight, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("quantize_fp8_blocks: weight has non-finite values")
    out, inp = w.shape
    nb_out, nb_in = -(-out // bo), -(-inp // bi)
    padded = np.zeros((nb_out * bo, nb_in * bi), np.float32)
    padded[:out, :inp] = np.abs(w)
    amax = padded.reshape(nb_out, bo, nb_in, bi).max(axis=(1, 3))
    # |w / scale_inv| <= fmax (1 + 2^-22), which rounds to fmax: no overflow to nan / inf.
    scale_inv = np.maximum(amax / np.float32(ml_dtypes.finfo(dtype).max), np.finfo(np.float32).tiny)
    scale = np.repeat(np.repeat(scale_inv, bo, axis=0), bi, axis=1)[:out, :inp]
    q = (w / scale).astype(dtype)
    return q, scale_inv


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    producer: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _specs(tensors: Iterable[TensorSpec]) -> list[_Spec]:
    specs, seen = [], set()
    for name, shape, dtype, producer in tensors:
        if not isinstance(name, str) or name == "__metadata__" or name in seen:
            raise ValueError(f"tensor name {name!r} is not a str, is reserved, or is repeated")
        dtype, shape = np.dtype(dtype), tuple(shape)
        if dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
        if not all(_is_uint(d) for d in shape):
            raise ValueError(f"tensor {name!r}: shape {shape} is not non-negative ints")
        seen.add(name)
        specs.append(_Spec(name, shape, dtype, producer))
    return specs


def _split(specs: list[_Spec], max_shard_bytes: int | None) -> list[list[_Spec]]:
    """Greedy shards in input order; a tensor larger than max_shard_bytes gets a shard of its own."""
    shards, size = [[]], 0
    for spec in specs:
        if max_shard_bytes is not None and shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _file_order(specs: list[_Spec]) -> list[_Spec]:
    """The tensors of one file in layout (and write) order: decreasing itemsize, so every tensor is aligned."""
    return sorted(specs, key=lambda s: -s.dtype.itemsize)


def write_order(tensors: Iterable[TensorSpec], max_shard_bytes: int | None = None) -> list[_Spec]:
    """The tensors in the order `write_checkpoint` calls their producers (`.name`, `.producer`). Processes that
    do not write, but whose producers join collectives, call the producers in this order."""
    return [spec for shard in _split(_specs(tensors), max_shard_bytes) for spec in _file_order(shard)]


def _write_file(file: Path, specs: list[_Spec], metadata: dict[str, str]) -> None:
    """One safetensors file, tensors in `_file_order`."""
    specs = _file_order(specs)
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for spec in specs:
        header[spec.name] = {"dtype": _CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for spec in specs:
            arr = np.asarray(spec.producer())
            if arr.shape != spec.shape or arr.dtype != spec.dtype:
                raise ValueError(f"tensor {spec.name!r}: producer returned {arr.dtype}{list(arr.shape)}, "
                                 f"declared {spec.dtype}{list(spec.shape)}")
            f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
            del arr
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(new: Path, path: Path) -> None:
    """Renames `new` onto `path`; an existing `path` is moved aside first and deleted after."""
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
    if path.exists():
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if old.exists():
            os.rename(old, path)
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(path: str | os.PathLike, tensors: Iterable[TensorSpec], *,
                     max_shard_bytes: int | None = None, metadata: Mapping[str, str] | None = None,
                     extra_files: Mapping[str, bytes | str] | None = None) -> Path:
    """Writes a safetensors checkpoint directory at `path`, atomically, one tensor in memory at a time.

    tensors: (name, shape, dtype, producer) with producer() -> np.ndarray of exactly that shape and
    dtype, called once, when the tensor is written (within a file, larger itemsizes first).
    Without `max_shard_bytes` (or if everything fits in one shard) writes `model.safetensors`;
    otherwise `model-0000i-of-0000n.safetensors` (filled greedily in input order) and
    `model.safetensors.index.json`. Each file's `__metadata__` is {"format": "pt", **metadata}.
    extra_files: {file name: content} written alongside (e.g. config.json).
    Everything goes to a temporary sibling directory that replaces `path` only when complete and
    fsynced; on any error it is removed and `path` is left as it was. An existing `path` is renamed
    to a `.{name}.old-*` sibling just before the new directory takes its place, then deleted.
    """
    path = Path(path)
    specs = _specs(tensors)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    metadata = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"metadata must map str to str, got {metadata!r}")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    shards = _split(specs, max_shard_bytes)
    n = len(shards)
    file_names = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    extra_files = dict(extra_files or {})
    if set(extra_files) & {*file_names, INDEX_FILE}:
        raise ValueError(f"extra_files {sorted(extra_files)} collide with the checkpoint's own files")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for file_name, shard in zip(file_names, shards):
            _write_file(tmp / file_name, shard, metadata)
        if n > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                     "weight_map": {s.name: f for f, shard in zip(file_names, shards) for s in shard}}
            _write_bytes(tmp / INDEX_FILE, json.dumps(index, indent=2).encode())
        for file_name, content in extra_files.items():
            _write_bytes(tmp / file_name, content.encode() if isinstance(content, str) else content)
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
