"""Reading and writing checkpoints tensor by tensor.

:class:`Checkpoint` indexes a Hugging Face model folder (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) from the safetensors headers alone and loads one tensor at a time
(``safe_open``), so merging never holds a whole model. Pickle checkpoints (``*.bin``) are refused
unless the caller opts in. :class:`ShardedWriter` writes the output as safetensors shards plus an
index, into a temporary folder that replaces the destination only once everything is written.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import struct
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Files of a model folder that are not weights and travel with the merged model: the model's
# own (from the base, or the first model without one) and the tokenizer's (from the config's
# tokenizer source, by default the same folder). A tokenizer without tokenizer.json loads from
# its vocabulary files, and a missing one loads silently as a smaller tokenizer: hence every
# vocabulary file name of the tokenizer classes of transformers, plus the files the tokenizer's
# and the model's configs name (aux_files_of).
MODEL_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",  # SentencePiece: Llama, Mistral, Gemma
    "tokenizer.model.v1",  # Mistral's versioned SentencePiece and Tekken vocabularies
    "tokenizer.model.v3",
    "tekken.json",
    "spiece.model",  # T5, ALBERT, XLNet, Pegasus
    "sentencepiece.bpe.model",  # XLM-R, CamemBERT, mBART, NLLB
    "spm.model",  # DeBERTa-v2/v3
    "source.spm",  # Marian
    "target.spm",
    "vocab.txt",  # WordPiece: BERT and its kin
    "vocab.json",  # byte-level BPE: GPT-2, RoBERTa, Qwen2, Whisper
    "merges.txt",
    "qwen.tiktoken",  # tiktoken vocabularies (remote-code tokenizers)
    "tokenizer.tiktoken",
)
# A folder of named chat templates (``additional_chat_templates/NAME.jinja``), copied whole.
TOKENIZER_FOLDERS = ("additional_chat_templates",)
AUX_FILES = MODEL_FILES + TOKENIZER_FILES


def aux_files_of(folder: Path, config_name: str) -> list[str]:
    """The other files of ``folder`` that its config ``config_name`` (``config.json``,
    ``tokenizer_config.json``) names: the ``*_file`` entries that are file names in the folder
    (``vocab_file``, ``spm_file``, ...) and the Python modules of its ``auto_map``
    (``tokenization_x.XTokenizer`` → ``tokenization_x.py``; remote-code models need them, and
    ``repo--module.Class`` entries live in another repository). Unreadable configs name none."""
    try:
        config = json.loads((folder / config_name).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(config, dict):
        return []
    names = [
        v
        for k, v in config.items()
        if k.endswith("_file") and isinstance(v, str) and v and os.sep not in v and "/" not in v
    ]
    auto_map = config.get("auto_map")
    refs = []
    for v in auto_map.values() if isinstance(auto_map, dict) else ():
        refs += v if isinstance(v, list) else [v]
    for ref in refs:
        if isinstance(ref, str) and "--" not in ref and "." in ref:
            names.append(ref.rsplit(".", 1)[0] + ".py")
    # Never a weights file: the output has its own.
    weights = (".safetensors", ".bin", ".pt", ".pth")
    return [n for n in dict.fromkeys(names) if (folder / n).is_file() and not n.endswith(weights)]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked (missing, truncated, pickle not allowed, ...)."""


