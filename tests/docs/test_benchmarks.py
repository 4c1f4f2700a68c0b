"""The benchmarks stay runnable: each timed step executes and trains (no timing is asserted here)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_functional import build_steps, main, mlp


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_functional_step_runs_and_updates_the_model(optimizer):
    net = mlp()
    steps = build_steps(torch.device("cpu"), batch=16, optimizer=optimizer, model=net)
    for name, step in steps.items():
        before = [p.detach().clone() for p in net.parameters()]
        step()
        changed = any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
        assert changed or name.startswith("WGAN"), name  # the critic rows train the critic instead


def test_functional_benchmark_prints_a_table_with_its_targets():
    text = main(["--quick", "--threads", "1"])
    assert "| data penalty, finite difference |" in text and "≤ 1.90×" in text and "SGD" in text


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(model, route) → the other cells of a Markdown table's rows."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "model":
            rows[cells[0], cells[1]] = cells[2:]
    return rows


def test_peers_benchmark_has_every_route_and_they_agree():
    pytest.importorskip("opacus", reason="the peers benchmark needs the `bench` extra (opacus is not in `test`)")
    pytest.importorskip("backpack", reason="the peers benchmark needs backpack-for-pytorch")
    from benchmarks.bench_peers import MODELS, ROUTES, build_case
    from benchmarks.bench_peers import main as peers

    text = peers(["--tiny", "--repeats", "1", "--threads", "1", "--no-progress"])
    rows = _rows(text)
    labels = [build_case(name, tiny=True).label for name in MODELS]
    assert len(rows) == len(labels) * len(ROUTES)
    for label in labels:
        for route in ROUTES:
            ratio, _, agreement = rows[label, route]
            if ratio == "n/a":  # only BackPACK lacks a rule (LayerNorm with parameters)
                assert route == "BackPACK BatchL2Grad" and "LayerNorm" in agreement, (label, route, agreement)
            else:
                assert float(ratio) > 0 and float(agreement) <= 1e-4, (label, route, ratio, agreement)
    assert "Verdict" in text and "Method: " in text


def test_attacks_benchmark_is_bitwise_equal_to_torchattacks():
    pytest.importorskip("torchattacks")
    from benchmarks.bench_attacks import main as attacks

    text = attacks(["--tiny", "--repeats", "2", "--threads", "1"])
    assert "Bitwise equal to torchattacks.FGSM: yes" in text and "| lightning_gp fgsm |" in text


def test_monitor_benchmark_runs_the_fused_monitor_on_the_cnn_and_bert():
    pytest.importorskip("transformers")
    from benchmarks.bench_monitors import main as monitors

    text = monitors(["--models", "cnn,bert", "--tiny", "--threads", "1"])
    assert "| CNN (2 conv + 2 linear), batch" in text and "| tiny BERT, T=8, batch 4 |" in text
    assert text.count("≤ 1.25×") == 2


@pytest.mark.ddp
def test_communication_benchmark_counts_the_collectives_of_ddp_and_fsdp2(tmp_path):
    """2 processes: DDP's plain step is one gradient all-reduce; FSDP2's all-gathers each of the 3 Linear units in the
    forward and in the backward and reduce-scatters them in the backward (the root holds no parameter of its own);
    FGM adds an attack pass."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_communication", "--configs",
                           "plain step;FGM (AdversarialTraining)"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["plain step"][:2] == ["1", "0.34"]  # one all-reduce of the 85k float32 gradients
    assert "- plain step, FSDP2: allgather_base 6, reduce_scatter_base 3" in proc.stdout
    assert float(rows["FGM (AdversarialTraining)"][2]) > float(rows["plain step"][2])


def test_gpu_check_runs_as_a_cpu_smoke_test_and_writes_its_report(tmp_path):
    """The one-command GPU check: here the CUDA tier is collected and skipped, the quickest benchmark runs."""
    from benchmarks.gpu_check import main as gpu_check

    out = tmp_path / "report.md"
    report = gpu_check(["--smoke", "--out", str(out)])
    assert out.read_text() == report
    assert "## CUDA tier of the tests\n\npassed" in report and "skipped" in report  # collected, every test skipped
    assert "## finite differences ÷ double backward\n\npassed" in report
    assert "| data penalty, finite difference |" in report  # the benchmark's table, with times and ratios
    assert "skipped: smoke test (no GPU)" in report


