"""Dataset preprocessing (SPEC 8): jsonl text -> Megatron-Core's MMAP indexed dataset.

For every JSON key, `{output_prefix}_{key}_document.bin` holds the token ids of all
documents back to back, and `.idx` holds Megatron's index: the `MMIDIDX\\0\\0` header,
version 1, the dtype code, the sequence and document counts, then every sequence's
length (int32) and byte offset (int64), then the document indices (int64). Documents
are tokenized as Megatron's `tools/preprocess_data.py` does: a string value is one
sequence, a list of strings is one sequence per non-empty string, no special tokens are
added, the end-of-document token (with `append_eod`) extends the last sequence, and a
document with no tokens still counts as a document.

Megatron-Core's `IndexedDatasetBuilder` is not used to write: it keeps every sequence
length and document index in Python lists (about 50 bytes per document while adding,
over 100 at `finalize`, measured with megatron-core 0.16), and importing it costs about
6 s and 370 MB (torch plus megatron.core). This writer spills the index to disk as it
goes, so memory stays flat however large the input; the tests check that its files
equal the builder's byte for byte and read them back with Megatron's `IndexedDataset`.

Work flows in blocks of about CHUNK_BYTES of whole lines: the main process reads them,
workers tokenize them, and the main process appends the results in input order, with
at most two blocks per worker in flight. Output bytes therefore do not depend on the
number of workers. Under mpiexec each rank does this for its share of the input, and
rank 0 appends the other ranks' parts (`_run_mpi`): the bytes do not depend on the number
of ranks either.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
import shutil
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runner import log
from runner.durable import DurableFile, check_no_overlap
from runner.errors import AutotransError, ConfigError, FormatError, cause, shown
from runner.launch import launched_size


SECTION = "preprocess_data"
CHUNK_BYTES = 1 << 20  # input bytes per unit of work: amortises IPC, bounds memory
_IN_FLIGHT_PER_WORKER = 2  # blocks queued per worker: keeps workers busy, memory bounded
_REPORTED_BAD_LINES = 10  # skipped lines named one by one; the rest are only counted

# Megatron-Core's index format (megatron/core/datasets/indexed_dataset.py)
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents
_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}  # Megatron's DType enum values
_SMALL_VOCAB = 65500  # Megatron's DType.optimal_dtype: uint16 below this vocab size, else int32


# ---------------------------------------------------------------------------- config


def _nonempty_string(value: object) -> str:
    if isinstance(value, str) and value:
        return value
    raise ValueError


def _optional_string(value: object) -> str | None:
    return None if value is None else _nonempty_string(value)


def _json_keys(value: object) -> tuple[str, ...]:
    # a string is split on whitespace, as the seed's JSON_KEYS="key0 key1" environment variable
    keys = value.split() if isinstance(value, str) else value
    if isinstance(keys, Sequence) and keys and all(isinstance(k, str) and k and "/" not in k for k in keys) and len(set(keys)) == len(keys):
        return tuple(keys)
    raise ValueError


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError


def _bad_line_policy(value: object) -> str:
    if value in ("fail", "skip"):
        return str(value)
    raise ValueError


_REQUIRED = object()


@dataclass(frozen=True)
class KeySpec:
    """One key of the `preprocess_data` section."""

    expected: str  # what the value must be, as error messages say it
    check: Callable[[object], object]  # returns the value normalised, or raises ValueError
    default: object = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


PREPROCESS_KEYS: dict[str, KeySpec] = {
    "input": KeySpec("a jsonl file or a glob (a string)", _nonempty_string),
    "json_keys": KeySpec("a list of distinct JSON keys without '/' (or one string of keys separated by spaces)", _json_keys, ("text",)),
    "tokenizer": KeySpec("the path of a tokenizers tokenizer.json or a sentencepiece tokenizer.model (a string)", _nonempty_string),
    "workers": KeySpec("an integer >= 1 (tokenizing processes)", _positive_int, 1),
    "append_eod": KeySpec("true or false", _flag, False),
    "eod_token": KeySpec("a token of the tokenizer (a string), or null for its end-of-sequence token", _optional_string, None),
    "on_bad_line": KeySpec("fail or skip", _bad_line_policy, "fail"),
    "output_prefix": KeySpec("a path prefix (a string)", _nonempty_string),
}


@dataclass(frozen=True)
class PreprocessConfig:
    """A validated `preprocess_data` section (see PREPROCESS_KEYS for meanings and defaults)."""

    input: str
    json_keys: tuple[str, ...]
    tokenizer: str
    workers: int
    append_eod: bool
    eod_token: str | None
    on_bad_line: str
    output_prefix: str


def validate_section(raw: Mapping) -> PreprocessConfig:
    """Check a `preprocess_data` section (a dict or an OmegaConf DictConfig) and fill in defaults.

    Raises ConfigError naming `preprocess_data.<key>` for an unknown key (with the closest
    known one), a value of the wrong type, or a missing required key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{SECTION}: expected a mapping of keys ({', '.join(PREPROCESS_KEYS)}), got {_json_type(raw)}")
    for key in raw:
        if str(key) not in PREPROCESS_KEYS:
            close = difflib.get_close_matches(str(key), PREPROCESS_KEYS, n=1)
            hint = f"did you mean {SECTION}.{close[0]}?" if close else f"known keys: {', '.join(PREPROCESS_KEYS)}"
            raise ConfigError(f"{SECTION}.{key}: unknown key; {hint}")
    values = {}
    for key, spec in PREPROCESS_KEYS.items():
        if key not in raw:
            if spec.required:
                raise ConfigError(f"{SECTION}.{key}: required key is missing; expected {spec.expected}")
            values[key] = spec.default
            continue
        try:
            values[key] = spec.check(raw[key])
        except ValueError:
            raise ConfigError(f"{SECTION}.{key}: expected {spec.expected}, got {raw[key]!r}") from None
    return PreprocessConfig(**values)


