"""Stage `score`: sacreBLEU equal to the sacrebleu command line's, chrF, and the labelled comparison BLEUs."""

import json
import subprocess
import sys

import mlflow
import pytest
from helpers_eval import mlflow_store, write_params, write_raw

from pipeline import score as stage
from pipeline.common.files import read_lines


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_raw(tmp_path / "data" / "raw", n_test=60)
    write_params(tmp_path, mlflow_store())
    return tmp_path


def degrade(refs):
    """Hypotheses of middling quality: the second word dropped, every 4th line replaced."""
    hyps = [" ".join(w for j, w in enumerate(r.split()) if j != 1) for r in refs]
    return [h if i % 4 else "Ein Hund läuft." for i, h in enumerate(hyps)]


def sacrebleu_cli(ref, hyp, metric, *extra):
    cmd = [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", metric, "-w", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout.strip()


def test_stage_bleu_and_chrf_equal_the_sacrebleu_command_line(workspace):
    ref = workspace / "data" / "raw" / "test.de"
    hyp = workspace / "outputs" / "hyp.txt"
    hyp.parent.mkdir()
    hyp.write_text("".join(h + "\n" for h in degrade(read_lines(ref))), encoding="utf-8")

    stage.main(["--hyp", "outputs/hyp.txt", "--raw", "data/raw", "--out", "metrics/score.json"])
    result = json.loads((workspace / "metrics" / "score.json").read_text())
    assert 10 < result["bleu"] < 90
    assert result["bleu"] == float(sacrebleu_cli(ref, hyp, "bleu", "-b"))
    assert result["chrf"] == float(sacrebleu_cli(ref, hyp, "chrf", "-b"))
    # The interval is `sacrebleu --confidence`'s (score.bootstrap: 1,000 resamples by default, its fixed seed).
    confidence = json.loads(sacrebleu_cli(ref, hyp, "bleu", "--confidence"))
    assert (result["bleu_bootstrap_mean"], result["bleu_ci95"]) == (
        confidence["confidence_mean"],
        confidence["confidence_var"],
    )
    assert 0 < result["bleu_ci95"] < 20 and result["bleu_ci95_signature"] == confidence["signature"]
    assert result["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert result["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert "compound splitting" in result["bleu_compound_split_note"]
    assert "lower-cased" in result["bleu_tok_lc_note"]
    assert result["sentences"] == 60 and result["split"] == "test"

    # The score child run and the pipeline's parent run both carry BLEU and chrF.
    runs = mlflow.search_runs(experiment_names=[f"eval-{workspace.name}"], output_format="list")
    (child,) = [r for r in runs if r.data.tags.get("stage") == "score"]
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert child.data.metrics["bleu"] == parent.data.metrics["bleu"] == result["bleu"]
    assert parent.data.metrics["bleu_ci95"] == result["bleu_ci95"]
    assert parent.data.metrics["chrf"] == result["chrf"]
    assert parent.data.tags["bleu_signature"] == result["bleu_signature"]
    assert parent.info.status == "FINISHED"


def test_mismatched_line_counts_name_both_files(workspace):
    (workspace / "hyp.txt").write_text("one line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"hyp.txt has 1 lines, data/raw/test.de has 60"):
        stage.main(["--hyp", "hyp.txt", "--raw", "data/raw", "--out", "metrics/score.json"])
    assert not (workspace / "metrics" / "score.json").exists()


def test_compound_split_is_the_paper_scripts_rule():
    # perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g': non-overlapping, so "a-b-c" splits once.
    assert stage.compound_split("Straßen-Bahn fährt") == "Straßen ##AT##-##AT## Bahn fährt"
    assert stage.compound_split("a-b-c") == "a ##AT##-##AT## b-c"
    assert stage.compound_split("1 - 2 -x y-") == "1 - 2 -x y-"


def test_identical_output_scores_100_and_case_only_matters_to_cased_bleu():
    refs = ["Ein Hund läuft über das Gras.", "Zwei Kinder spielen im Schnee-Park.", "Eine Frau liest."]
    assert {k: v for k, v in stage.score(refs, refs).items() if not isinstance(v, str)} == {
        "sentences": 3,
        "bleu": 100.0,
        "chrf": 100.0,
        "bleu_compound_split": 100.0,
        "bleu_tok_lc": 100.0,
    }
    upper = stage.score([r.upper() for r in refs], refs)
    assert upper["bleu"] < 50 and upper["bleu_tok_lc"] == 100.0


def test_a_perfect_system_has_no_uncertainty_and_a_worse_one_does():
    refs = ["Ein Hund läuft über das Gras.", "Zwei Kinder spielen im Schnee-Park.", "Eine Frau liest ein Buch."]
    # Every resample of a perfect output is itself perfect: mean 100, interval 0.
    perfect = stage.score(refs, refs, bootstrap=200)
    assert (perfect["bleu_bootstrap_mean"], perfect["bleu_ci95"]) == (100.0, 0.0)
    assert "bs:200" in perfect["bleu_ci95_signature"] and "bs:" not in perfect["bleu_signature"]
    # One sentence wrong: resamples with more or fewer copies of it score differently.
    mixed = stage.score([refs[0], refs[1], "Ein Mann schläft."], refs, bootstrap=200)
    assert mixed["bleu_ci95"] > 0
    assert "bleu_ci95" not in stage.score(refs, refs, bootstrap=0)


def test_compound_splitting_rewards_partly_right_compounds():
    # "Schnee-Park" vs "Schnee-Garten": nothing in common as one token, two of three tokens once split.
    refs, hyps = ["Kinder spielen im Schnee-Park heute ."], ["Kinder spielen im Schnee-Garten heute ."]
    result = stage.score(hyps, refs)
    assert result["bleu_compound_split"] > result["bleu"]


def test_summary_prints_the_scores_and_how_to_open_the_ui(workspace):
    from pipeline.commands.summary import summary

    scores = {"split": "test", **stage.score(["Ein Hund läuft."], ["Ein Hund läuft."], bootstrap=100)}
    text = summary(scores, f"sqlite:///{workspace}/mlflow.db", "nothing-here")
    assert "BLEU  100.00   sacreBLEU nrefs:1|case:mixed|eff:no|tok:13a" in text
    assert "BLEU ± 0.00 at 95%" in text and "--paired-bs" in text
    assert "chrF  100.00" in text and "compound splitting" in text
    ui = f"mlflow ui --backend-store-uri sqlite:///{workspace}/mlflow.db --host 127.0.0.1 --port 5000 --workers 1"
    assert ui in text and "'Model training' switch" in text
