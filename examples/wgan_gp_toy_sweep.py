"""Compare WGAN critic regularizers on a toy set under one budget, and report stability, not a lucky end.

Each configuration is a full run of :mod:`examples.wgan_gp_toy` (same networks, optimizer, lr schedule,
EMA, number of generator steps and seed; only ``--model.regularizer`` changes), launched as a separate
process with one torch thread, ``--jobs`` at a time. From each run's ``metrics.csv`` (one row every
``eval_every`` generator steps) the table gives the end of the run *and* the last quarter of it:

- modes captured and % high-quality samples (PacGAN's definitions) at the last evaluation;
- the *fewest* modes and the mean % high quality over the evaluations of the last quarter of the run, so a
  run that oscillates between mode sets shows it;
- W1 to the real distribution (its floor, a perfect generator's score, is in the caption) and wall time.

Run::

    python -m examples.wgan_gp_toy_sweep                         # docs/examples.md's table: 6 regularizers, 25-grid
    python -m examples.wgan_gp_toy_sweep --regularizers '[gp, r1]' --seeds '[0, 1]'
    python -m examples.wgan_gp_toy_sweep --dataset 8gaussians --regularizers '[gp]'

``--extra '[--model.max_generator_steps=3000]'`` passes more options to every run.
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # runs are launched as ``python -m examples.wgan_gp_toy`` from here
REGULARIZERS = ["gp", "gp_one_sided", "r1", "difference", "weight_clipping", "spectral_normalization"]


def run_one(dataset: str, regularizer: str, seed: int, out_dir: Path, extra: list[str]) -> dict:
    """One training run in its own process; returns its summary row (raises with the log on failure)."""
    run_dir = out_dir.resolve() / f"{dataset}-{regularizer}-seed{seed}"
    cmd = [
        sys.executable, "-m", "examples.wgan_gp_toy", "fit",
        f"--model.dataset={dataset}", f"--model.regularizer={regularizer}", f"--model.seed={seed}",
        f"--seed_everything={seed}", f"--model.out_dir={run_dir}", "--trainer.logger=false", *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return summarize(run_dir / "metrics.csv", regularizer=regularizer, seed=seed, seconds=seconds)


def summarize(metrics_csv: Path, **fields) -> dict:
    """The end-of-run and last-quarter statistics of one run's metric curve."""
    with open(metrics_csv) as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{metrics_csv} has no evaluation rows.")
    last = rows[-1]
    tail = [r for r in rows if r["generator_step"] >= 0.75 * last["generator_step"]]
    out = dict(fields, steps=int(last["generator_step"]), w1=last["w1"], w1_floor=last["w1_floor"])
    if "modes_captured" in last:
        out.update(
            modes=int(last["modes_captured"]),
            high_quality=100 * last["high_quality"],
            tail_min_modes=int(min(r["modes_captured"] for r in tail)),
            tail_high_quality=100 * statistics.mean(r["high_quality"] for r in tail),
        )
    return out


def table(results: list[dict], dataset: str, num_modes: int | None) -> str:
    first = results[0]
    lines = [
        f"{dataset}, {first['steps']} generator steps, same seed(s), budget and settings for every row. W1 of "
        f"500 generated against 500 real points; two real samples score {first['w1_floor']:.3f} (a perfect "
        f"generator's value: below it the estimate cannot tell the difference).",
        "",
    ]
    if num_modes is None:
        lines += ["| regularizer | seed | W1 | wall s |", "|---|---:|---:|---:|"]
        lines += [f"| `{r['regularizer']}` | {r['seed']} | {r['w1']:.3f} | {r['seconds']:.0f} |" for r in results]
        return "\n".join(lines)
    lines += [
        f"| regularizer | seed | modes (of {num_modes}) | % HQ | fewest modes, last quarter | % HQ, last quarter "
        "| W1 | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| `{r['regularizer']}` | {r['seed']} | {r['modes']} | {r['high_quality']:.1f} | {r['tail_min_modes']} "
            f"| {r['tail_high_quality']:.1f} | {r['w1']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(
    dataset: str = "25gaussians",
    regularizers: list[str] | None = None,
    seeds: list[int] | None = None,
    jobs: int = 2,
    out_dir: str = "outputs/wgan_toy_sweep",
    extra: list[str] | None = None,
) -> str:
    """Run the sweep and print (and save as ``<out_dir>/<dataset>.md``) the Markdown table.

    Args:
        dataset: ``"8gaussians"``, ``"25gaussians"`` or ``"swissroll"``.
        regularizers: the mixin's ``regularizer`` values to compare (default: the six of docs/examples.md).
        seeds: one run per regularizer and seed (default [0]).
        jobs: runs at a time (each uses one torch thread).
        out_dir: where each run's figures and ``metrics.csv`` go, and the table.
        extra: more ``wgan_gp_toy`` options passed to every run.
    """
    from examples._toy_data import mode_spec

    regularizers = regularizers or REGULARIZERS
    seeds = seeds or [0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = [(reg, seed) for reg in regularizers for seed in seeds]
    results = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_one, dataset, reg, seed, out, extra or []): (reg, seed) for reg, seed in configs}
        for i, future in enumerate(as_completed(futures), 1):
            row = future.result()
            results[futures[future]] = row
            modes = f", {row['modes']} modes, {row['high_quality']:.1f} % HQ" if "modes" in row else ""
            print(f"[{i}/{len(configs)}] {row['regularizer']} seed {row['seed']}: W1 {row['w1']:.3f}{modes}, "
                  f"{row['seconds']:.0f} s", flush=True)
    spec = mode_spec(dataset)
    text = table([results[c] for c in configs], dataset, None if spec is None else len(spec.means))
    (out / f"{dataset}.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