# ---------------------------------------------------------------------------- inputs


def _natural_key(path: Path) -> list:
    # part_2 before part_10: split into text and numbers, compared as such
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", str(path)))]


def _input_files(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        raise ConfigError(f"{SECTION}.input: {pattern} is a folder; give a jsonl file or a glob such as {pattern}/*.jsonl")
    files = sorted((Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p)), key=_natural_key)
    if not files:
        what = "no file matches" if any(c in pattern for c in "*?[") else "no such file:"
        raise FormatError(f"{SECTION}.input: {what} {shown(pattern)}")
    return files


@dataclass(frozen=True)
class _Span:
    """Whole lines of one input file, bytes [start, end): one rank's share of that file."""

    file_no: int
    start: int
    end: int


@dataclass(frozen=True)
class _Block:
    """Whole lines of one input file: the unit of work sent to a worker."""

    file_no: int
    span_start: int  # byte offset of the block's span in its file (line numbers count from there)
    first_line: int  # 1-based line number of the block's first line, counted from span_start
    data: bytes


def _line_start_at_or_after(path: Path, offset: int, size: int) -> int:
    """The first offset >= `offset` where a line of the file begins (or the file's size)."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    with open(path, "rb") as f:
        f.seek(offset - 1)
        while data := f.read(1 << 16):
            newline = data.find(b"\n")
            if newline >= 0:
                return f.tell() - len(data) + newline + 1
    return size


def _spans(files: Sequence[Path], sizes: Sequence[int], part: int, parts: int) -> list[_Span]:
    """Part `part` of `parts` of the input, cut at line starts into shares of about equal
    bytes; the files are taken end to end, so a share may cover several files or none."""
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()

    def cut(k: int) -> int:  # the k-th cut, moved forward to the next line start
        at = starts[-1] * k // parts
        if at >= starts[-1]:
            return at
        f = max(i for i in range(len(files)) if starts[i] <= at)
        return starts[f] + _line_start_at_or_after(files[f], at - starts[f], sizes[f])

    lo, hi = cut(part), cut(part + 1)
    return [_Span(f, max(lo, starts[f]) - starts[f], min(hi, starts[f + 1]) - starts[f])
            for f in range(len(files)) if max(lo, starts[f]) < min(hi, starts[f + 1])]


def _blocks(files: Sequence[Path], spans: Sequence[_Span]) -> Iterator[_Block]:
    for span in spans:
        path = files[span.file_no]
        try:
            with open(path, "rb") as f:
                f.seek(span.start)
                line, pos = 1, span.start
                while pos < span.end and (data := f.read(min(CHUNK_BYTES, span.end - pos))):
                    if not data.endswith(b"\n") and pos + len(data) < span.end:
                        data += f.readline()  # finish the last line: no line spans two blocks
                    yield _Block(span.file_no, span.start, line, data)
                    line += data.count(b"\n")
                    pos += len(data)
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror}") from None


def _lines_before(path: Path, offset: int) -> int:
    """How many lines of the file end before byte `offset` (to name a line of a later span)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0 and (data := f.read(min(CHUNK_BYTES, offset))):
            count += data.count(b"\n")
            offset -= len(data)
    return count


