"""The binarised parallel corpus on disk: token arrays that are memory-mapped, never loaded whole.

One folder (`data/bin`) holds, for every split and language,

    <split>.<lang>.bin      all token ids back to back (dtype in meta.json), every sentence ending in eos
    <split>.<lang>.idx.npy  int64 offsets, length pairs + 1: sentence i is bin[offsets[i]:offsets[i + 1]]

and `meta.json` (vocab_size, dtype, langs, special ids, the sentencepiece model's sha256). With BPE-dropout
(opt-in) a `train_sampled` split holds `train_copies` sampled encodings of the training pairs back to back.
Like fairseq's `MMapIndexedDataset`, a 4.5M-pair WMT14 train split costs only its offsets in RAM; the tokens
stay in the page cache and are shared by every worker process on the machine.

Imports numpy and the standard library only.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
META_FILE = "meta.json"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
SAMPLED_SPLIT = "train_sampled"  # BPE-dropout's copies of the train split (pipeline/binarise.py)


class CorpusError(ValueError):
    """A binarised corpus that is missing, incomplete or inconsistent, with the file named."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id: uint16 halves the data for vocabularies up to 65536."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def side_paths(folder: Path | str, split: str, lang: str) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"{split}.{lang}.bin", folder / f"{split}.{lang}.idx.npy"


def write_meta(folder: Path | str, meta: dict) -> None:
    meta = {"format_version": FORMAT_VERSION, **meta}
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_meta(folder: Path | str) -> dict:
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"{path}: not found (run the binarise stage first)") from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorpusError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


class SideWriter:
    """Appends the sentences of one split and language; `close()` writes the offsets last.

    The offsets file is what a reader opens first, so a writer that dies early leaves no index that would
    make its half-written token file look complete.
    """

    def __init__(self, folder: Path | str, split: str, lang: str, dtype: np.dtype | str):
        self.bin_path, self.idx_path = side_paths(folder, split, lang)
        self.dtype = np.dtype(dtype)
        self._file = open(self.bin_path, "wb")  # noqa: SIM115 -- closed in close()
        self._lengths: list[np.ndarray] = []

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """`tokens`: the ids of len(lengths) sentences back to back (eos included); `lengths`: theirs."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"{self.bin_path}: {len(tokens)} tokens but the lengths add up to {lengths.sum()}")
        if len(tokens) and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"{self.bin_path}: token ids outside the range of {self.dtype}")
        with named(self.bin_path):
            self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(lengths)

    def close(self) -> np.ndarray:
        with named(self.bin_path):
            self._file.close()  # flushes: a full disk may show only here
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        with named(self.idx_path):
            np.save(self.idx_path, offsets)
        return lengths

    def abort(self) -> None:
        """Close the token file without writing the index (a no-op after close): the split stays incomplete."""
        with contextlib.suppress(OSError):
            self._file.close()


@contextlib.contextmanager
def named(path: Path):
    """An OSError from writing (a full disk: ENOSPC) carries the file's name, which a bare write() leaves out."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


class TokenArray:
    """One side of one split: sentence i as `tokens[offsets[i]:offsets[i + 1]]`, memory-mapped."""

    def __init__(self, folder: Path | str, split: str, lang: str, dtype: np.dtype | str):
        bin_path, idx_path = side_paths(folder, split, lang)
        for path in (bin_path, idx_path):
            if not path.exists():
                raise CorpusError(f"{path}: not found (split '{split}', language '{lang}')")
        self.offsets = np.load(idx_path)
        dtype = np.dtype(dtype)
        expected = int(self.offsets[-1]) * dtype.itemsize if len(self.offsets) else -1
        size = bin_path.stat().st_size
        if self.offsets.ndim != 1 or len(self.offsets) == 0 or self.offsets[0] != 0 or size != expected:
            raise CorpusError(f"{bin_path}: {size} bytes, but {idx_path.name} describes {expected} (truncated?)")
        # np.memmap refuses an empty file; an empty split is still a valid (empty) array.
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        self.lengths = np.diff(self.offsets)
        self.lang = lang

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]], dtype=np.int64)


class ParallelCorpus:
    """Source-target pairs of one split. `corpus[i] -> (src, tgt)`, int64 arrays that end with eos."""

    def __init__(self, folder: Path, split: str, src: TokenArray, tgt: TokenArray, meta: dict):
        if len(src) != len(tgt):
            raise CorpusError(f"{folder}: split '{split}' has {len(src)} source and {len(tgt)} target sentences")
        self.folder, self.split, self.src, self.tgt, self.meta = folder, split, src, tgt, meta

    @classmethod
    def load(cls, folder: Path | str, split: str, src_lang: str, tgt_lang: str) -> ParallelCorpus:
        folder = Path(folder)
        meta = read_meta(folder)
        if split not in meta.get("splits", [split]):
            raise CorpusError(f"{folder}: no split '{split}' (have {', '.join(meta['splits'])})")
        langs = meta.get("langs", {})
        if {src_lang, tgt_lang} - set(langs.values()):
            raise CorpusError(f"{folder}/{META_FILE}: binarised for {langs}, not {src_lang}->{tgt_lang}")
        src = TokenArray(folder, split, src_lang, meta["dtype"])
        tgt = TokenArray(folder, split, tgt_lang, meta["dtype"])
        return cls(folder, split, src, tgt, meta)

    @property
    def src_lengths(self) -> np.ndarray:
        return self.src.lengths

    @property
    def tgt_lengths(self) -> np.ndarray:
        return self.tgt.lengths

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.src[i], self.tgt[i]

    def __reduce__(self):
        # Pickled (to Ray workers, DataLoader processes) as its location, not as a copy of its tokens.
        return (ParallelCorpus.load, (str(self.folder), self.split, self.src.lang, self.tgt.lang))
