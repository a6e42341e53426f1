"""benchmarks/solver_sweep.py (issue 23): a dry run on the session's tiny model. Each row's FD
ratio is its FD over the reference's FD of the same seed; the rows run in the order of the
call budgets asked for; the best row per budget is recommended; nothing is overwritten."""

import json
import os

import pytest

from benchmarks import solver_sweep


def test_a_dry_run_scores_every_plan_against_the_reference_of_its_seed(
    straight_run, tiny_classifier_dir, tmp_path, capsys
):
    workdir, _ = straight_run
    out = str(tmp_path / "sweep.md")
    argv = ["--workdir", workdir, "--per_class", "2", "--seeds", "0,1", "--calls", "3,2",
            "--solvers", "dpmpp2m", "--spacings", "uniform,logsnr", "--reference", "ddim:6",
            "--classifier_dir", tiny_classifier_dir, "--w", "1", "--out", out]
    assert solver_sweep.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.load(open(os.path.join(tmp_path, "sweep.json")))
    refs = [r["fd"] for r in result["reference"]]
    assert len(refs) == 2 and result["reference_plan"] == "ddim6"
    rows = result["rows"]
    assert [(r["calls"], r["solver"], r["spacing"]) for r in rows] == [
        (3, "dpmpp2m", "uniform"), (3, "dpmpp2m", "logsnr"),
        (2, "dpmpp2m", "uniform"), (2, "dpmpp2m", "logsnr"),
    ]
    for r in rows:
        expected = [fd / ref for fd, ref in zip(r["fd"], refs, strict=True)]
        assert r["ratio"] == pytest.approx(expected)
        assert r["ratio_min"] <= r["ratio_mean"] <= r["ratio_max"]
        assert r["s_per_1000"] > 0  # the sampling time, after compiling
    best3 = min((r for r in rows if r["calls"] == 3), key=lambda r: r["ratio_mean"])
    table = open(out).read()
    assert "Recommended setting per call budget" in table
    assert f"| 3 | {best3['solver']} ({best3['spacing']}) | {best3['ratio_mean']:.3f}" in table
    # rows are printed as they finish, before the recommendation
    assert printed.index("| dpmpp2m | logsnr | 2 |") < printed.index("Recommended setting")

    with pytest.raises(SystemExit) as err:  # an existing report is never replaced by mistake
        solver_sweep.main(argv)
    assert err.value.code == 2 and "pass --overwrite" in capsys.readouterr().err

    # --reference_from: the reference's scores come from the report, and a row scores as it did
    # when the reference was sampled in the same run
    reuse = ["--calls", "2", "--spacings", "logsnr",
             "--reference_from", str(tmp_path / "sweep.json")]
    assert solver_sweep.main(argv[:-1] + [str(tmp_path / "again.md")] + reuse) == 0
    reused = json.load(open(tmp_path / "again.json"))
    assert [r["fd"] for r in reused["reference"]] == refs
    assert reused["reference_key"] == result["reference_key"]
    (row,) = reused["rows"]
    (before,) = [r for r in rows if (r["calls"], r["spacing"]) == (2, "logsnr")]
    assert row["fd"] == pytest.approx(before["fd"])
    assert row["ratio"] == pytest.approx(before["ratio"])
    assert "scores reused from" in open(tmp_path / "again.md").read()
    capsys.readouterr()
    # another guidance weight is another reference: refused before sampling, naming the entry
    other = argv[:-3] + ["0.5", "--out", str(tmp_path / "w.md")] + reuse
    with pytest.raises(SystemExit) as err:
        solver_sweep.main(other)
    message = capsys.readouterr().err
    assert err.value.code == 2 and "w: report 1.0, now 0.5" in message
    assert "drop --reference_from" in message and not os.path.exists(tmp_path / "w.md")


def test_reference_from_a_file_that_is_no_report_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        solver_sweep.read_reference(str(tmp_path / "missing.json"))
    (tmp_path / "old.json").write_text(json.dumps({"reference": []}))  # before reference_key
    with pytest.raises(ValueError, match="no solver_sweep report with a reference_key"):
        solver_sweep.read_reference(str(tmp_path / "old.json"))


def test_unknown_solvers_and_spacings_are_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as err:
        solver_sweep.parse_args(["--solvers", "dpmpp2m,heun"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "unknown solver or spacing ['heun']" in message and "dpmpp2m" in message
