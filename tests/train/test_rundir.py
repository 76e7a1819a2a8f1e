"""Run-directory files that other processes read (summary, metrics history, reports) are replaced
whole or not at all."""

import pytest

from moelab.files import write_atomic
from moelab.train.rundir import MetricsLog, read_metrics


def test_a_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, '{"val_loss": 4.5}')
    with pytest.raises(UnicodeEncodeError):  # fails after much of the text is already out
        write_atomic(path, '{"val_loss": ' + "1" * 100_000 + "\ud800}")
    assert path.read_text() == '{"val_loss": 4.5}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


def test_resumed_metrics_keep_the_records_up_to_the_step_and_drop_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"step": step, "split": "train", "loss": 1.0 / step})
    log.close()
    with path.open("a") as fh:
        fh.write('{"step": 4, "split": "tr')
    MetricsLog(path, keep_until_step=2).close()
    assert read_metrics(path) == [{"step": 1, "split": "train", "loss": 1.0},
                                  {"step": 2, "split": "train", "loss": 0.5}]
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 2