class Checkpoint:
    """A model folder's tensors: names, shapes and dtypes up front, data on demand.

    Parameters
    ----------
    path : path-like
        A folder with ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (both:
        ``model.safetensors``, as transformers reads it, with a warning), or a single
        ``.safetensors`` file (not one shard of an indexed model). An index must hold every
        tensor where it says; a PEFT adapter folder is refused, naming it.
    allow_pickle : bool
        Read ``pytorch_model.bin`` (pickle) when there is no safetensors file. Off by default:
        unpickling runs code from the file (loaded with ``weights_only=True`` even so;
        memory-mapped unless in torch's legacy, non-zip format).
    """

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._file_of: dict[str, Path] = {}
        self._ranges: dict[str, tuple[int, int]] = {}  # byte offset and length in its file
        self._handles: dict[Path, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._aliases: dict[str, str] = {}  # a name read as another (tie), and its source
        if not self.path.exists():
            raise CheckpointError(
                f"{self.path}: no such model folder or file (Hugging Face model IDs are read "
                "from the local cache only: download the model first)"
            )
        files, weight_map = self._safetensors_files()
        if files:
            for f in files:
                self._index_file(f)
        else:
            self._load_pickle(allow_pickle)
        if weight_map is not None:
            # An index that lists a tensor its shard lacks would otherwise merge a model without
            # it (transformers then initialises it at random).
            index = self.path / "model.safetensors.index.json"
            lacking = [n for n, f in weight_map.items() if self._file_of.get(n) != self.path / f]
            if lacking:
                raise CheckpointError(
                    f"{index}: {len(lacking)} tensors are not in the shards it names (first: "
                    + ", ".join(f"{n} in {weight_map[n]}" for n in lacking[:3])
                    + "): the checkpoint is incomplete or its index is stale"
                )

    def _safetensors_files(self) -> tuple[list[Path], dict[str, str] | None]:
        """The safetensors files to read and, for a sharded model, its index's weight map.

        The order is transformers' (``from_pretrained``): ``model.safetensors``, else the index
        ``model.safetensors.index.json``. A folder with both gets a warning (the index's shards
        are not read). A file given alone must not be one shard of an indexed model."""
        index = self.path.parent / "model.safetensors.index.json"
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                return [], None
            if index.is_file() and self.path.name != "model.safetensors":
                shards = set(read_weight_map(index).values())
                if self.path.name in shards:
                    raise CheckpointError(
                        f"{self.path}: one shard of the sharded model in {self.path.parent} "
                        f"(its index lists {len(shards)} files): give the folder"
                    )
            return [self.path], None
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if single.is_file():
            if index.is_file():
                warnings.warn(
                    f"{self.path} has both model.safetensors and model.safetensors.index.json: "
                    "reading model.safetensors, as transformers loads it (the index's shards are "
                    "ignored; remove the file that is stale)",
                    UserWarning,
                    stacklevel=4,
                )
            return [single], None
        if index.is_file():
            weight_map = read_weight_map(index)
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shards missing: {', '.join(missing)}")
            return files, weight_map
        if (self.path / "adapter_config.json").is_file():
            raise CheckpointError(
                f"{self.path}: a PEFT adapter (adapter_config.json), not a model: merge it into "
                "its base model first (PEFT's merge_and_unload, then save_pretrained) and give "
                "that folder"
            )
        return sorted(self.path.glob("*.safetensors")), None

    def _index_file(self, f: Path) -> None:
        from safetensors import safe_open

        try:  # safetensors reports an unreadable file as "No such file or directory"
            with open(f, "rb"):
                pass
        except OSError as exc:
            raise CheckpointError(f"{f}: cannot be read ({exc.strerror})") from None
        try:
            handle = safe_open(str(f), framework="pt")
            for name in handle.keys():
                sl = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"{f}: tensor {name}: dtype {sl.get_dtype()} not supported"
                    )
                self._shapes[name] = tuple(sl.get_shape())
                self._dtypes[name] = dtype
                self._file_of[name] = f
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for broken files
            raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None
        self._handles[f] = handle
        self._ranges.update(_data_ranges(f))

    def _pickle_files(self) -> list[Path]:
        """The model's pickle weight files: those ``pytorch_model.bin.index.json`` lists, else
        ``pytorch_model.bin``, else the ``pytorch_model*.bin`` shards (never the other ``.bin``
        files of a Trainer folder, such as ``training_args.bin``)."""
        if not self.path.is_dir():
            return []
        index = self.path / "pytorch_model.bin.index.json"
        if index.is_file():
            files = sorted({self.path / f for f in read_weight_map(index).values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shards missing: {', '.join(missing)}")
            return files
        single = self.path / "pytorch_model.bin"
        if single.is_file():
            return [single]
        return sorted(self.path.glob("pytorch_model*.bin"))

    def _load_pickle(self, allow_pickle: bool) -> None:
        bins = self._pickle_files()
        if not bins:
            raise CheckpointError(
                f"{self.path}: no .safetensors (or pytorch_model*.bin) weights found"
            )
        if not allow_pickle:
            raise CheckpointError(
                f"{self.path}: only pickle checkpoints ({bins[0].name}); convert it to "
                "safetensors or pass --allow-pickle (allow_pickle=True)"
            )
        self._pickled = {}
        for f in bins:
            try:
                # Memory-mapped where the format allows it: torch.save's zip format (since
                # torch 1.6), not the legacy one older checkpoints have.
                mmap = zipfile.is_zipfile(f)
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
            except Exception as exc:  # pickle, zip and weights_only errors of every kind
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{f}: not a readable PyTorch state dict ({first})") from None
            if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
            ):
                raise CheckpointError(f"{f}: not a state dict of named tensors")
            self._pickled.update(state)
        for name, t in self._pickled.items():
            self._shapes[name] = tuple(t.shape)
            self._dtypes[name] = t.dtype

    @property
    def names(self) -> list[str]:
        """Tensor names, in file order (then the names :meth:`tie` added)."""
        return list(self._shapes)

    def tie(self, name: str, source: str) -> None:
        """Read tensor ``source`` as ``name`` too: a model whose config ties its output head to
        its input embeddings (``tie_word_embeddings``) stores only the embeddings, which are
        its head (``lm_head.weight`` read from ``model.embed_tokens.weight``)."""
        self._aliases[name] = source
        self._shapes[name] = self._shapes[source]
        self._dtypes[name] = self._dtypes[source]

    @property
    def tied(self) -> dict[str, str]:
        """The names :meth:`tie` added, each with the tensor it is read from."""
        return dict(self._aliases)

    def _source(self, name: str) -> str:
        return self._aliases.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def numel(self, name: str) -> int:
        return math.prod(self._shapes[name])

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU)."""
        name = self._source(name)
        if self._pickled is not None:
            return self._pickled[name]
        try:
            return self._handles[self._file_of[name]].get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self._file_of[name]}: cannot read {name} ({exc})") from None

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """Where ``name``'s bytes lie: its file, their offset in it and their length (None for
        pickle checkpoints). For :class:`ReadAhead`."""
        name = self._source(name)
        if name not in self._ranges:
            return None
        offset, length = self._ranges[name]
        return self._file_of[name], offset, length

    def aux_folder(self) -> Path:
        """The folder of the model's other files (``config.json``, the tokenizer's): the
        checkpoint's folder, or the folder of a checkpoint given as one ``.safetensors`` file."""
        return aux_folder(self.path)


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index (``model.safetensors.index.json``,
    ``pytorch_model.bin.index.json``): tensor name → shard file name in the index's folder.
    Raises CheckpointError, naming the file, for anything else."""
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{index}: not a readable index ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: not a checkpoint index (no weight_map object of tensor names and files)"
        )
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        raise CheckpointError(
            f"{index}: weight_map gives {bad[0]} the file {weight_map[bad[0]]!r}, not a file name"
        )
    return weight_map


def aux_folder(path: Path) -> Path:
    """The folder of a model's files besides its weights: ``path`` itself, or the folder of a
    model given as its weights file."""
    return path if path.is_dir() else path.parent


def _data_ranges(f: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's byte offset and length in safetensors file ``f``, from its header: an
    8-byte little-endian header size, a JSON header whose ``data_offsets`` count from the end of
    the header. ``safe_open`` has already validated the file; a header this cannot read only
    leaves its tensors without read-ahead."""
    try:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        return {
            name: (
                8 + size + int(info["data_offsets"][0]),
                int(info["data_offsets"][1]) - int(info["data_offsets"][0]),
            )
            for name, info in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return {}


class ReadAhead:
    """Reads a streaming merge's next tensors into the page cache while it merges this one.

    A merge that reads its inputs from disk (not yet in the page cache) otherwise waits on one
    page fault after another, on the files of whichever model the kernel is reading, and reads
    at a fraction of what the disk gives to several requests at once (measured on this
    project's virtio disk: one sequential reader 0.3-0.6 GB/s, two to four 1.2-2.1 GB/s).
    ReadAhead asks the kernel to read ahead (``posix_fadvise(POSIX_FADV_WILLNEED)``, which
    queues the reads and returns) for every input of the next step, and of the steps after it
    up to ``window`` more bytes; the merge then finds its bytes cached. Nothing is copied and
    nothing is held: the page cache stays reclaimable. Reading further ahead than the next
    step measured slower: the reads of the step being merged then queue behind the later ones.

    Parameters
    ----------
    steps : sequence of lists of (path, offset, length)
        The byte ranges each step reads, in the order the merge takes them.
    window : int
        Bytes to read ahead beyond the next step (0: only the next step).
    kernels : bool
        Queue the advice for the CPU merge kernels (``_C.side_advise``, the queue of
        ``meldkit/side_writes.h``), whose next parallel pass gives it to one of its threads,
        instead of a thread of its own. Submitting the reads is real work (about 1.4 ms per
        13 MB here); on a machine whose every core merges, a thread of its own competes with
        the merge's threads. Only for merges that run CPU merge kernels after each :meth:`at`.

    Use :meth:`at` as each step starts and :meth:`close` at the end (or ``with``). Where the
    platform has no ``posix_fadvise`` it does nothing.
    """

    def __init__(
        self,
        steps: Sequence[Sequence[tuple[Path, int, int]]],
        window: int,
        *,
        kernels: bool = False,
    ) -> None:
        self._steps = [list(s) for s in steps]
        self._window = max(0, int(window))
        self._ends = [0]  # self._ends[k]: the bytes of steps 0..k-1
        for s in self._steps:
            self._ends.append(self._ends[-1] + sum(length for _, _, length in s))
        self._step = 0
        self._next = 0  # the next step to advise (kernels mode)
        self._ticket = 0  # the last advice queued (kernels mode)
        self._closed = False
        self._cond = threading.Condition()
        self._fds: dict[Path, int] = {}
        self._thread = None
        self._kernels = False
        if not hasattr(os, "posix_fadvise") or not self._steps:
            return
        if kernels:
            from meldkit import _native

            self._kernels = hasattr(_native._C, "side_advise")
        if self._kernels:
            self.at(0)
        else:
            self._thread = threading.Thread(
                target=self._run, name="meldkit-read-ahead", daemon=True
            )
            self._thread.start()

    def at(self, step: int) -> None:
        """The merge starts step ``step``."""
        with self._cond:
            self._step = step
            self._cond.notify()
        if self._kernels:
            from meldkit import _native

            while self._next < len(self._steps) and self._due(self._next):
                for path, offset, length in self._steps[self._next]:
                    fd = self._fd(path)
                    if fd is not None:
                        self._ticket = _native._C.side_advise(fd, offset, length)
                self._next += 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        if self._ticket:  # the kernels may not have run the last advice: its descriptors
            from meldkit import _native

            _native._C.side_jobs_wait(self._ticket)
            self._ticket = 0
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _due(self, k: int) -> bool:
        """Step ``k`` should be read now: it is at most the next one, or lies in the window."""
        return k <= self._step + 1 or self._ends[k + 1] - self._ends[self._step + 2] <= self._window

    def _run(self) -> None:
        k = 0
        while k < len(self._steps):
            with self._cond:
                while not self._closed and not self._due(k):
                    self._cond.wait()
                if self._closed:
                    return
            for path, offset, length in self._steps[k]:
                fd = self._fd(path)
                try:
                    if fd is not None:
                        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass  # advice only: the merge reads (and reports errors) as before
            k += 1

    def _fd(self, path: Path) -> int | None:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError:
                return None  # advice only: the merge reports an unreadable file itself
        return fd


def parse_size(text: str | int) -> int:
    """Bytes of a shard size: an int, a number (``1e9``), or a number with a unit.

    ``KB``, ``MB``, ``GB``, ``TB`` and ``K``, ``M``, ``G``, ``T`` are powers of 1000; a bare
    ``B`` means billions, as in mergekit's ``--out-shard-size`` (its ``5B`` default, its README's
    ``1B`` tip), not bytes. Case does not matter. Raises ValueError, with examples, for anything
    else or a size that is not positive.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        s = str(text).strip().upper().replace(" ", "")
        units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "K": 1e3, "M": 1e6, "G": 1e9}
        units |= {"T": 1e12, "B": 1e9}
        scale = 1.0
        for unit in sorted(units, key=len, reverse=True):
            if s.endswith(unit):
                s, scale = s[: -len(unit)], units[unit]
                break
        try:
            value = float(s)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(
                f"not a size: {text!r} (examples: 5GB, 500MB, 1B = 10^9 as in mergekit, 1000000000)"
            )
        size = int(min(value * scale, 2**62))  # larger than any file: one shard
    if size <= 0:
        raise ValueError(f"a size must be at least 1 byte, got {text!r}")
    return size


SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def _safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """The header of a safetensors file holding ``entries`` (name, dtype, shape) back to back in
    that order: the little-endian u64 length, then the JSON, padded with spaces to 8 bytes."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        meta[name] = {
            "dtype": SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes tensors as safetensors shards into a temporary folder beside ``out_dir``;
    :meth:`commit` adds the index and auxiliary files and renames it into place.

    The shard plan (which tensor goes to which file, at which offset) is fixed up front from the
    tensors' names, dtypes and shapes, so each shard's header is written when the shard is
    opened and each tensor's bytes go straight to their place as soon as it is added. Nothing
    is buffered: the writer holds no shard in memory. :meth:`add` returns a future that is done
    when the tensor's bytes are in the file (the caller may then reuse its memory). Where the
    writes run:

    - ``background=True``: on one worker thread, overlapping the caller's work (for a machine
      with a core to spare, or a merge on the GPU);
    - ``kernel_writes=True`` (and no background thread): queued for the CPU merge kernels
      (``meldkit/side_writes.h``), whose next parallel pass runs them on one of its threads
      while the other threads merge and take that thread's share, so the write overlaps the
      next tensor's merge without a thread competing with the merge's threads; a write that no
      kernel has run by the time its result is needed runs on the caller's thread;
    - otherwise in :meth:`add`, on the caller's thread.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        shard_size: int,
        *,
        background: bool = True,
        kernel_writes: bool = False,
    ):
        # The folder out_dir names ('.', a symlink): replaced by the output at commit, which
        # renames the temporary folder beside it.
        self.out_dir = Path(out_dir).resolve()
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise CheckpointError(f"{self.out_dir}: is a file, not a folder")
        if self.out_dir.exists() and any(self.out_dir.iterdir()):
            raise CheckpointError(f"{self.out_dir}: exists and is not empty")
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        self.total_size = 0
        for name, dtype, shape in plan:
            if dtype not in SAFETENSORS_NAMES:
                raise CheckpointError(f"{name}: dtype {dtype} cannot be saved as safetensors")
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape)))
            size += nbytes
            self.total_size += nbytes
        n = len(shards)
        self.file_of: dict[str, str] = {}
        # name -> (shard, dtype, shape, file offset of its bytes)
        self._slot: dict[str, tuple[int, torch.dtype, tuple[int, ...], int]] = {}
        self._headers: list[bytes] = []
        self._fnames: list[str] = []
        self._left: list[int] = []  # tensors of each shard not yet written
        self._fds: dict[int, int] = {}
        self._added: set[str] = set()
        for i, entries in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header = _safetensors_header(entries)
            self._headers.append(header)
            self._fnames.append(fname)
            self._left.append(len(entries))
            offset = len(header)
            for name, dtype, shape in entries:
                self.file_of[name] = fname
                self._slot[name] = (i, dtype, shape, offset)
                offset += math.prod(shape) * dtype.itemsize
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(self.out_dir)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent))
        (self.tmp / _PARTIAL).write_text(_partial_marker())
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="meldkit-writer") if background else None
        )
        from meldkit import _native

        # Without the compiled core there are no kernels to run them: written in add().
        self._kernel_writes = bool(kernel_writes) and not background and _native._C is not None
        self._futures: list[Future | _KernelWrite] = []

    def add(self, name: str, tensor: torch.Tensor) -> Future:
        """Write one tensor (of the planned dtype and shape) into its shard.

        Returns a future, done once the bytes are written; the tensor must not change until
        then. A failed earlier write is raised here (or by :meth:`commit`).
        """
        if name not in self._slot:
            raise KeyError(f"{name}: not in the writer's plan")
        if name in self._added:
            raise ValueError(f"{name}: written twice")
        _, dtype, shape, _ = self._slot[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name}: planned as {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        for f in [f for f in self._futures if f.done()]:
            self._futures.remove(f)
            f.result()  # raises a failed write's error
        self._added.add(name)
        tensor = tensor.detach().cpu().contiguous()
        if self._kernel_writes:
            future = self._queue(name, tensor)
            self._futures.append(future)
            return future
        if self._pool is None:
            future: Future = Future()
            future.set_result(self._write(name, tensor))
        else:
            future = self._pool.submit(self._write, name, tensor)
            self._futures.append(future)
        return future

    def _fd(self, shard: int) -> int:
        """The shard's descriptor, created with its header on first use."""
        fd = self._fds.get(shard)
        if fd is None:
            path = self.tmp / self._fnames[shard]
            fd = self._fds[shard] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(fd, memoryview(self._headers[shard]), 0)
        return fd

    def _queue(self, name: str, tensor: torch.Tensor) -> _KernelWrite:
        from meldkit import _native

        shard, _, _, offset = self._slot[name]
        fd = self._fd(shard)
        nbytes = tensor.numel() * tensor.element_size()
        ticket = _native._C.side_write(fd, offset, tensor.data_ptr(), nbytes)
        write = _KernelWrite(ticket, tensor)
        self._left[shard] -= 1
        if self._left[shard] == 0:  # the shard's last write, then its descriptor can close
            write.result()
            os.close(self._fds.pop(shard))
        return write

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        shard, _, _, offset = self._slot[name]
        fd = self._fd(shard)
        if tensor.numel():
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(fd, memoryview(data).cast("B"), offset)
        self._left[shard] -= 1
        if self._left[shard] == 0:
            os.close(self._fds.pop(shard))

    def _drain(self) -> None:
        """Wait for every write; raise the first failure."""
        futures, self._futures = self._futures, []
        errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e

    def commit(
        self,
        aux_from: Path | None,
        tokenizer_from: Path | None = None,
        card: str | None = None,
        finish: Callable[[Path], None] | None = None,
        fsync: bool = False,
    ) -> Path:
        """Wait for the writes, write the index and auxiliary files, then move the folder into
        place. The model's files (``MODEL_FILES``, and the files its ``config.json`` names: see
        :func:`aux_files_of`) come from ``aux_from``, the tokenizer's (``TOKENIZER_FILES``,
        ``TOKENIZER_FOLDERS``, and the files its ``tokenizer_config.json`` names) from
        ``tokenizer_from`` (default: ``aux_from``); ``card`` becomes ``README.md``. ``finish``
        is called with the temporary folder once everything is in it, before the move: edits
        of the copied files (config.json's dtype, the chat template) land with the weights or
        not at all. ``fsync``: flush every file and the folder to the disk before the move, and
        the parent folder after it, so that a power loss or a system crash after the return
        cannot leave a complete-looking folder with empty shards (the move alone guards against
        an interrupted process only)."""
        self._drain()
        unwritten = [n for n in self._slot if n not in self._added]
        if unwritten:
            raise RuntimeError(f"tensors never written: {unwritten[:5]}")
        self._close()
        if len(self._headers) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.file_of}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        tokenizer_from = tokenizer_from if tokenizer_from is not None else aux_from
        for folder, names, config in (
            (aux_from, MODEL_FILES, "config.json"),
            (tokenizer_from, TOKENIZER_FILES, "tokenizer_config.json"),
        ):
            if folder is None:
                continue
            for name in dict.fromkeys([*names, *aux_files_of(folder, config)]):
                src = folder / name
                if src.is_file():
                    shutil.copy2(src, self.tmp / name)
        for name in TOKENIZER_FOLDERS if tokenizer_from is not None else ():
            src = tokenizer_from / name
            if src.is_dir():
                shutil.copytree(src, self.tmp / name)
        if card is not None:
            (self.tmp / "README.md").write_text(card)
        if finish is not None:
            finish(self.tmp)
        if self.out_dir.exists():
            self.out_dir.rmdir()  # empty (checked in __init__)
        (self.tmp / _PARTIAL).unlink()
        # mkdtemp made the folder private (0700); the output gets a new folder's mode, as
        # mkdir would give it: 0777 less the umask.
        os.chmod(self.tmp, 0o777 & ~_umask())
        if fsync:  # the files, then the folders, deepest first
            entries = sorted(self.tmp.rglob("*"))
            for path in entries:
                if path.is_file():
                    _fsync_path(path)
            for path in [*reversed(entries), self.tmp]:
                if path.is_dir():
                    _fsync_path(path, folder=True)
        os.replace(self.tmp, self.out_dir)
        if fsync:
            try:  # the output is in place: a failure here must not report the merge failed
                _fsync_path(self.out_dir.parent, folder=True)
            except OSError as exc:
                warnings.warn(
                    f"the merged model is in {self.out_dir}, but its folder's entry could not "
                    f"be flushed to the disk: {exc}",
                    UserWarning,
                    stacklevel=2,
                )
        return self.out_dir

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for f in self._futures:  # queued writes still point at their descriptors
            if isinstance(f, _KernelWrite):
                f.exception()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        """Stop writing and remove the temporary folder (an interrupted merge leaves nothing
        behind)."""
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# In the temporary folder of a merge in progress: "PID HOST START" of the process writing it
# (START: its start time, /proc/PID/stat's field 22, "-" where unknown), so that a PID the
# system has given to another process since does not keep a killed merge's folder forever.
_PARTIAL = ".meldkit-partial"


