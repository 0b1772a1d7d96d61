"""download: three layouts, whitespace normalisation, caps, and bad input named clearly."""

import json
import time

import datasets
import pytest
from conftest import MULTI30K, REPO

from pipeline import download as dl
from pipeline.common.params import DataParams

DE_EN = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})


def params(dataset, **kw):
    return DataParams(dataset=str(dataset), config=None, **kw)


def write_jsonl(folder, split, pairs):
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"en": en, "de": de}, ensure_ascii=False) + "\n" for en, de in pairs)
    (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")


def lines(path):
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def flat_folder(tmp_path, train=(("a b", "c d"),)):
    folder = tmp_path / "flat"
    write_jsonl(folder, "train", train)
    write_jsonl(folder, "val", [("valid en", "valid de")])
    write_jsonl(folder, "test", [("test en", "test de")])
    return folder


def test_normalises_whitespace_and_drops_empty_sides(tmp_path):
    train = [
        ("  A\u00a0dog\t runs.\r", "Ein  Hund\u2009läuft. "),  # NBSP, tab, \r, thin space, runs
        ("Only English.", "   "),
        ("", "Nur Deutsch."),
        ("Line\nbreak inside", "Zeilen\u2028umbruch"),
    ]
    out = tmp_path / "raw"
    stats = dl.download(params(flat_folder(tmp_path, train)), out)
    assert lines(out / "train.en") == ["A dog runs.", "Line break inside"]
    assert lines(out / "train.de") == ["Ein Hund läuft.", "Zeilen umbruch"]
    assert stats["train"] == {"pairs": 2, "dropped_empty": 2}
    # val.jsonl is datasets' "validation" split, our "valid".
    assert lines(out / "valid.en") == ["valid en"] and stats["valid"]["pairs"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        f"{s}.{l}" for s in ("test", "train", "valid") for l in ("de", "en")
    ]


def test_direction_and_cap(tmp_path):
    train = [(f"en {i}", f"de {i}") for i in range(10)]
    out = tmp_path / "raw"
    stats = dl.download(params(flat_folder(tmp_path, train), source_lang="de", target_lang="en", max_sentences=3), out)
    assert lines(out / "train.de") == ["de 0", "de 1", "de 2"] and lines(out / "train.en")[2] == "en 2"
    assert stats["train"]["pairs"] == 3 and stats["langs"] == ["de", "en"]


def test_wmt14_translation_layout_from_local_parquet(tmp_path):
    folder = tmp_path / "wmt"
    folder.mkdir()
    for split, n in (("train", 5), ("validation", 2), ("test", 3)):
        rows = {"translation": [{"de": f"Satz {i}", "en": f"sentence {i}"} for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=DE_EN).to_parquet(str(folder / f"{split}.parquet"))
    out = tmp_path / "raw"
    stats = dl.download(DataParams(dataset=str(folder), config=None), out)
    assert lines(out / "train.en") == [f"sentence {i}" for i in range(5)]
    assert lines(out / "train.de")[4] == "Satz 4"
    assert [stats[s]["pairs"] for s in ("train", "valid", "test")] == [5, 2, 3]
    with pytest.raises(dl.DownloadError, match=r"translation languages are \['de', 'en'\], not en and fr"):
        dl.download(DataParams(dataset=str(folder), config=None, target_lang="fr"), tmp_path / "fr")


def test_plain_text_layout_and_mismatched_sides(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.en").write_text("one\ntwo\n", encoding="utf-8")
        (folder / f"{split}.de").write_text("eins\nzwei\n", encoding="utf-8")
    out = tmp_path / "raw"
    dl.download(params(folder), out)
    assert lines(out / "valid.de") == ["eins", "zwei"]
    (folder / "train.de").write_text("eins\nzwei\ndrei\n", encoding="utf-8")
    with pytest.raises(dl.DownloadError, match=r"split 'train': .*train.en has 2 lines but .*train.de has 3"):
        dl.download(params(folder), tmp_path / "raw2")


def test_missing_split_is_named_with_the_available_ones(tmp_path):
    folder = flat_folder(tmp_path)
    with pytest.raises(dl.DownloadError, match=r"no split 'dev' \(data.splits.valid\); it has train, validation, test"):
        dl.download(params(folder, splits={"train": "train", "valid": "dev", "test": "test"}), tmp_path / "raw")


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    folder = flat_folder(tmp_path)
    with open(folder / "test.jsonl", "ab") as f:
        f.write(b'{"en": "caf\xe9", "de": "x"}\n')
    with pytest.raises(dl.DownloadError, match=r"test.jsonl:2: not valid UTF-8"):
        dl.download(params(folder), tmp_path / "raw")


def test_empty_after_cleaning_names_the_split(tmp_path):
    folder = flat_folder(tmp_path)
    write_jsonl(folder, "test", [("  ", "x"), ("y", "\u00a0")])
    with pytest.raises(dl.DownloadError, match=r"split 'test' \(data.splits.test\) is empty after cleaning \(2 pairs"):
        dl.download(params(folder), tmp_path / "raw")


def test_wrong_columns_are_named(tmp_path):
    folder = flat_folder(tmp_path)
    with pytest.raises(dl.DownloadError, match=r"columns \['en', 'de'\]; expected .* 'en' and 'fr'"):
        dl.download(params(folder, target_lang="fr"), tmp_path / "raw")


def test_unknown_dataset_fails_fast_with_what_to_set(tmp_path):
    start = time.monotonic()
    with pytest.raises(dl.DownloadError) as e:
        dl.download(DataParams(dataset="no-such-org/no-such-corpus"), tmp_path / "raw")
    assert time.monotonic() - start < 10
    assert "data.dataset 'no-such-org/no-such-corpus' is not a local path" in str(e.value)
    assert "set data.dataset in params.yaml to a local folder" in str(e.value)
    assert "HF_DATASETS_OFFLINE" in str(e.value)


def test_a_failed_run_keeps_the_previous_output(tmp_path):
    out = tmp_path / "raw"
    dl.download(params(flat_folder(tmp_path)), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # The test split fails after train and valid were written into the temporary folder.
    write_jsonl(tmp_path / "flat", "test", [(" ", " ")])
    write_jsonl(tmp_path / "flat", "train", [("new", "neu")])
    with pytest.raises(dl.DownloadError):
        dl.download(params(tmp_path / "flat"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat", "raw"]  # no temporary left behind


def test_cli_on_the_embedded_corpus(tmp_path, monkeypatch, mlflow_tmp_store):
    monkeypatch.chdir(REPO)  # data.dataset is relative to the repository root
    params_file = tmp_path / "params.yaml"
    params_file.write_text("data:\n  dataset: corpus/sample-en-de\n  config: null\n", encoding="utf-8")
    out, metrics = tmp_path / "raw", tmp_path / "metrics" / "download.json"
    dl.main(["--out", str(out), "--metrics", str(metrics), "--params", str(params_file)])
    stats = json.loads(metrics.read_text())
    assert [stats[s]["pairs"] for s in ("train", "valid", "test")] == [4000, 200, 200]
    assert len(lines(out / "train.de")) == 4000


def test_a_queued_experiment_finds_a_corpus_beside_the_users_repository(tmp_path, monkeypatch):
    """`dvc exp run --queue` runs the stage in <repo>/.dvc/tmp/exps/tmpXXXX with DVC_ROOT=<repo>: a relative path
    that leaves the repository (the multi30k preset's ../shared/data/multi30k) is the user's, one inside it
    (corpus/sample-en-de) is the copy's, as committed."""
    user, copy = tmp_path / "work" / "repo", tmp_path / "work" / "repo" / ".dvc" / "tmp" / "exps" / "tmpabcd"
    flat_folder(tmp_path / "work" / "shared")  # work/shared/flat
    write_jsonl(user / "corpus", "train", [("the user's", "des Nutzers")])
    for split in ("val", "test"):
        write_jsonl(user / "corpus", split, [("x", "y")])
    (copy / "corpus").mkdir(parents=True)
    for split in ("train", "val", "test"):
        write_jsonl(copy / "corpus", split, [("the copy's", "der Kopie")])
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(user))
    dl.download(params("../shared/flat"), tmp_path / "raw")
    assert lines(tmp_path / "raw" / "train.en") == ["a b"]
    dl.download(params("corpus"), tmp_path / "raw")
    assert lines(tmp_path / "raw" / "train.en") == ["the copy's"]
    monkeypatch.delenv("DVC_ROOT")
    with pytest.raises(dl.DownloadError, match="is not a local path"):
        dl.download(params("../shared/flat"), tmp_path / "raw")


@pytest.mark.skipif(not MULTI30K.exists(), reason="needs ../shared/data/multi30k")
def test_multi30k_folder():
    out_stats = dl.open_splits(DataParams(dataset=str(MULTI30K), config=None))
    assert {k: v[0] for k, v in out_stats.items()} == {"train": 29000, "valid": 1014, "test": 1000}


HUB_README = """---
configs:
- config_name: de-en
  default: true
  data_files:
  - split: train
    path: de-en/train-*
  - split: validation
    path: de-en/validation-*
  - split: test
    path: de-en/test-*
---
"""


def hub_folder(tmp_path, splits=("train", "validation", "test"), readme=True, train=None):
    """The hub's wmt/wmt14 layout: de-en/<split>-00000-of-00001.parquet and a README.md naming config de-en."""
    folder = tmp_path / "wmt14"
    (folder / "de-en").mkdir(parents=True)
    for split in splits:
        pairs = train if (split == "train" and train) else [(f"{split} {i}", f"{split} satz {i}") for i in range(3)]
        rows = {"translation": [{"de": de, "en": en} for en, de in pairs]}
        path = folder / "de-en" / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_dict(rows, features=DE_EN).to_parquet(str(path))
    if readme:
        (folder / "README.md").write_text(HUB_README, encoding="utf-8")
    return folder


@pytest.mark.parametrize("config", ["de-en", None])
def test_hub_layout_without_its_test_split_names_the_folder_the_split_and_the_key(tmp_path, config):
    folder = hub_folder(tmp_path, splits=("train", "validation"))
    with pytest.raises(dl.DownloadError) as e:
        dl.download(DataParams(dataset=str(folder), config=config), tmp_path / "raw")
    message = str(e.value)
    assert message.startswith(
        f"{folder}: no files for split 'test' (data.splits.test): its README.md names de-en/test-*"
    )
    assert "set data.splits.test to a split it has (train, validation)" in message
    assert "dvc exp run -S data.splits.test=train" in message
    assert not (tmp_path / "raw").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["wmt14"]


def test_folder_without_readme_and_test_split_says_what_to_set(tmp_path):
    # No README: datasets takes the splits from the file names, and our own check names what is missing.
    folder = hub_folder(tmp_path, splits=("train", "validation"), readme=False)
    with pytest.raises(dl.DownloadError, match=r"no split 'test' \(data.splits.test\); it has train, validation\. "
                       r"Add that split's files to the dataset, or set data.splits.test"):  # fmt: skip
        dl.download(DataParams(dataset=str(folder), config=None), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_a_10000_token_training_line_is_kept(tmp_path):
    # Filtering by length is binarise's job (binarise.max_len, counted in its metrics); download keeps the text.
    long_en, long_de = " ".join(["word"] * 10_000), " ".join(["Wort"] * 10_000)
    folder = hub_folder(tmp_path, train=[("a b", "c d"), (long_en, long_de), ("e f", "g h")])
    stats = dl.download(DataParams(dataset=str(folder)), tmp_path / "raw")
    assert stats["train"] == {"pairs": 3, "dropped_empty": 0}
    assert lines(tmp_path / "raw" / "train.en")[1] == long_en and lines(tmp_path / "raw" / "train.de")[1] == long_de
