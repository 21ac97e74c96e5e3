"""`self-train` end to end on a real local Ray: the README's command (two rounds on the synthetic
set), then a re-run with another rule."""

import json

import pyarrow.csv as pacsv
import pytest
from readme import command, run_in_process

pytestmark = pytest.mark.slow


def test_two_rounds_report_both_and_keep_the_best_head(ray_local, tmp_path, capsys):
    for prefix in ("./dinoseg synthetic ./syn", "./dinoseg synthetic ./more"):
        assert run_in_process(command(prefix), tmp_path) == 0
    more = sorted(str(p) for p in (tmp_path / "more" / "train" / "images").glob("*.png"))
    argv = command("./dinoseg self-train ./syn/train/images")
    out = tmp_path / argv[argv.index("--output") + 1]
    assert run_in_process(argv, tmp_path) == 0
    result = json.loads((out / "self_train.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in result["rounds"]] == [0, 1] and rounds == result["rounds"]
    r0, r1 = rounds
    assert r0["labeled_pairs"] == r1["labeled_pairs"] == 48 and r0["pseudo_pairs"] == 0
    assert 0 < r1["pseudo_pairs"] <= len(more) == 24 and 0 < r1["mean_coverage"] <= 1
    assert all(0 <= r["val_miou"] <= 1 for r in rounds)
    assert set(r1["thresholds"]) == {"background", "disc", "square", "triangle", "ring"}
    # round 1 trained on the labeled pairs plus its pseudo-labels, which come from the unlabeled images only
    pairs = pacsv.read_csv(out / "round-1" / "pairs.csv").to_pylist()
    assert len(pairs) == 48 + r1["pseudo_pairs"]
    assert sum("round-1/pseudo/masks" in p["mask"] for p in pairs) == r1["pseudo_pairs"]
    assert {p["image"] for p in pairs if "pseudo" in p["mask"]} <= set(more)
    best = max(rounds, key=lambda r: r["val_miou"])
    assert result["best_round"] == best["round"] and sum(r["best"] for r in rounds) in (1, 2)
    assert (out / "head.pt").read_bytes() == (out / f"round-{best['round']}" / "train" / "head.pt").read_bytes()
    table = capsys.readouterr().out
    assert "round" in table and "val mIoU" in table and f"best: round {best['round']}" in table

    # re-run with another rule: round 0 is finished and kept as it is; round 1's pairs changed, so it
    # is pseudo-labeled again from raw/ and trained again from scratch
    last0 = (out / "round-0" / "train" / "last.pt").stat().st_mtime_ns
    last1 = (out / "round-1" / "train" / "last.pt").stat().st_mtime_ns
    assert run_in_process(argv + ["--class-balanced", "0.2", "--min-coverage", "0.05"], tmp_path) == 0
    again = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert again[0]["val_miou"] == r0["val_miou"] and again[0]["head"] == r0["head"]
    assert (out / "round-0" / "train" / "last.pt").stat().st_mtime_ns == last0
    assert (out / "round-1" / "train" / "last.pt").stat().st_mtime_ns != last1
    assert again[1]["rule"] == {"rule": "class-balanced", "fraction": 0.2}
    assert json.loads((out / "round-1" / "inputs.json").read_text())["pairs_sha256"] != ""