# ---------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Tokenizer:
    """A tokenizer file loaded: text -> ids without special tokens, as Megatron tokenizes."""

    path: Path
    encode: Callable[[str], list[int]]
    vocab_size: int
    token_id: Callable[[str], int | None]
    eos_id: int | None  # the tokenizer's own end-of-sequence token, if it names one


def _tokenizer_file(given: str) -> Path:
    path = Path(given).expanduser()
    if path.is_dir():  # an HF model folder: its tokenizer file
        path = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()), path / "tokenizer.json")
    if not path.is_file():
        raise FormatError(f"{SECTION}.tokenizer: no such file: {shown(path)}")
    return path


def _load_tokenizer(path: Path) -> _Tokenizer:
    return _load_hf_tokenizer(path) if path.suffix == ".json" else _load_sentencepiece(path)


def _load_hf_tokenizer(path: Path) -> _Tokenizer:
    # one thread per process, `workers` being the parallelism: the library's own threads
    # only contend with it (measured here: 1.5x slower alone, 3x with two worker processes)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception for a bad file
        raise FormatError(f"{path}: not a readable tokenizers tokenizer.json ({cause(e)})") from None
    eos = _hf_eos_token(path)
    return _Tokenizer(
        path=path,
        encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        token_id=tok.token_to_id,
        eos_id=tok.token_to_id(eos) if eos else None,
    )


def _hf_eos_token(path: Path) -> str | None:
    """The `eos_token` of the tokenizer_config.json beside a tokenizer.json, as HF reads it."""
    config_path = path.with_name("tokenizer_config.json")
    if not config_path.is_file():
        return None
    try:
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError) as e:
        raise FormatError(f"{config_path}: not a readable tokenizer config ({cause(e)})") from None
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _load_sentencepiece(path: Path) -> _Tokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise FormatError(f"{path}: not a readable sentencepiece model ({cause(e)})") from None

    def token_id(token: str) -> int | None:
        i = sp.piece_to_id(token)
        return None if i == sp.unk_id() and token != sp.id_to_piece(i) else i

    return _Tokenizer(
        path=path,
        encode=sp.encode_as_ids,
        vocab_size=sp.get_piece_size(),
        token_id=token_id,
        eos_id=sp.eos_id() if sp.eos_id() >= 0 else None,
    )