def _fsync_path(path: Path, folder: bool = False) -> None:
    """Flush a file's or a folder's data and metadata to the disk; an error names the path.
    Folders on file systems that cannot flush them (EINVAL, ENOTSUP: some FUSE and network
    mounts) are skipped, as atomic-write libraries do."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if folder and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            return
        raise OSError(exc.errno, f"cannot flush {path} to the disk: {exc.strerror}") from None


def _start_time(pid: int) -> str | None:
    """Process ``pid``'s start time (clock ticks after boot), None where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _partial_marker() -> str:
    return f"{os.getpid()} {socket.gethostname()} {_start_time(os.getpid()) or '-'}\n"


def _is_abandoned(marker: str) -> int | None:
    """The PID of the merge that wrote ``marker`` if that merge is gone (killed: no process
    with that PID on this host, or one started at another time, the PID reused), else None (a
    live merge, another host's, or a marker this cannot read)."""
    fields = marker.split()
    try:
        pid, host = int(fields[0]), fields[1]
    except (ValueError, IndexError):
        return None
    started = fields[2] if len(fields) > 2 and fields[2] != "-" else None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except PermissionError:  # another user's process: alive, check its start time below
        pass
    except OSError:
        return None
    now = _start_time(pid)
    return pid if started is not None and now is not None and now != started else None


