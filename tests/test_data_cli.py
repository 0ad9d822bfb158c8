"""`zsad data` on the command line: exit codes and one-line errors."""
import pytest

from zsad_core.cli import main


def test_list_shows_every_manifest(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["id", "domain", "cat", "train"]
    mvtec = next(line for line in out if line.startswith("mvtec_ad "))
    assert mvtec.split()[:6] == ["mvtec_ad", "industrial", "15", "3629", "467", "1258"]
    assert len(out) == 31


def test_synth_then_verify_ok_then_mismatch(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--size", "1,1,2,64", "--domains", "synth_medical",
                 "--no-progress"]) == 0
    assert "synth_medical: " in capsys.readouterr().out
    manifest = out / "synth_medical" / "manifest.json"
    assert main(["data", "verify", str(manifest), "--no-progress"]) == 0  # --root defaults to the manifest's folder
    assert capsys.readouterr().out.splitlines()[-1] == "OK: 2/2 categories OK, 0 problem(s), 0 warning(s)"
    (out / "synth_medical/tissue/ground_truth/necrosis/000_mask.png").unlink()
    report = tmp_path / "report.json"
    assert main(["data", "verify", str(manifest), "--root", str(out / "synth_medical"), "--no-progress",
                 "--report", str(report)]) == 1
    text = capsys.readouterr().out
    assert "tissue/ground_truth/necrosis/000_mask.png: missing mask of anomalous image tissue/test/necrosis/000.png" in text
    assert '"ok": false' in report.read_text()


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "verify", "mvtec"]) == 2
    assert capsys.readouterr().err.startswith("zsad data: error: unknown dataset 'mvtec'; known: ")
    assert main(["data", "verify", "mvtec_ad"]) == 2
    assert "--root is required" in capsys.readouterr().err
    assert main(["data", "verify", "mvtec_ad", "--root", str(tmp_path / "none"), "--no-progress"]) == 1
    assert "no such folder; fix: extract the dataset there" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(tmp_path), "--size", "huge"]) == 2
    assert "size 'huge': use smoke, small, full or TRAIN,GOOD,ANOMALOUS[,PX]" in capsys.readouterr().err


def test_help_describes_the_actions(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert "split_csv/1cls.csv" in capsys.readouterr().out
