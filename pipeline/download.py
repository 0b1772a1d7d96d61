"""`download`: the parallel corpus as plain text, one sentence a line, in `<out>/{train,valid,test}.<lang>`.

    python -m pipeline.download --out data/raw

`data.dataset` is a Hugging Face hub id (default `wmt/wmt14`, config `de-en`) or a local folder or data file,
relative to the repository root (for a queued or `--temp` experiment, which DVC runs in a copy under
.dvc/tmp/exps/, a path not found in the copy is taken from the user's repository, DVC_ROOT: the multi30k
preset's ../shared/data/multi30k), in one of three layouts:

- a `translation` column of `{lang: sentence}` (wmt14; parquet, json),
- one column per language, `en` and `de` (bentrevett/multi30k, corpus/sample-en-de; jsonl, csv, parquet),
- plain text files `<split>.<lang>` (train.en + train.de, ...: Moses/fairseq style, and data/raw itself).

A folder's split names come from its file names by datasets' own rules (`val.jsonl` is `validation`);
`data.splits` maps our train/valid/test onto them. Whitespace is normalised (runs of any Unicode space,
tabs, \\r, NBSP become one space; ends stripped); pairs with an empty side are dropped and counted.
`metrics/download.json` has the pairs kept and dropped per split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError, HTTPError, RepositoryNotFoundError
from tqdm import tqdm

from pipeline.common.files import atomic_path, write_text_atomic
from pipeline.common.params import DataParams, load_params
from pipeline.common.tracking import log_stage_metrics, stage_run

SPLITS = ("train", "valid", "test")
BATCH = 10_000
# Single local files: the datasets builder for each extension.
FILE_BUILDERS = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".arrow": ("arrow", {}),
}
TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".txt"}
LOCAL_HINT = (
    "set data.dataset in params.yaml to a local folder or file, relative to the repository root "
    "(e.g. ../shared/data/multi30k, or corpus/sample-en-de which ships with the repository)"
)

# A split as (number of pairs, or None if unknown; batches of (sources, targets)).
PairBatches = tuple[int | None, Iterator[tuple[list, list]]]


class DownloadError(RuntimeError):
    """The corpus cannot be read as configured; the message says what to set instead."""


def normalise(text: str | None) -> str:
    """Collapse every run of Unicode whitespace (\\t, \\r, \\n, NBSP, ...) to one space and strip the ends."""
    return " ".join(text.split()) if text else ""


def check_utf8(path: Path) -> None:
    """Fail on the first line that is not UTF-8, naming the file and line, before datasets reads it."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DownloadError(f"{path}:{lineno}: not valid UTF-8 ({e.reason}, byte {e.start})") from None


def read_lines(path: Path) -> list[str]:
    check_utf8(path)
    # Lines end at \n only: a stray \r is whitespace inside a line, which normalise() removes.
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def text_layout(folder: Path, src: str, tgt: str) -> dict[str, tuple[Path, Path]] | None:
    """`<split>.<lang>` plain text files in `folder`, by split name; None if the folder has none."""
    if not any(p.suffix in (f".{src}", f".{tgt}") for p in folder.iterdir() if p.is_file()):
        return None
    patterns = datasets.data_files.get_data_patterns(str(folder))
    found = datasets.data_files.DataFilesDict.from_patterns(patterns, base_path=str(folder))
    layout = {}
    for split, files in found.items():
        by_lang = {Path(f).suffix[1:]: Path(f) for f in files}
        if src in by_lang and tgt in by_lang:
            layout[str(split)] = (by_lang[src], by_lang[tgt])
    return layout


def text_split(split: str, src_path: Path, tgt_path: Path) -> PairBatches:
    sources, targets = read_lines(src_path), read_lines(tgt_path)
    if len(sources) != len(targets):
        raise DownloadError(
            f"split '{split}': {src_path} has {len(sources)} lines but {tgt_path} has {len(targets)}; "
            "the two sides of a parallel corpus must align line by line"
        )
    batches = ((sources[i : i + BATCH], targets[i : i + BATCH]) for i in range(0, len(sources), BATCH))
    return len(sources), batches


