"""Training cost of sharpness-aware training: seconds per epoch of an M = 3 ensemble on synthetic
CIFAR-shaped data with `--param spectral`, `--sam-rho` and SharpBalance, and the ratio to plain training.
Expected: spectral ≈ 1x (only the init and per-layer lr change), SAM ≈ 2x (two forward and backward
passes per step), SharpBalance ≈ 2.7x (one more backward pass, to keep the plain-gradient part apart:
2 forward + 3 backward against 1 + 1, a backward costing about two forwards) plus a one-off scoring
pass (per-example gradients of the whole training set).

    python benchmarks/bench_sam.py                        # CPU-sized defaults
    python benchmarks/bench_sam.py --device cuda --subset 0 --width 1 --batch-size 1024 --epochs 2

Only the training loop is timed (train_time_s of the run, via bench_train.time_run). The SharpBalance
run starts SharpBalance at epoch 0, so its time includes the scoring pass; that pass is also timed on
its own, and the last row subtracts it. Every mode runs --repeats times, interleaved, and the fastest
run counts (shared machines).
"""
import math
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_ensemble as te  # noqa: E402
from bench_train import time_run  # noqa: E402  (benchmarks/ is on sys.path when this runs as a script)

MODES = {
    'plain': {},
    'spectral': dict(param='spectral'),
    'SAM (rho 0.05)': dict(sam_rho=0.05),
    'SharpBalance (rho 0.2, r 0.5)': dict(sam_rho=0.2, flat_ratio=0.5, sam_start_epoch=0),
}


def scoring_seconds(members, options):
    """Seconds of one SharpBalance scoring pass over the training set of a freshly built ensemble."""
    cfg = te.resolve_config(te.Config(members=members, **options))
    device = te.resolve_device(cfg.device)
    data = te.load_run_data(cfg, device)
    cfg = te.resolve_config(cfg, data)
    spec = te.model_spec(cfg, data)
    net = te.build_model(spec, members=members)
    net.load_state_dict(te.stack_members(te.initial_member_states(cfg, spec, data), net.state_dict()))
    net = net.to(device).train()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    te.sharpness_scores(net, data.x_train, data.y_train, members)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(
    members: int = typer.Option(3, help='Ensemble size.'),
    arch: str = typer.Option('airbench', help='Network.'),
    width: float = typer.Option(0.25, help='Width multiplier.'),
    epochs: float = typer.Option(2.0, help='Epochs per run.'),
    subset: int = typer.Option(1024, help='Training images (0 = all 50,000).'),
    batch_size: int = typer.Option(256, help='Batch size.'),
    repeats: int = typer.Option(3, help='Runs per mode; the fastest counts.'),
    device: str = typer.Option('auto', help='auto, cpu or cuda.'),
):
    """Print seconds per epoch and the ratio to plain training for each training mode."""
    options = dict(dataset='synthetic', arch=arch, width=width, epochs=epochs, subset=subset or None,
                   batch_size=batch_size, device=device)
    time_run(members, **options)   # warm-up
    best = {mode: (math.inf, 0.0) for mode in MODES}
    for _ in range(repeats):
        for mode, extra in MODES.items():
            seconds, acc, _ = time_run(members, **options, **extra)
            best[mode] = min(best[mode], (seconds / epochs, acc))
    scoring = min(scoring_seconds(members, options) for _ in range(repeats))

    name = te.resolve_device(device).type
    if torch.cuda.is_available() and name == 'cuda':
        name += f' ({torch.cuda.get_device_name()})'
    table = Table(title=f'M = {members}, {options} on {name}, best of {repeats}')
    for col in ['mode', 's / epoch', 'ratio to plain', 'test acc']:
        table.add_column(col, justify='right')
    base = best['plain'][0]
    for mode, (per_epoch, acc) in best.items():
        table.add_row(mode, f'{per_epoch:.3f}', f'{per_epoch / base:.2f}', f'{acc:.4f}')
    steps = best['SharpBalance (rho 0.2, r 0.5)'][0] - scoring / epochs
    table.add_row('SharpBalance, steps only (derived)', f'{steps:.3f}', f'{steps / base:.2f}', '')
    table.add_row('scoring pass, once per run (s)', f'{scoring:.3f}', f'{scoring / base:.2f}', '')
    Console().print(table)


if __name__ == '__main__':
    typer.run(main)
