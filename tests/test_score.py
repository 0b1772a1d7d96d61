"""Stage `score`: sacreBLEU equal to the sacrebleu command line's, chrF, and the labelled comparison BLEUs."""

import json
import subprocess
import sys

import mlflow
import pytest
from helpers_eval import mlflow_store, write_params, write_raw

from pipeline import score as stage
from pipeline.common import metrics
from pipeline.common.files import read_lines
from pipeline.common.paper_bleu import bleu_paper, paper_tokenize


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
    assert "get_ende_bleu.sh" in result["bleu_paper_note"] and "NOT sacreBLEU" in result["bleu_paper_note"]
    assert "lower-cased" in result["bleu_tok_lc_note"]
    assert result["sentences"] == 60 and result["split"] == "test"

    # The score child run and the pipeline's parent run both carry BLEU and chrF.
    runs = mlflow.search_runs(experiment_names=[f"eval-{workspace.name}"], output_format="list")
    (child,) = [r for r in runs if r.data.tags.get("stage") == "score"]
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert child.data.metrics["bleu"] == parent.data.metrics["bleu"] == result["bleu"]
    assert parent.data.metrics["bleu_ci95"] == result["bleu_ci95"]
    assert parent.data.metrics["chrf"] == result["chrf"]
    assert parent.data.metrics["bleu_paper"] == result["bleu_paper"]
    assert parent.data.tags["bleu_signature"] == result["bleu_signature"]
    assert parent.info.status == "FINISHED"


def test_mismatched_line_counts_name_both_files(workspace):
    (workspace / "hyp.txt").write_text("one line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"hyp.txt has 1 lines, data/raw/test.de has 60"):
        stage.main(["--hyp", "hyp.txt", "--raw", "data/raw", "--out", "metrics/score.json"])
    assert not (workspace / "metrics" / "score.json").exists()


def test_paper_reference_is_read_tokenised_and_only_compound_split(workspace):
    """score.paper_reference: the tokenised reference of the paper's script, used for bleu_paper only."""
    ref = workspace / "data" / "raw" / "test.de"
    hyps = read_lines(ref)
    (workspace / "hyp.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    # The reference as Moses would tokenise it, but with every line's final period dropped: bleu_paper must
    # read this file as it is (no re-tokenisation) and fall below 100, while sacreBLEU stays at 100.
    tokenised = [paper_tokenize(r, "de").removesuffix(" .") for r in hyps]
    (workspace / "ref.tok.de").write_text("".join(t + "\n" for t in tokenised), encoding="utf-8")
    write_params(workspace, mlflow_store(), score={"paper_reference": "ref.tok.de"})
    stage.main(["--hyp", "hyp.txt", "--raw", "data/raw", "--out", "metrics/score.json"])
    result = json.loads((workspace / "metrics" / "score.json").read_text())
    assert result["bleu"] == 100.0 and result["bleu_paper"] < 100.0
    assert result["bleu_paper"] == bleu_paper(hyps, tokenised, "de", refs_tokenized=True)["bleu_paper"]


def test_identical_output_scores_100_and_case_only_matters_to_cased_bleu():
    refs = ["Ein Hund läuft über das Gras.", "Zwei Kinder spielen im Schnee-Park.", "Eine Frau liest."]
    assert {k: v for k, v in metrics.score(refs, refs).items() if not isinstance(v, str)} == {
        "sentences": 3,
        "bleu": 100.0,
        "chrf": 100.0,
        "bleu_paper": 100.0,
        "bleu_tok_lc": 100.0,
    }
    upper = metrics.score([r.upper() for r in refs], refs)
    assert upper["bleu"] < 50 and upper["bleu_tok_lc"] == 100.0


def test_a_perfect_system_has_no_uncertainty_and_a_worse_one_does():
    refs = ["Ein Hund läuft über das Gras.", "Zwei Kinder spielen im Schnee-Park.", "Eine Frau liest ein Buch."]
    # Every resample of a perfect output is itself perfect: mean 100, interval 0.
    perfect = metrics.score(refs, refs, bootstrap=200)
    assert (perfect["bleu_bootstrap_mean"], perfect["bleu_ci95"]) == (100.0, 0.0)
    assert "bs:200" in perfect["bleu_ci95_signature"] and "bs:" not in perfect["bleu_signature"]
    # One sentence wrong: resamples with more or fewer copies of it score differently.
    mixed = metrics.score([refs[0], refs[1], "Ein Mann schläft."], refs, bootstrap=200)
    assert mixed["bleu_ci95"] > 0
    assert "bleu_ci95" not in metrics.score(refs, refs, bootstrap=0)


def test_bleu_paper_splits_compounds_and_tokenises_as_moses_does():
    # "Schnee-Park" vs "Schnee-Garten": nothing in common as one 13a token, two of three tokens once split.
    refs, hyps = ["Kinder spielen im Schnee-Park heute ."], ["Kinder spielen im Schnee-Garten heute ."]
    result = metrics.score(hyps, refs)
    assert result["bleu_paper"] > result["bleu"]
    assert result == {**result, **bleu_paper(hyps, refs, "de")}


def test_summary_prints_the_scores_and_how_to_open_the_ui(workspace):
    from pipeline.commands.summary import summary

    scores = {"split": "test", **metrics.score(["Ein Hund läuft."], ["Ein Hund läuft."], bootstrap=100)}
    text = summary(scores, f"sqlite:///{workspace}/mlflow.db", "nothing-here")
    assert "BLEU  100.00   sacreBLEU nrefs:1|case:mixed|eff:no|tok:13a" in text
    assert "BLEU ± 0.00 at 95%" in text and "--paired-bs" in text
    assert "chrF  100.00" in text and "100.00  the paper's BLEU (get_ende_bleu.sh" in text
    ui = f"mlflow ui --backend-store-uri sqlite:///{workspace}/mlflow.db --host 127.0.0.1 --port 5000 --workers 1"
    assert ui in text and "'Model training' switch" in text
