"""Outcome parity: trains the authors' code and prvr_jax on the same data, many seeds, and compares.

  MSC_PRVR_SRC=/path/to/MSC_PRVR/src python -m tests.reference.compare_training \\
      --out runs/compare [--seeds 0,1,2,3,4,5,6,7] [--epochs 5] [--codes authors,ours]

On two cores, run the codes in two processes at once (one thread each) and summarise both:

  ... compare_training --out runs/authors --codes authors &
  ... compare_training --out runs/ours --codes ours; wait
  ... compare_training --out runs/ours --codes ours --also runs/authors

Runs made elsewhere (their results.jsonl files) are summarised without training by
`--results FILE` (repeatable), e.g. the committed tests/reference/outcome_runs.jsonl.

The data: the synthetic benchmark (prvr_jax.data.synthetic) with 512 train / 200 val videos,
256-d visual and text features and noisier frames and captions than the default (`SPEC`), written in the authors' TVR layout
(prvr_jax.data.export_layout), so both codes read the same files. The protocol (as the authors
train TVR, shrunk to run on a CPU): hidden size 128, batch 32 videos with all their captions
(16 steps per epoch), `--epochs` epochs, BertAdam lr 3e-4 with 1 % warm-up then linear decay,
dropout 0.2, the TVR loss settings (margin 0.1, NCE 0.05 / 0.04, TCPL 15 / 30, CBVA 0.1,
tau 0.8, sft_factor 0.09), no hard negatives (they start at epoch 20), validation after every
epoch. A seed sets everything random in a run (initial weights, data order, dropout,
negatives) in both codes.

The authors' code runs in this process through tests/reference/authors_code.py (their `main()`,
unmodified); prvr_jax runs as `python -m prvr_jax.main` in a subprocess. Each finished run is
stored in `--out/results.jsonl` (one line per code and seed: val SumR, R@k, clip and frame SumR
per epoch), so an interrupted comparison continues where it stopped. At the end the table of
mean val SumR per epoch, the final recalls and the statistics (difference of means in pooled
seed standard deviations, Welch's t-test, and the ratio of the spreads with its F-test) are
printed and written to `--out/summary.json` (curves and distributions drawn in
`--out/outcomes.png`). The spreads are compared with the F-test and with
tests that do not assume normal outcomes (`spread_tests`: Brown-Forsythe, a permutation test of the
sd ratio, its bootstrap interval), with Shapiro-Wilk's test saying whether the F-test applies:
final SumRs over seeds have a long low tail (a slowly starting run ends lower, in both codes), on
which the F-test rejects equal spreads far more often than its nominal level. The per-epoch
Kolmogorov-Smirnov p-values say whether the two codes' SumRs over seeds have one distribution at
every epoch (e.g. whether slow starts are as common).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from prvr_jax.data import synthetic
from prvr_jax.data.export_layout import export_synthetic
from tests.reference import authors_code

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Noisier frames and captions than the embedded default, on which both codes saturate (val SumR
# ~341 of 400 by epoch 2, so every seed looks alike): here training ends near 200-250.
SPEC = dict(num_train_videos=512, num_val_videos=200, num_test_videos=0, visual_dim=256,
            text_dim=256, frame_noise=2.5, caption_noise=1.0)
HIDDEN, BATCH, LR, DROPOUT = 128, 32, 3e-4, 0.2
TVR_LOSS = dict(margin=0.1, nce=(0.05, 0.04), rkd=(15.0, 30.0), cbva=0.1, sim_thr=0.8, sft=0.09)
RECALLS = ("R@1", "R@5", "R@10", "R@100", "SumR")
# Threads per code. One each: the results do not depend on it, and on a shared machine torch's
# OpenMP threads spin-wait for each other (many times slower than one thread).
THREADS = int(os.environ.get("PRVR_COMPARE_THREADS", "1"))


def _data_digest(data_root: pathlib.Path) -> str:
  """SHA-256 over the written dataset's files (names and bytes; not the `results/` the authors'
  code writes beside them), to tell two runs' data apart."""
  digest = hashlib.sha256()
  files = [p for d in ("FeatureData", "TextData") for p in (data_root / "tvr" / d).rglob("*")]
  for path in sorted(p for p in files if p.is_file()):
    digest.update(str(path.relative_to(data_root)).encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()


def _row(values: Sequence[float]) -> dict[str, float]:
  return dict(zip(RECALLS, (float(v) for v in values)))


def run_authors(data_root: pathlib.Path, seed: int, epochs: int, workdir: pathlib.Path) -> list[dict]:
  """The authors' main() for one seed; per epoch {fused R@k, clip, frame}."""
  src = authors_code.source_dir()
  if src is None:
    raise SystemExit(f"error: set {authors_code.ENV_VAR} to the authors' MSC_PRVR/src folder")
  authors = authors_code.load(src)
  torch.set_num_threads(THREADS)
  authors_code.tvr_config(
      authors, data_root, seed=seed, batchsize=BATCH, n_epoch=epochs, hidden_size=HIDDEN,
      visual_feat_dim=SPEC["visual_dim"], q_feat_size=SPEC["text_dim"], lr=LR,
      input_drop=DROPOUT, drop=DROPOUT, margin=TVR_LOSS["margin"],
      loss_factor=[TVR_LOSS["nce"][0], TVR_LOSS["nce"][1], 8e-5, 0.09], sft_factor=TVR_LOSS["sft"])
  # main() copies these from its command line into the config.
  args = authors.main.args
  args.model_name = f"{workdir.name}"
  args.vl_coef, args.sim_thr = TVR_LOSS["cbva"], TVR_LOSS["sim_thr"]
  args.rkd_d_coef, args.rkd_a_coef = TVR_LOSS["rkd"]
  args.eval, args.resume, args.map_size = False, "", 128
  epochs_seen: list[dict] = []
  validations = authors.validations.validations
  real_forward = validations.forward

  def forward(self, *a, **k):
    fused, clip, frame = real_forward(self, *a, **k)
    epochs_seen.append(dict(_row(fused), clip=_row(clip), frame=_row(frame)))
    return fused, clip, frame

  validations.forward = forward
  try:
    authors.main.main()
  except SystemExit:  # their early stop calls exit(0)
    pass
  finally:
    validations.forward = real_forward
  return epochs_seen


def run_ours(data_root: pathlib.Path, seed: int, epochs: int, workdir: pathlib.Path) -> list[dict]:
  """`python -m prvr_jax.main` for one seed; per epoch {fused R@k, clip, frame} on val."""
  cmd = [sys.executable, "-m", "prvr_jax.main", "--config=configs/tvr.py", f"--workdir={workdir}",
         f"--config.data.root={data_root}", f"--config.seed={seed}",
         f"--config.data.batch_size={BATCH}", f"--config.model.hidden_size={HIDDEN}",
         "--config.model.visual_input_size=0", "--config.model.query_input_size=0",
         f"--config.model.dropout={DROPOUT}", f"--config.model.input_dropout={DROPOUT}",
         f"--config.model.sft_factor={TVR_LOSS['sft']}", f"--config.optim.lr={LR}",
         f"--config.loss.margin={TVR_LOSS['margin']}",
         f"--config.loss.clip_nce_weight={TVR_LOSS['nce'][0]}",
         f"--config.loss.frame_nce_weight={TVR_LOSS['nce'][1]}",
         f"--config.loss.tcpl_distance_weight={TVR_LOSS['rkd'][0]}",
         f"--config.loss.tcpl_angle_weight={TVR_LOSS['rkd'][1]}",
         f"--config.loss.cbva_weight={TVR_LOSS['cbva']}", f"--config.loss.sim_thr={TVR_LOSS['sim_thr']}",
         f"--config.train.num_epochs={epochs}", "--config.eval.every=0",
         "--config.eval.diagnostics=False", "--config.eval.final_splits=()"]
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  if THREADS == 1:
    env.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"prvr_jax run failed (seed {seed}):\n{proc.stderr[-3000:]}")
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [dict({k: r[k] for k in RECALLS}, clip=r["clip"], frame=r["frame"])
          for r in rows if r.get("split") == "val"]


