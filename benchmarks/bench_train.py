"""Training cost of an ensemble against its size: seconds per epoch for M = 1, 3, 8 members on
synthetic CIFAR-shaped data, and the ratio to M = 1 (issue goal on a GPU: M = 3 at most 1.8x M = 1).

    python benchmarks/bench_train.py                      # CPU-sized defaults
    python benchmarks/bench_train.py --device cuda --subset 0 --width 1 --epochs 2
    python benchmarks/bench_train.py --device cuda --recipe   # the full airbench94 recipe, M = 1 and 3

Only the training loop is timed (train_time_s of the run: no evaluation, no checkpoint writing).
A warm-up run first pays for cuDNN autotuning and torch.compile.
"""
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_ensemble as te  # noqa: E402


def run_summary(**options):
    """One training run in a temporary directory (removed after): (its summary, peak GPU GiB or nan)."""
    out = tempfile.mkdtemp(prefix='bench_train_')
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        summary = te.train(te.Config(out=out, tta=False, **options), console=Console(quiet=True))
        return summary, torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float('nan')
    finally:
        shutil.rmtree(out, ignore_errors=True)


def time_run(members, **options):
    summary, peak = run_summary(members=members, **options)
    return summary['train_time_s'], summary['test_acc'], peak


def main(
    members: str = typer.Option('1,3,8', help='Ensemble sizes to time, comma-separated.'),
    arch: str = typer.Option('airbench', help='Network.'),
    width: float = typer.Option(0.5, help='Width multiplier.'),
    epochs: float = typer.Option(1.0, help='Epochs per run.'),
    subset: int = typer.Option(2048, help='Training images (0 = all 50,000).'),
    batch_size: int = typer.Option(512, help='Batch size.'),
    device: str = typer.Option('auto', help='auto, cpu or cuda.'),
    compile: bool = typer.Option(False, '--compile', help='torch.compile the network.'),
    recipe: bool = typer.Option(False, '--recipe', help='Time the default airbench94 recipe '
                                                        '(width 1, all data, 9.9 epochs) for M = 1 and 3 instead.'),
):
    """Print seconds per epoch and the ratio to M = 1 for each ensemble size."""
    console = Console()
    if recipe:
        sizes, options = [1, 3], dict(dataset='synthetic', arch='airbench', device=device, compile=compile)
    else:
        sizes = [int(m) for m in members.split(',')]
        options = dict(dataset='synthetic', arch=arch, width=width, epochs=epochs, subset=subset or None,
                       batch_size=batch_size, device=device, compile=compile)
    time_run(1, **{**options, 'epochs': min(options.get('epochs', 9.9), 1.0)})   # warm-up
    table = Table(title=f"{options} on {te.resolve_device(device)}"
                        f"{' (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else ''}")
    for col in ['members', 'train seconds', 's / epoch', 'ratio to M=1', 'test acc', 'peak GPU GiB']:
        table.add_column(col, justify='right')
    base = None
    for m in sizes:
        seconds, acc, peak = time_run(m, **options)
        per_epoch = seconds / options.get('epochs', 9.9)
        base = base or per_epoch
        table.add_row(str(m), f'{seconds:.2f}', f'{per_epoch:.3f}', f'{per_epoch / base:.2f}', f'{acc:.4f}',
                      f'{peak:.2f}')
    console.print(table)


if __name__ == '__main__':
    typer.run(main)
