"""Cost of a muon step against an SGD step, for M = 1, 4 and 16 members (issue 11): one epoch of our
trainer on a slice of Fashion-MNIST, MLP 784-256-256-10 (one hidden matrix, 256x256, takes muon steps).

    python benchmarks/bench_muon.py                 # CPU, one thread
    python benchmarks/bench_muon.py --device cuda   # on a GPU (Newton-Schulz in bf16)

Only the training loop is timed (train_time_s). SGD and muon alternate, fastest of --repeats counts.
"""
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import run_summary  # noqa: E402  (benchmarks/ is on sys.path when this runs as a script)


def epoch_seconds(optimizer, members, subset, device):
    summary, _ = run_summary(dataset='fashion-mnist', arch='mlp', hidden=[256, 256], members=members, subset=subset,
                             epochs=1, optimizer=optimizer, device=device)
    return summary['train_time_s']


def main(
    members: str = typer.Option('1,4,16', help='Ensemble sizes, comma-separated.'),
    subset: int = typer.Option(8192, help='Training images (batch 256: 32 steps).'),
    repeats: int = typer.Option(3, help='Runs of each optimizer per size, alternating; the fastest counts.'),
    device: str = typer.Option('cpu', help='cpu or cuda.'),
    threads: int = typer.Option(1, help='torch threads on a CPU.'),
):
    """Print SGD and muon seconds per epoch and their ratio for each ensemble size."""
    torch.set_num_threads(threads)
    table = Table(title=f'One epoch, {subset} Fashion-MNIST images, MLP 784-256-256-10, batch 256, {device}'
                        f"{f', {threads} thread(s)' if device == 'cpu' else ''}, {time.strftime('%Y-%m-%d')}: "
                        f"fastest of {repeats}")
    for col in ['M', 'sgd s', 'muon s', 'muon / sgd']:
        table.add_column(col, justify='right')
    for m in (int(v) for v in members.split(',')):
        runs = {'sgd': [], 'muon': []}
        for _ in range(repeats):
            for optimizer in runs:
                runs[optimizer].append(epoch_seconds(optimizer, m, subset, device))
        sgd, muon = min(runs['sgd']), min(runs['muon'])
        table.add_row(str(m), f'{sgd:.3f}', f'{muon:.3f}', f'{muon / sgd:.2f}')
    Console().print(table)


if __name__ == '__main__':
    typer.run(main)
