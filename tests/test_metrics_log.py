"""metrics.jsonl and TensorBoard scalars of an evaluation report, nested objects included."""

from __future__ import annotations

import json

from prvr_jax.train import metrics_log

REPORT = {"R@1": 10.0, "SumR": 150.0, "MedR": 4.0, "MnR": 9.5, "num_queries": 12,
          "clip": {"SumR": 120.0, "MedR": 6.0}, "frame": {"SumR": 130.0, "MedR": 5.0},
          "moment": {"queries": 12, "mIoU": 31.0, "R@1,IoU>=0.5": 8.0, "uniform": {"mIoU": 22.0}}}


def test_every_float_of_a_nested_report_is_a_scalar():
  tags = dict(metrics_log._scalars(REPORT, "val"))  # pylint: disable=protected-access
  assert tags == {"val/R@1": 10.0, "val/SumR": 150.0, "val/MedR": 4.0, "val/MnR": 9.5,
                  "val/clip/SumR": 120.0, "val/clip/MedR": 6.0, "val/frame/SumR": 130.0,
                  "val/frame/MedR": 5.0, "val/moment/mIoU": 31.0, "val/moment/R@1,IoU>=0.5": 8.0,
                  "val/moment/uniform/mIoU": 22.0}


def test_eval_line_in_metrics_jsonl(tmp_path):
  log = metrics_log.MetricsLog(str(tmp_path))
  log.write_eval(7, "val", REPORT)
  log.close()
  line = json.loads((tmp_path / metrics_log.METRICS_FILE).read_text())
  assert line == dict(REPORT, step=7, split="val")
  assert list((tmp_path / metrics_log.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