def table_split(ds: datasets.Dataset, where: str, src: str, tgt: str) -> PairBatches:
    """Batches of (sources, targets) from a `translation` column or from one column per language."""
    columns = ds.column_names
    if "translation" in columns:
        feature = ds.features["translation"]
        langs = getattr(feature, "languages", None) or (list(ds[0]["translation"]) if len(ds) else [])
        if src not in langs or tgt not in langs:
            raise DownloadError(f"{where}: translation languages are {langs}, not {src} and {tgt}")
        rows = ds.select_columns(["translation"]).iter(batch_size=BATCH)
        batches = (([t[src] for t in b["translation"]], [t[tgt] for t in b["translation"]]) for b in rows)
    elif src in columns and tgt in columns:
        rows = ds.select_columns([src, tgt]).iter(batch_size=BATCH)
        batches = ((b[src], b[tgt]) for b in rows)
    else:
        raise DownloadError(
            f"{where}: columns {columns}; expected a 'translation' column or columns '{src}' and '{tgt}' "
            "(data.source_lang, data.target_lang)"
        )
    return len(ds), batches


def readme_splits(folder: Path, config: str | None) -> dict[str, list[str]]:
    """The file patterns of each split that the folder's README.md `configs:` give for `config` (or the default
    config): the hub's layout (wmt/wmt14). Empty when the folder has no such README."""
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else None
    except (yaml.YAMLError, IndexError):
        return {}
    configs = [c for c in (meta or {}).get("configs") or [] if isinstance(c, dict)]
    chosen = [c for c in configs if c.get("config_name") == config] or [c for c in configs if c.get("default")]
    if not chosen:
        return {}
    splits = {}
    for entry in chosen[0].get("data_files") or []:
        if isinstance(entry, dict) and "split" in entry:
            paths = entry.get("path")
            splits[str(entry["split"])] = [paths] if isinstance(paths, str) else list(paths or [])
    return splits


def check_split_files(folder: Path, data: DataParams) -> None:
    """Name a split whose files are missing before datasets does (it says "Couldn't infer the same data file
    format for all splits"), with the data.splits key that would point elsewhere."""
    splits = readme_splits(folder, data.config)
    present = [s for s, patterns in splits.items() if any(any(folder.glob(p)) for p in patterns)]
    keys = {name: key for key, name in data.splits.items()}
    for split, patterns in splits.items():
        if split not in present:
            key = keys.get(split)
            point = f" (data.splits.{key})" if key else ""
            other = f"set data.splits.{key} to a split it has ({', '.join(present) or 'none'}), e.g. " if key else ""
            example = f"`dvc exp run -S data.splits.{key}={present[0]}`, " if key and present else ""
            raise DownloadError(
                f"{folder}: no files for split '{split}'{point}: its README.md names {', '.join(patterns)} for "
                f"config '{data.config}' and nothing matches. Add that split's files, or {other}{example}"
                "or remove the split from README.md's configs"
            )


def load_local(path: Path, data: DataParams) -> datasets.DatasetDict:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            check_utf8(f)
    if path.is_dir():
        check_split_files(path, data)
        try:
            return datasets.load_dataset(str(path), data.config)
        except (ValueError, FileNotFoundError) as e:  # datasets' own words, with the folder and key named
            raise DownloadError(f"data.dataset '{path}', data.config '{data.config}': {e}") from None
    if path.suffix not in FILE_BUILDERS:
        kinds = ", ".join(FILE_BUILDERS)
        raise DownloadError(f"{path}: unknown data file type; use one of {kinds} or a folder")
    builder, options = FILE_BUILDERS[path.suffix]
    return datasets.load_dataset(builder, data_files=str(path), **options)


def load_hub(dataset: str, config: str | None) -> datasets.DatasetDict:
    """Ask the hub first with a short timeout, so an offline machine fails in seconds, not after retries."""
    missing = f"data.dataset '{dataset}' is not a local path (relative to {Path.cwd()})"
    if not datasets.config.HF_HUB_OFFLINE:
        try:
            HfApi().dataset_info(dataset, timeout=10)
        except (RepositoryNotFoundError, HFValidationError):
            raise DownloadError(f"{missing} nor a dataset on the Hugging Face hub; {LOCAL_HINT}") from None
        except (HTTPError, OSError) as e:
            raise DownloadError(
                f"{missing} and the Hugging Face hub cannot be reached ({e}); {LOCAL_HINT}. "
                "If the dataset is already in your datasets cache, set HF_DATASETS_OFFLINE=1"
            ) from None
    try:
        return datasets.load_dataset(dataset, config)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
        offline = " (HF_DATASETS_OFFLINE is set and it is not cached)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DownloadError(f"{missing} and cannot be loaded from the hub{offline}: {e}; {LOCAL_HINT}") from None
    except ValueError as e:
        raise DownloadError(f"data.dataset '{dataset}', data.config '{config}': {e}") from None


