"""`translate`: sentences from stdin or a file to stdout, one translation per line, same as the library."""

import subprocess
import sys

import pytest
from helpers_eval import make_workspace

from pipeline.average import average
from pipeline.common.params import AverageParams
from pipeline.common.translator import Translator
from transformer.inference import SearchOptions

SENTENCES = ["A man is walking.", "", "Two dogs play in the snow.", "A girl."]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("translate")
    make_workspace(root, n_test=4)
    average(root / "models" / "checkpoints", root / "data" / "bpe", root / "average.pt", AverageParams(last=3), {})
    return root / "average.pt"


def cli(*args, stdin=None):
    cmd = [sys.executable, "-m", "pipeline.commands.translate", *map(str, args)]
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_file_and_stdin_give_the_library_translations(model_file, tmp_path):
    expected = Translator.from_file(model_file, SearchOptions(beam=2, max_len_b=6)).translate(SENTENCES)
    source = tmp_path / "in.en"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    args = ("--model", model_file, "--beam", "2", "--max-len-b", "6", "--batch-tokens", "20")
    assert cli(*args, "--input", source) == "".join(t + "\n" for t in expected)
    assert cli(*args, stdin="\n".join(SENTENCES) + "\n") == "".join(t + "\n" for t in expected)
    # Several --model files make an ensemble; two copies of one model translate as that model.
    ensemble = ("--model", model_file, model_file, *args[2:])
    assert cli(*ensemble, "--input", source) == "".join(t + "\n" for t in expected)


@pytest.mark.parametrize("option, value, least", [("--beam", "0", 1), ("--ct2-max-batch-size", "-1", 0)])
def test_bad_arguments_are_refused(model_file, option, value, least):
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.commands.translate", "--model", str(model_file), option, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and f"{option} must be >= {least}" in out.stderr


def test_console_script_is_declared():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["translate"] == "pipeline.commands.translate:main"