def test_callbacks_benchmark_alternates_the_two_sides_and_reports_per_round_ratios(monkeypatch):
    """One round of the SAM rows: both sides timed step by step in the same chunk, every cell a median with its
    spread, and every hand-written step of the chunk run (one per Lightning step)."""
    from benchmarks import bench_callbacks

    monkeypatch.setenv("LGP_BENCH_DEVICES", "cpu")
    text = bench_callbacks.main(["--quick", "--rounds", "1", "--steps", "2", "--threads", "1", "--clock", "cpu",
                                 "--only", "SAM (ρ = 0.05)", "SAM, check_finite=False"])
    comparison = text.split("Lightning steps ÷ plain Lightning step")[0]  # the first of the two tables
    rows = {line.split("|")[1].strip(): line for line in comparison.splitlines() if line.startswith("| ")}
    for name in ("plain", "SAM (ρ = 0.05)", "SAM, check_finite=False"):
        assert name in rows and rows[name].count("(") >= 4, rows.get(name)  # median (low–high) in the ratio cells
    assert "1 rounds × 2 kept steps, cpu clock" in text
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    calls = []
    lit, hand = bench_callbacks.lightning_chunk("SAM (ρ = 0.05)", torch.device("cpu"), (x, y), 3,
                                                lambda: calls.append(1))
    assert len(lit) == len(hand) == len(calls) == 3


def test_callbacks_benchmark_runs_the_robust_baselines_against_their_authors_steps(monkeypatch):
    from benchmarks import bench_callbacks

    monkeypatch.setenv("LGP_BENCH_DEVICES", "cpu")
    names = ["PGD-10 + AWP", "TRADES + AWP", "MART", "FGSM + GradAlign"]
    text = bench_callbacks.main(["--quick", "--rounds", "1", "--steps", "1", "--threads", "1", "--only", *names])
    comparison = text.split("Lightning steps ÷ plain Lightning step")[0]
    rows = {line.split("|")[1].strip() for line in comparison.splitlines() if line.startswith("| ")}
    assert set(names) <= rows


def _tiny_token_classifier(monkeypatch, arch: str = "encoder") -> None:
    import benchmarks.bench_targets as bt

    for name, value in {"LAYERS": 1, "D": 32, "HEADS": 2, "T": 16, "ARCH": arch}.items():
        monkeypatch.setattr(bt, name, value)  # put back after the test (the benchmark sets them per process)


@pytest.mark.parametrize("row", ["FGM (weight 0.5), callback", "FGM (adversarial only), callback",
                                 "FreeLB K=3, callback", "SAM (ρ = 0.05), callback",
                                 "data penalty, finite difference, callback", "data penalty, auto, callback",
                                 "parameter penalty, finite difference, callback",
                                 "data penalty, double backward, callback"])
@pytest.mark.parametrize("arch", ["encoder", "gpt2"])
def test_memory_benchmark_s_hand_written_twins_train_as_the_callbacks_do(row, arch, monkeypatch):
    """The memory table compares like with like: in float64, two steps of each callback and of its hand-written twin
    give the same parameters, on both models (GPT-2: Hugging Face's, from a local config)."""
    import lightning as L

    import benchmarks.bench_targets as bt
    from benchmarks.bench_callbacks import RepeatedBatch
    from benchmarks.bench_memory import CELLS, ROWS, attention_for

    _tiny_token_classifier(monkeypatch, arch)
    batch = bt.make_batch(b=8)
    params = []
    for name in (row, ROWS[row]):
        torch.manual_seed(0)
        cls, factory = CELLS[name]
        module = cls()
        with attention_for(name):
            L.Trainer(accelerator="cpu", max_steps=2, precision="64-true", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[factory()] if factory is not None else []).fit(module, RepeatedBatch(batch, 2))
        params.append([p.detach().clone() for p in module.parameters()])
    torch.manual_seed(0)
    init = [p.detach().double() for p in CELLS["plain"][0]().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(params[0], init, strict=True))  # the steps did train
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_memory_benchmark_measures_a_cell_in_its_process_and_prints_the_table():
    from benchmarks.bench_memory import ROWS, cell_peak, table

    assert 1 < cell_peak("plain", "tiny") < 1000  # MiB above the model and one plain step: the fit's activations
    peaks = {"tiny": {"plain": 10.0, **{r: 12.0 for r in ROWS}, **{h: 10.0 for h in ROWS.values()}}}
    text = table(peaks)
    assert "| FreeLB K=3 | 12.0 ÷ 10.0 = **1.20** |" in text and "| plain step | 10.0 |" in text


def test_robust_cost_benchmark_prints_both_suites_as_fractions_of_an_epoch():
    pytest.importorskip("torchattacks")
    from benchmarks.bench_robust_cost import main as robust_cost

    text = robust_cost(["--train-size", "256", "--samples", "40", "--warmup-epochs", "1", "--suites", "fast",
                        "--threads", "1"])
    row = next(line for line in text.splitlines() if line.startswith("| fast |"))
    robust, seconds, per_epoch, at_five = (c.strip() for c in row.strip("|").split("|")[1:])
    assert 0 <= float(robust.rstrip("%")) <= 100 and float(seconds.rstrip(" s")) > 0
    # the last column is the evaluation over 5 epochs of training: a fifth of the one before it
    assert abs(float(at_five.rstrip("%")) / 100 - float(per_epoch) / 5) < 0.01