def local_path(dataset: str) -> Path:
    """`data.dataset` as a path: relative to the working directory (the repository root, where DVC runs the
    stage), else to DVC_ROOT, the repository the experiment was started from. A queued or `--temp` experiment
    runs in a copy under .dvc/tmp/exps/ that holds the repository's tracked files (corpus/sample-en-de is read
    from the copy, as committed), but nothing outside it: ../shared/data/multi30k is the user's."""
    path = Path(dataset).expanduser()
    root = os.environ.get("DVC_ROOT")
    if not path.is_absolute() and not path.exists() and root and (Path(root) / path).exists():
        return Path(root) / path
    return path


def open_splits(data: DataParams) -> dict[str, PairBatches]:
    """Our three splits (train/valid/test) as pair batches, from wherever `data.dataset` points."""
    src, tgt = data.source_lang, data.target_lang
    local = local_path(data.dataset)
    layout = text_layout(local, src, tgt) if local.is_dir() else None
    if layout is not None:
        available = layout
    else:
        available = load_local(local, data) if local.exists() else load_hub(data.dataset, data.config)
    splits = {}
    for key in SPLITS:
        name = data.splits[key]
        if name not in available:
            have = [str(s) for s in available]
            example = f" (e.g. `dvc exp run -S data.splits.{key}={have[0]}`)" if have else ""
            raise DownloadError(
                f"{data.dataset}: no split '{name}' (data.splits.{key}); it has {', '.join(have) or 'none'}. Add "
                f"that split's files to the dataset, or set data.splits.{key} to one of those{example}"
            )
        where = f"{data.dataset} split '{name}'"
        if layout:
            splits[key] = text_split(name, *layout[name])
        else:
            splits[key] = table_split(available[name], where, src, tgt)
    return splits


def write_split(out: Path, key: str, pairs: PairBatches, data: DataParams) -> dict:
    """Write `<out>/<key>.<src>` and `.<tgt>` aligned line by line; return the pairs kept and dropped."""
    total, batches = pairs
    if data.max_sentences and total:
        total = min(total, data.max_sentences)
    kept = dropped = 0
    paths = [out / f"{key}.{lang}" for lang in (data.source_lang, data.target_lang)]
    with open(paths[0], "w", encoding="utf-8") as fs, open(paths[1], "w", encoding="utf-8") as ft:
        bar = tqdm(total=total, desc=f"download {key}", unit=" pairs", mininterval=2.0)
        for sources, targets in batches:
            for s, t in zip(sources, targets, strict=True):
                s, t = normalise(s), normalise(t)
                if not s or not t:
                    dropped += 1
                    continue
                fs.write(s + "\n")
                ft.write(t + "\n")
                kept += 1
                if kept == data.max_sentences:
                    break
            bar.update(len(sources))
            if kept == data.max_sentences:
                break
        bar.close()
    if kept == 0:
        raise DownloadError(
            f"{data.dataset} split '{data.splits[key]}' (data.splits.{key}) is empty after cleaning "
            f"({dropped} pairs had an empty side)"
        )
    return {"pairs": kept, "dropped_empty": dropped}


def download(data: DataParams, out: Path | str) -> dict:
    """Write all three splits into `out` atomically: either the whole folder appears, or nothing changes."""
    splits = open_splits(data)
    stats = {}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for key, pairs in splits.items():
            stats[key] = write_split(tmp, key, pairs, data)
    return {"dataset": data.dataset, "langs": [data.source_lang, data.target_lang], **stats}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch the parallel corpus as plain text.")
    parser.add_argument("--out", type=Path, required=True, help="folder for {train,valid,test}.<lang>")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/download.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    with stage_run("download", params, ("data",)):
        try:
            stats = download(params.data, args.out)
        except DownloadError as e:
            sys.exit(f"download: {e}")
        write_text_atomic(args.metrics, json.dumps(stats, indent=2) + "\n")
        log_stage_metrics(stats)
    for key in SPLITS:
        print(f"{key}: {stats[key]['pairs']} pairs kept, {stats[key]['dropped_empty']} dropped (empty side)")


if __name__ == "__main__":
    main()