def _umask() -> int:
    """The process's umask, read from /proc (setting and restoring it, the portable way, is
    process-wide and would race with files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _remove_abandoned(out_dir: Path) -> None:
    """Remove the temporary folders that merges killed without a chance to clean up (SIGKILL,
    the OOM killer, a power cut) for the same output: the hidden ``.NAME.*`` folders of its
    parent with a merge's marker whose process is gone (:func:`_is_abandoned`), with a warning
    naming each folder, its merge's process and the space freed. A folder without the marker,
    of a live merge, or of another host is left alone; so are other outputs' folders (a merge
    in another PID namespace on a shared volume would look dead from here)."""
    import warnings

    removed = []
    for folder in sorted(out_dir.parent.glob(f".{out_dir.name}.*")):
        try:
            marker = (folder / _PARTIAL).read_text()
        except OSError:
            continue
        pid = _is_abandoned(marker)
        if pid is None:
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(f"{folder} (process {pid}, {size / 1e6:.1f} MB)")
    if removed:
        warnings.warn(
            f"removed {len(removed)} partial output(s) of merges that were killed before they "
            f"could clean up: {'; '.join(removed)}",
            stacklevel=3,
        )


class _KernelWrite:
    """A write queued for the CPU merge kernels (``_C.side_write``), with the future methods the
    writer and the merge engine use; it keeps the tensor whose memory it writes alive."""

    def __init__(self, ticket: int, tensor: torch.Tensor) -> None:
        self._ticket, self._tensor = ticket, tensor
        self._error: BaseException | None = None
        self._finished = False

    def done(self) -> bool:
        from meldkit import _native

        return self._finished or _native._C.side_writes_done() >= self._ticket

    def result(self) -> None:
        """Waits for the write (running queued writes on this thread if no kernel has); raises
        its error."""
        from meldkit import _native

        if not self._finished:
            try:
                _native._C.side_write_wait(self._ticket)
            except RuntimeError as exc:
                self._error = OSError(f"writing a merged tensor failed: {exc}")
            self._finished, self._tensor = True, None
        if self._error is not None:
            raise self._error

    def exception(self) -> BaseException | None:
        try:
            self.result()
        except OSError as exc:
            return exc
        return None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (one call writes at most about 2 GiB)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
