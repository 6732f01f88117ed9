"""Seconds to corrupt a whole 10,000-image test set at one severity, per corruption (analyze.corrupt), CPU.

    python benchmarks/bench_corruptions.py   # Fashion-MNIST (28 x 28 x 1) and synthetic CIFAR-shaped (32 x 32 x 3)
    python benchmarks/bench_corruptions.py --severity 5 --threads 2

Goal (issue 10): under 2 s for every corruption but elastic_transform, whose time is reported.
"""
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analyze  # noqa: E402
import train_ensemble as te  # noqa: E402


def main(
    severity: int = typer.Option(3, help='Severity 1..5.'),
    threads: int = typer.Option(1, help='torch CPU threads.'),
    repeats: int = typer.Option(2, help='Timed calls; the fastest counts.'),
):
    """Print seconds per corruption for both image shapes."""
    torch.set_num_threads(threads)
    sets = {'fashion-mnist 28x28x1': te.load_data('fashion-mnist').x_test,
            'synthetic 32x32x3': te.load_data('synthetic').x_test}
    table = Table(title=f'seconds to corrupt 10,000 test images at severity {severity}, {threads} thread(s)')
    table.add_column('corruption')
    for name in sets:
        table.add_column(name, justify='right')
    for corruption in analyze.CORRUPTIONS:
        cells = []
        for x in sets.values():
            if corruption == 'saturate' and x.size(1) != 3:
                cells.append('colour only')
                continue
            best = float('inf')
            for _ in range(repeats):
                start = time.perf_counter()
                analyze.corrupt(x, corruption, severity, torch.Generator().manual_seed(0))
                best = min(best, time.perf_counter() - start)
            cells.append(f'{best:.2f}')
        table.add_row(corruption, *cells)
    Console().print(table)


if __name__ == '__main__':
    typer.run(main)