RESAMPLES = 20000  # permutation and bootstrap draws of the spread statistics
RESAMPLE_SEED = 0
CODES = ("authors", "ours")


def _known_codes(codes: Any) -> list[str]:
  """The codes among `codes` that this comparison knows, in CODES order."""
  return sorted(set(codes) & set(CODES), key=CODES.index)


def _f_test_p(var_ratio: Any, df_a: int, df_b: int) -> Any:
  """Two-sided F-test p-value(s) of var_a / var_b (scalar or array) with (df_a, df_b)."""
  return 2 * np.minimum(stats.f.cdf(var_ratio, df_a, df_b), stats.f.sf(var_ratio, df_a, df_b))


def spread_tests(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES,
                 seed: int = RESAMPLE_SEED) -> dict[str, Any]:
  """Tests of "b spreads over seeds like a" that do not assume normal outcomes.

  Final SumRs over seeds are skewed with a long low tail (a run that starts slowly ends lower), and
  the F-test's level is far from nominal on such data; these do not need normality:

  * `permutation_p`: both samples centred on their medians, then the two-sided permutation test of
    |log(sd_b / sd_a)| (the share of `resamples` random relabellings at least as extreme);
  * `sd_ratio_ci`: the percentile bootstrap 95 % interval of sd_b / sd_a (each sample resampled
    with replacement);
  * `shapiro_p`: Shapiro-Wilk's test of normality per sample (a small p: the F-test's assumption
    fails and its p-value is not to be read as a level);
  * `f_test_level`: how often the F-test rejects equal spreads at 5 % when both samples are drawn
    from one distribution shaped like these (the pooled, median-centred outcomes, by the same
    relabellings): its real level on such data.

  Args:
    a, b: (n_a,), (n_b,) per-seed outcomes of the two codes.
    resamples, seed: draws and generator seed (fixed: the same inputs give the same numbers).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  rng = np.random.default_rng(seed)
  log_ratio = lambda x, y: np.log(np.std(y, ddof=1, axis=-1) / np.std(x, ddof=1, axis=-1))
  observed = float(log_ratio(a, b))
  pool = np.concatenate([a - np.median(a), b - np.median(b)])
  # (resamples, n_a + n_b): each row a random relabelling of the pooled, centred outcomes.
  shuffled = rng.permuted(np.broadcast_to(pool, (resamples, pool.size)), axis=1)
  permuted = log_ratio(shuffled[:, :a.size], shuffled[:, a.size:])
  # A bootstrap draw of a few seeds can repeat one value (sd 0).
  with np.errstate(divide="ignore", invalid="ignore"):
    boot = log_ratio(rng.choice(a, (resamples, a.size)), rng.choice(b, (resamples, b.size)))
  # var_a / var_b of each relabelling.
  f_p = _f_test_p(np.exp(-2 * permuted), a.size - 1, b.size - 1)
  return dict(permutation_p=float(np.mean(np.abs(permuted) >= abs(observed) - 1e-12)),
              f_test_level=float(np.mean(f_p < 0.05)),
              sd_ratio_ci=[float(v) for v in np.exp(np.percentile(boot, [2.5, 97.5]))],
              shapiro_p=[float(stats.shapiro(a).pvalue), float(stats.shapiro(b).pvalue)])


def _summary(results: list[dict], codes: Sequence[str], epochs: int) -> dict[str, Any]:
  by_code = {c: [r for r in results if r["code"] == c] for c in codes}
  out: dict[str, Any] = {"seeds": {c: [r["seed"] for r in rs] for c, rs in by_code.items()}}
  # (seeds, epochs) val SumR per code.
  curves = {c: np.array([[e["SumR"] for e in r["epochs"]] for r in rs])
            for c, rs in by_code.items()}
  for code, rs in by_code.items():
    final = np.array([[r["epochs"][-1][k] for k in RECALLS] for r in rs])
    out[code] = dict(
        mean_sumr_per_epoch=curves[code].mean(0).tolist(),
        final_mean=dict(zip(RECALLS, final.mean(0).tolist())),
        final_sd=float(np.std(curves[code][:, -1], ddof=1)) if len(rs) > 1 else 0.0,
        final_range=[float(curves[code][:, -1].min()), float(curves[code][:, -1].max())],
        clip_sumr=float(np.mean([r["epochs"][-1]["clip"]["SumR"] for r in rs])),
        frame_sumr=float(np.mean([r["epochs"][-1]["frame"]["SumR"] for r in rs])))
  if len(codes) == 2 and all(len(by_code[c]) > 1 for c in codes):
    a, b = (curves[c][:, -1] for c in codes)
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1))
                       / (len(a) + len(b) - 2))
    f = a.var(ddof=1) / b.var(ddof=1)
    f_p = _f_test_p(f, len(a) - 1, len(b) - 1)
    out["comparison"] = dict(
        difference=float(b.mean() - a.mean()), pooled_sd=pooled,
        difference_in_pooled_sd=float((b.mean() - a.mean()) / pooled) if pooled > 0 else 0.0,
        welch_p=float(stats.ttest_ind(b, a, equal_var=False).pvalue),
        sd_ratio=float(math.sqrt(1 / f)), f_test_p=float(f_p),
        # The F-test assumes normal outcomes and is driven by single outlying seeds; the
        # Brown-Forsythe test (Levene's, median-centred) is its robust counterpart.
        brown_forsythe_p=float(stats.levene(a, b, center="median").pvalue),
        below_authors_min=int(np.sum(b < a.min())), **spread_tests(a, b),
        # Per epoch: do the two codes' SumRs over seeds have one distribution (two-sample
        # Kolmogorov-Smirnov)? The early epochs show whether slow starts are as common.
        ks_p_per_epoch=[float(stats.ks_2samp(*(curves[c][:, e] for c in codes)).pvalue)
                        for e in range(epochs)])
  return out


def plot_outcomes(results: list[dict], codes: Sequence[str], path: pathlib.Path) -> None:
  """PNG: val SumR per epoch of every seed (thin) and the mean (thick) per code, and the
  empirical distribution of the final SumR per code."""
  # pylint: disable=import-outside-toplevel  # matplotlib only when a plot is drawn
  from matplotlib.figure import Figure
  from prvr_jax.eval import plots
  # pylint: enable=import-outside-toplevel
  fig = Figure(figsize=(11, 4.2))
  curves_ax, ecdf_ax = fig.subplots(1, 2)
  for code, colour in zip(codes, ("tab:blue", "tab:orange")):
    curves = np.array([[e["SumR"] for e in r["epochs"]] for r in results if r["code"] == code])
    curves_ax.plot(curves.T, color=colour, alpha=0.15, linewidth=0.8)
    curves_ax.plot(curves.mean(0), color=colour, linewidth=2.5,
                   label=f"{code} (mean of {len(curves)})")
    final = np.sort(curves[:, -1])
    ecdf_ax.step(final, np.arange(1, len(final) + 1) / len(final), where="post", color=colour,
                 label=f"{code}: mean {final.mean():.1f}, sd {final.std(ddof=1):.1f}")
  curves_ax.set(xlabel="epoch", ylabel="val SumR", title="val SumR per seed",
                xticks=range(len(results[0]["epochs"])))
  ecdf_ax.set(xlabel="final val SumR", ylabel="share of seeds", title="final SumR over seeds")
  curves_ax.legend(loc="lower right")
  ecdf_ax.legend(loc="upper left")
  fig.tight_layout()
  plots.save_png(fig, path)


def _print(summary: dict[str, Any], codes: Sequence[str], epochs: int) -> None:
  print("val SumR, mean over seeds")
  print("| code | seeds | " + " | ".join(f"epoch {e}" for e in range(epochs)) + " | final sd |")
  print("|---|---|" + "---|" * (epochs + 1))
  for c in codes:
    s = summary[c]
    curve = " | ".join(f"{v:.1f}" for v in s["mean_sumr_per_epoch"])
    print(f"| {c} | {len(summary['seeds'][c])} | {curve} | {s['final_sd']:.2f} |")
  for c in codes:
    s = summary[c]
    recalls = " / ".join(f"{s['final_mean'][k]:.1f}" for k in RECALLS[:4])
    print(f"{c}: final R@1/5/10/100 {recalls}, clip SumR {s['clip_sumr']:.1f}, "
          f"frame SumR {s['frame_sumr']:.1f}, range {s['final_range'][0]:.1f}-{s['final_range'][1]:.1f}")
  if "comparison" in summary:
    c = summary["comparison"]
    print(f"{codes[1]} - {codes[0]}: {c['difference']:+.2f} SumR = {c['difference_in_pooled_sd']:+.2f} "
          f"pooled sd ({c['pooled_sd']:.2f}); Welch p = {c['welch_p']:.3f}; sd ratio "
          f"{c['sd_ratio']:.2f} (F-test p = {c['f_test_p']:.3f}, Brown-Forsythe p = "
          f"{c['brown_forsythe_p']:.3f}); {c['below_authors_min']} of {codes[1]}'s seeds end below "
          f"{codes[0]}'s lowest")
    print(f"spread without assuming normal outcomes: permutation p = {c['permutation_p']:.3f}, "
          f"bootstrap 95 % interval of the sd ratio {c['sd_ratio_ci'][0]:.2f}-"
          f"{c['sd_ratio_ci'][1]:.2f}; Shapiro-Wilk normality p = {c['shapiro_p'][0]:.3g} "
          f"({codes[0]}), {c['shapiro_p'][1]:.3g} ({codes[1]}); on one distribution shaped like "
          f"these the F-test rejects at 5 % in {100 * c['f_test_level']:.0f} % of draws")
    print("same distribution of SumR over seeds per epoch (Kolmogorov-Smirnov p): "
          + " / ".join(f"{p:.2f}" for p in c["ks_p_per_epoch"]))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--codes", default="authors,ours")
  parser.add_argument("--spec", action="append", default=[], metavar="KEY=VALUE",
                      help="override a SyntheticSpec field of the data (repeatable)")
  parser.add_argument("--also", action="append", default=[], type=pathlib.Path, metavar="OUT",
                      help="also read the finished runs of another --out directory (e.g. the "
                           "other code, run in a second process on the same data); repeatable")
  parser.add_argument("--results", action="append", default=[], type=pathlib.Path, metavar="FILE",
                      help="train nothing: summarise these results.jsonl files (all their seeds; "
                           "a later line of a code and seed replaces an earlier one) into --out")
  args = parser.parse_args(argv)
  if args.results:
    return _summarise_files(args.results, args.out, args.epochs)
  seeds = [int(s) for s in args.seeds.split(",")]
  codes = args.codes.split(",")
  unknown = sorted(set(codes) - set(CODES))
  if unknown:
    print(f"error: --codes: unknown {unknown}", file=sys.stderr)
    return 2
  spec = dict(SPEC)
  for item in args.spec:
    key, _, value = item.partition("=")
    spec[key] = type(getattr(synthetic.SyntheticSpec(), key))(value)
  data_root = args.out / "data"
  if not (data_root / "tvr").is_dir():
    export_synthetic(data_root, "tvr", synthetic.SyntheticSpec(**spec))
  results_file = args.out / "results.jsonl"
  results = ([json.loads(l) for l in results_file.read_text().splitlines()]
             if results_file.exists() else [])
  done = {(r["code"], r["seed"]) for r in results}
  for seed in seeds:
    for code in codes:
      if (code, seed) in done:
        continue
      workdir = args.out / f"{code}_seed{seed}"
      runner = run_authors if code == "authors" else run_ours
      epochs = runner(data_root.resolve(), seed, args.epochs, workdir.resolve())
      row = dict(code=code, seed=seed, epochs=epochs)
      results.append(row)
      with results_file.open("a") as f:
        f.write(json.dumps(row) + "\n")
      print(f"{code} seed {seed}: val SumR per epoch " + " ".join(f"{e['SumR']:.1f}" for e in epochs),
            flush=True)
  for other in args.also:
    other_file = other / "results.jsonl"
    if not other_file.exists():
      print(f"error: --also {other}: no results.jsonl there", file=sys.stderr)
      return 2
    if _data_digest(other / "data") != _data_digest(data_root):
      print(f"error: --also {other}: its data differ from {data_root} (other --spec?)",
            file=sys.stderr)
      return 2
    results += [json.loads(l) for l in other_file.read_text().splitlines()]
  codes = _known_codes(r["code"] for r in results)
  results = [r for r in results if r["seed"] in seeds and r["code"] in codes]
  _write_summary(results, codes, args.out, args.epochs)
  return 0


def _write_summary(results: list[dict], codes: Sequence[str], out: pathlib.Path,
                   epochs: int) -> None:
  summary = _summary(results, codes, epochs)
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  plot_outcomes(results, codes, out / "outcomes.png")
  _print(summary, codes, epochs)
  print(f"wrote {out / 'summary.json'} and {out / 'outcomes.png'}")


def _summarise_files(files: Sequence[pathlib.Path], out: pathlib.Path, epochs: int) -> int:
  rows: dict[tuple[str, int], dict] = {}
  for path in files:
    if not path.is_file():
      print(f"error: --results {path}: no such file", file=sys.stderr)
      return 2
    for number, line in enumerate(path.read_text().splitlines(), 1):
      try:
        row = json.loads(line)
        key = (row["code"], int(row["seed"]))
        if len(row["epochs"]) != epochs:
          raise ValueError(f"{len(row['epochs'])} epochs, --epochs is {epochs}")
      except (ValueError, KeyError, TypeError) as e:
        print(f"error: --results {path} line {number}: not a run of this comparison ({e})",
              file=sys.stderr)
        return 2
      rows[key] = row
  codes = _known_codes(c for c, _ in rows)
  if not codes:
    print("error: --results: no runs of 'authors' or 'ours' in the files", file=sys.stderr)
    return 2
  _write_summary(sorted(rows.values(), key=lambda r: (r["code"], r["seed"])), codes, out, epochs)
  return 0


if __name__ == "__main__":
  sys.exit(main())