def _eod_id(tok: _Tokenizer, eod_token: str | None) -> int:
    if eod_token is not None:
        i = tok.token_id(eod_token)
        if i is None:
            raise ConfigError(f"{SECTION}.eod_token: {eod_token!r} is not a token of {tok.path}")
        return i
    if tok.eos_id is None:
        raise ConfigError(f"{SECTION}.append_eod: {tok.path} names no end-of-sequence token; set {SECTION}.eod_token")
    return tok.eos_id


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype of the token ids, chosen from the vocabulary size as Megatron does."""
    return np.dtype(np.uint16 if vocab_size < _SMALL_VOCAB else np.int32)


# ---------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class _EncodeSpec:
    """What a worker needs to tokenize blocks (small and picklable)."""

    tokenizer: Path
    json_keys: tuple[str, ...]
    eod: int | None  # appended to every document with tokens, when set
    dtype: str


@dataclass(frozen=True)
class _KeyPart:
    """One key's share of a block, ready to append to that key's dataset."""

    tokens: np.ndarray  # token ids, in the output dtype
    sequence_lengths: np.ndarray  # int32, one per non-empty sequence
    sequences_per_document: np.ndarray  # int64, one per document


@dataclass(frozen=True)
class _Encoded:
    """A block tokenized: its documents per key, and the lines that could not be read."""

    file_no: int
    span_start: int  # the bad lines' numbers count from this byte of the file
    nbytes: int
    documents: int
    parts: tuple[_KeyPart, ...]  # in json_keys order
    bad_lines: tuple[tuple[int, str], ...]  # (line number, reason)


class _BadLine(Exception):
    pass


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _sentences(line: bytes, keys: tuple[str, ...]) -> list[list[str]]:
    """Each key's text as a list of sequences: a string is one, a list of strings is several."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadLine(f"invalid JSON ({e.msg}: column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise _BadLine(f"not UTF-8 ({e.reason} at byte {e.start + 1})") from None
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {_json_type(record)}")
    texts = []
    for key in keys:
        if key not in record:
            raise _BadLine(f"no key {key!r}")
        value = record[key]
        sentences = [value] if isinstance(value, str) else value
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise _BadLine(f"key {key!r} holds {_json_type(value)}; expected a string or a list of strings")
        try:
            for s in sentences:
                s.encode("utf-8")  # valid JSON may escape lone surrogates, which no tokenizer takes
        except UnicodeEncodeError as e:
            raise _BadLine(f"key {key!r} holds a string that is not valid Unicode ({e.reason})") from None
        texts.append(sentences)
    return texts


def _encode_documents(documents: list[list[str]], encode: Callable[[str], list[int]], eod: int | None, dtype: str) -> _KeyPart:
    tokens: list[int] = []
    lengths: list[int] = []
    per_document = np.empty(len(documents), np.int64)
    for d, sentences in enumerate(documents):
        first = len(lengths)
        for sentence in sentences:
            ids = encode(sentence)
            if ids:
                tokens.extend(ids)
                lengths.append(len(ids))
        if eod is not None and len(lengths) > first:
            tokens.append(eod)
            lengths[-1] += 1
        per_document[d] = len(lengths) - first
    return _KeyPart(np.array(tokens, dtype), np.array(lengths, np.int32), per_document)


def _encode_block(spec: _EncodeSpec, encode: Callable[[str], list[int]], block: _Block) -> _Encoded:
    records: list[list[list[str]]] = []
    bad: list[tuple[int, str]] = []
    for i, line in enumerate(block.data.split(b"\n")):
        if not line.strip():
            continue  # blank lines (a trailing newline, separators) are not documents
        try:
            records.append(_sentences(line, spec.json_keys))
        except _BadLine as e:
            bad.append((block.first_line + i, str(e)))
    parts = tuple(_encode_documents([r[k] for r in records], encode, spec.eod, spec.dtype) for k in range(len(spec.json_keys)))
    return _Encoded(block.file_no, block.span_start, len(block.data), len(records), parts, tuple(bad))


_worker_tokenizer: _Tokenizer | None = None  # loaded by a worker process on its first block


def _encode_in_worker(spec: _EncodeSpec, block: _Block) -> _Encoded:
    # loaded here rather than in a Pool initializer, whose failures make the pool respawn forever
    global _worker_tokenizer
    if _worker_tokenizer is None:
        _worker_tokenizer = _load_tokenizer(spec.tokenizer)
    return _encode_block(spec, _worker_tokenizer.encode, block)


def _encoded_blocks(spec: _EncodeSpec, encode: Callable[[str], list[int]], blocks: Iterator[_Block], workers: int) -> Iterator[_Encoded]:
    """Tokenized blocks in input order, whatever the number of workers."""
    if workers == 1:
        for block in blocks:
            yield _encode_block(spec, encode, block)
        return
    import multiprocessing

    # spawn: workers start clean, inheriting no threads (tqdm's, the tokenizers') or locks
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque = deque()
        for block in blocks:
            pending.append(pool.apply_async(_encode_in_worker, (spec, block)))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------- output


class _DatasetWriter:
    """Writes `{prefix}.bin` and `{prefix}.idx` as blocks arrive, under temporary names.

    Sequence lengths go straight into the index file after a header placeholder, document
    indices into a side file; `finish` appends the sequence pointers (computed from the
    lengths read back in chunks) and the document indices, then writes the header. Under
    MPI, every rank but 0 keeps its share in such temporary files (a part) and rank 0
    appends the parts to its own writer, chunk by chunk (`read_part`, `absorb`)."""

    _CHUNK = 1 << 16  # sequences per chunk when computing pointers
    # a part's streams, in the order they are absorbed: tokens (.bin), the document ends
    # (shifted by the sequences before the part), then the sequence lengths
    PART_STREAMS = ("tokens", "documents", "sequences")

    def __init__(self, prefix: str, dtype: np.dtype, tag: str = ""):
        self.bin_path, self.idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
        self.dtype = dtype
        self.sequences = self.documents = self.tokens = 0
        self._outs = [DurableFile(self.bin_path, tag), DurableFile(self.idx_path, tag), DurableFile(self.idx_path, tag + ".docs")]
        try:
            for out in self._outs:
                out.open()
        except OSError:
            self.discard()
            raise
        self._bin, self._idx, self._docs = (out.stream() for out in self._outs)
        self._idx.write(bytes(_INDEX_HEADER.size))
        self._docs.write(np.zeros(1, np.int64).tobytes())  # the document indices start at 0

    def append(self, part: _KeyPart) -> None:
        self._bin.write(part.tokens.data)
        self._idx.write(part.sequence_lengths.data)
        self._docs.write((self.sequences + np.cumsum(part.sequences_per_document)).data)
        self.tokens += len(part.tokens)
        self.sequences += len(part.sequence_lengths)
        self.documents += len(part.sequences_per_document)

    def part_sizes(self) -> tuple[int, int, int]:
        """The byte size of each of PART_STREAMS, once everything is appended."""
        return self.tokens * self.dtype.itemsize, 8 * self.documents, 4 * self.sequences

    def read_part(self, stream: int, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of one of PART_STREAMS."""
        f, skip = ((self._bin, 0), (self._docs, 8), (self._idx, _INDEX_HEADER.size))[stream]
        f.flush()
        return os.pread(f.fileno(), size, skip + offset)

    def absorb(self, stream: int, data: bytes) -> None:
        """Append a chunk of another writer's part; its streams come whole, in PART_STREAMS order."""
        if stream == 0:
            self._bin.write(data)
            self.tokens += len(data) // self.dtype.itemsize
        elif stream == 1:
            ends = np.frombuffer(data, np.int64)
            self._docs.write((ends + self.sequences).data)
            self.documents += len(ends)
        else:
            self._idx.write(data)
            self.sequences += len(data) // 4

    def finish(self) -> list[Path]:
        """Complete the index, make both files durable, and give them their final names."""
        self._idx.flush()
        self._append_pointers()
        self._docs.seek(0)
        shutil.copyfileobj(self._docs, self._idx)
        self._idx.seek(0)
        code = _DTYPE_CODES[self.dtype]
        self._idx.write(_INDEX_HEADER.pack(_INDEX_MAGIC, _INDEX_VERSION, code, self.sequences, self.documents + 1))
        self._outs[0].commit()  # .bin first: a final .idx means both are complete
        self._outs[1].commit()
        self._outs[2].discard()
        return [self.bin_path, self.idx_path]

    def _append_pointers(self) -> None:
        fd, offset = self._idx.fileno(), 0
        for start in range(0, self.sequences, self._CHUNK):
            count = min(self._CHUNK, self.sequences - start)
            raw = os.pread(fd, 4 * count, _INDEX_HEADER.size + 4 * start)
            nbytes = np.frombuffer(raw, np.int32).astype(np.int64) * self.dtype.itemsize
            ends = offset + np.cumsum(nbytes)
            self._idx.write((ends - nbytes).data)
            offset = int(ends[-1])

    def discard(self) -> None:
        """Close and remove the temporary files (after a failure, or a part once absorbed)."""
        for out in self._outs:
            out.discard()


@contextmanager
def _writers(cfg: PreprocessConfig, dtype: np.dtype, tag: str = "") -> Iterator[list[_DatasetWriter]]:
    """One writer per JSON key; on any failure their temporary files are removed."""
    prefix = os.path.expanduser(cfg.output_prefix)
    writers: list[_DatasetWriter] = []
    try:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        for key in cfg.json_keys:
            writers.append(_DatasetWriter(f"{prefix}_{key}_document", dtype, tag))
        yield writers
    except BaseException as e:
        for writer in writers:
            writer.discard()
        if isinstance(e, OSError):
            raise AutotransError(f"{e.filename or prefix}: cannot write: {e.strerror}") from None
        raise


# ---------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class _Input:
    """The input files and the tokenizer, checked."""

    files: list[Path]
    sizes: list[int]
    dtype: np.dtype
    spec: _EncodeSpec
    encode: Callable[[str], list[int]]


def _open_input(cfg: PreprocessConfig) -> _Input:
    files = _input_files(cfg.input)
    tok_file = _tokenizer_file(cfg.tokenizer)
    # an output that is an input (a link to it, or a glob that matched an earlier output) would replace it
    outputs = [Path(f"{cfg.output_prefix}_{key}_document{ext}") for key in cfg.json_keys for ext in (".bin", ".idx")]
    check_no_overlap(outputs, [*files, tok_file])
    tok = _load_tokenizer(tok_file)
    dtype = token_dtype(tok.vocab_size)
    spec = _EncodeSpec(tok.path, cfg.json_keys, _eod_id(tok, cfg.eod_token) if cfg.append_eod else None, dtype.name)
    try:
        sizes = [os.path.getsize(p) for p in files]
    except OSError as e:
        raise AutotransError(f"{e.filename}: cannot read: {e.strerror}") from None
    return _Input(files, sizes, dtype, spec, tok.encode)


@dataclass
class _Share:
    """What one process tokenized: counts, and the first bad lines skipped (file, line, reason)."""

    documents: int = 0
    nbytes: int = 0
    skipped: int = 0
    reported: list[tuple[str, int, str]] = field(default_factory=list)


def _tokenize_share(writers: list[_DatasetWriter], inp: _Input, spans: list[_Span], cfg: PreprocessConfig, bar_desc: str | None,
                    alive: Callable[[], object] = lambda: None) -> _Share:
    """Stream this process's spans through the tokenizer into the writers, in input order.
    A bad line fails the job (on_bad_line=fail) or is counted, the first few kept to report.
    `alive` is called after each block (under MPI: tell the other ranks this one progresses)."""
    from tqdm import tqdm

    start = time.perf_counter()
    share = _Share()
    lines_before: dict[tuple[int, int], int] = {}  # (file, span start) -> lines before it

    def line_no(enc: _Encoded, line: int) -> int:
        key = (enc.file_no, enc.span_start)
        if key not in lines_before:
            lines_before[key] = _lines_before(inp.files[enc.file_no], enc.span_start) if enc.span_start else 0
        return lines_before[key] + line

    total = sum(s.end - s.start for s in spans)
    with closing(_encoded_blocks(inp.spec, inp.encode, _blocks(inp.files, spans), cfg.workers)) as encoded, \
            tqdm(total=total, unit="B", unit_scale=True, desc=bar_desc, disable=bar_desc is None, file=sys.stderr) as bar:
        for enc in encoded:
            path = inp.files[enc.file_no]
            for line, reason in enc.bad_lines:
                if cfg.on_bad_line == "fail":
                    raise FormatError(f"{path}:{line_no(enc, line)}: {reason}; fix the line or set {SECTION}.on_bad_line=skip")
                share.skipped += 1
                if len(share.reported) < _REPORTED_BAD_LINES:
                    share.reported.append((str(path), line_no(enc, line), reason))
            for writer, part in zip(writers, enc.parts):
                writer.append(part)
            share.documents += enc.documents
            share.nbytes += enc.nbytes
            bar.update(enc.nbytes)
            bar.set_postfix_str(f"{share.documents} docs, {share.documents / (time.perf_counter() - start):,.0f} docs/s", refresh=False)
            alive()
    return share


def _check_tokens(cfg: PreprocessConfig, documents: int, tokens: Sequence[int]) -> None:
    for key, count in zip(cfg.json_keys, tokens):
        if count == 0:  # Megatron's reader cannot map an empty .bin file
            raise FormatError(f"{cfg.input}: no tokens for key {key!r} in {documents} documents; nothing to write")


def _summary(start: float, share: _Share, tokens: int, writers: list[_DatasetWriter], report: bool = True) -> dict:
    """The job's summary; with `report`, the bad lines skipped are listed first."""
    for path, line, reason in share.reported if report else ():
        log.warn(f"{path}:{line}: skipped: {reason}")
    if report and share.skipped > _REPORTED_BAD_LINES:
        log.warn(f"skipped {share.skipped} bad lines in all (the first {_REPORTED_BAD_LINES} are listed above)")
    return {
        "documents": share.documents,
        "tokens": tokens,
        "bytes_in": share.nbytes,
        "seconds": time.perf_counter() - start,
        "skipped_lines": share.skipped,
        "files": [str(p) for w in writers for p in (w.bin_path, w.idx_path)],
    }


def run_preprocess(cfg: PreprocessConfig, *, show_progress: bool = True, mpi_timeout: float = 600) -> dict:
    """Tokenize `cfg.input` into one Megatron-Core indexed dataset per JSON key; under
    mpiexec every rank runs this, each tokenizing its share of the input (SPEC 9).

    Returns a summary: documents, tokens (all keys), bytes_in, seconds, skipped_lines and
    files (the outputs written). Raises ConfigError or FormatError with a one-line message
    for a missing input or tokenizer, an unreadable tokenizer, or (with on_bad_line=fail)
    a bad line, named as file:line; AutotransError when an output cannot be written.
    Under MPI a rank that makes no progress for `mpi_timeout` seconds ends the job."""
    if launched_size() > 1:
        return _run_mpi(cfg, show_progress, mpi_timeout)
    start = time.perf_counter()
    inp = _open_input(cfg)
    with _writers(cfg, inp.dtype) as writers:
        share = _tokenize_share(writers, inp, _spans(inp.files, inp.sizes, 0, 1), cfg, "preprocess" if show_progress else None)
        _check_tokens(cfg, share.documents, [w.tokens for w in writers])
        for writer in writers:
            writer.finish()
    return _summary(start, share, sum(w.tokens for w in writers), writers)


# ---------------------------------------------------------------------------- under MPI

_TRANSFER_BYTES = 8 << 20  # a part travels to rank 0 in chunks of this size: memory stays bounded


def _run_mpi(cfg: PreprocessConfig, show_progress: bool, mpi_timeout: float) -> dict:
    """This rank's part of the job. Rank r tokenizes share r of the input (cut at line
    starts, balanced by bytes) into temporary part files; rank 0 tokenizes its own share
    straight into the outputs, then appends every other rank's part in rank order, pulling
    it chunk by chunk; so the output is byte for byte what one process writes, and only
    rank 0's node holds it. Any failure ends every rank with the same message, and a rank
    silent for `mpi_timeout` seconds (stopped, hung) ends it naming that rank: every wait
    goes through the link, which hears the others' beats."""
    from runner.collective import Link, StepError

    link = Link()
    link.watch(mpi_timeout)
    log.configure(quiet=link.rank != 0)  # the job's summary is said once
    try:
        return _mpi_steps(link, cfg, show_progress)
    except StepError:
        raise
    except BaseException as e:  # outside a step the other ranks cannot hear of it
        link.abort(str(e) if isinstance(e, AutotransError) else f"internal error: {type(e).__name__}: {e}")
        raise


def _mpi_steps(link, cfg: PreprocessConfig, show_progress: bool) -> dict:
    start = time.perf_counter()
    inp = link.step("read the input", lambda: _open_input(cfg))
    seen = link.exchange([(str(p), n) for p, n in zip(inp.files, inp.sizes)])
    suffix = "" if link.rank == 0 else f".rank{link.rank}"  # names of the temporaries (runner.durable)
    with _writers(cfg, inp.dtype, suffix) as writers:
        try:
            def tokenize() -> _Share:
                if seen[link.rank] != seen[0]:
                    raise AutotransError(f"{SECTION}.input: this rank sees {len(seen[link.rank])} file(s), {sum(n for _, n in seen[link.rank])} bytes, "
                                         f"and MPI rank 0 sees {len(seen[0])}, {sum(n for _, n in seen[0])} bytes; every rank must see the same input files (a shared disk)")
                desc = f"preprocess (rank 0's share of {link.size})" if show_progress and link.rank == 0 else None
                return _tokenize_share(writers, inp, _spans(inp.files, inp.sizes, link.rank, link.size), cfg, desc, link.poll)

            share = link.step("tokenize", tokenize)
            shares = link.exchange((share, [w.part_sizes() for w in writers]))
            total = _Share(sum(s.documents for s, _ in shares), sum(s.nbytes for s, _ in shares), sum(s.skipped for s, _ in shares),
                           [r for s, _ in shares for r in s.reported][:_REPORTED_BAD_LINES])
            tokens = [sum(sizes[k][0] for _, sizes in shares) // inp.dtype.itemsize for k in range(len(writers))]

            def combine() -> None:
                _check_tokens(cfg, total.documents, tokens)
                if link.rank == 0:
                    _pull_parts(link, writers, [sizes for _, sizes in shares])
                    for writer in writers:
                        writer.finish()
                else:
                    _serve_part(link, writers)

            link.step("combine the parts", combine)
        finally:
            if link.rank != 0:
                for writer in writers:
                    writer.discard()
    return _summary(start, total, sum(tokens), writers, report=link.rank == 0)


def _pull_parts(link, writers: list[_DatasetWriter], sizes: list[list[tuple[int, int, int]]]) -> None:
    """Rank 0: append each other rank's part to the writers, asking for one chunk at a time;
    every rank is released at the end, whatever happens."""
    released: set[int] = set()
    try:
        for rank in range(1, link.size):
            for k, writer in enumerate(writers):
                for stream, size in enumerate(sizes[rank][k]):
                    for offset in range(0, size, _TRANSFER_BYTES):
                        _send(link, (k, stream, offset, min(_TRANSFER_BYTES, size - offset)), rank)
                        data = _recv(link, rank)
                        if isinstance(data, str):
                            raise AutotransError(f"MPI rank {rank}: {data}")
                        writer.absorb(stream, data)
            _send(link, None, rank)
            released.add(rank)
    finally:
        for rank in set(range(1, link.size)) - released:
            _send(link, None, rank)


def _serve_part(link, writers: list[_DatasetWriter]) -> None:
    """Ranks > 0: answer rank 0's requests for chunks of this rank's part until released."""
    failure = None
    while (request := _recv(link, 0)) is not None:
        k, stream, offset, size = request
        try:
            part = writers[k].read_part(stream, offset, size)
        except OSError as e:
            failure = AutotransError(f"{writers[k].bin_path}: cannot read this rank's part: {e.strerror}")
            part = str(failure)
        _send(link, part, 0)
    if failure:
        raise failure


def _send(link, obj: object, dest: int) -> None:
    """Send `obj` to rank `dest`, waiting through the link (beats heard, silent ranks noticed)."""
    link.wait([link.p2p.isend(obj, dest=dest)])


def _recv(link, source: int) -> object:
    """The next object from rank `source`, once it has arrived (waiting as _send does)."""
    link.wait_until(lambda: link.p2p.iprobe(source=source))
    return link.p2p.recv(source=source)
