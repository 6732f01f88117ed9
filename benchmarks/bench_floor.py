"""The trainer's fixed cost per step, measurable on any machine: one epoch of our trainer against a
hand-written batched loop that does the same arithmetic and nothing else (the floor).

    python benchmarks/bench_floor.py                      # full Fashion-MNIST, batch 256, one thread
    python benchmarks/bench_floor.py --sizes 1x64,4x256 --repeats 5

Both train M members of an MLP 784 -> H -> 10 for one epoch with the mlp recipe's Nesterov SGD (lr per
1024 examples, decoupled weight decay, the triangle schedule) on the same pre-converted images; the floor
holds the weights as (M, 784, H) and (M, H, 10) tensors, runs one broadcast matmul and one baddbmm, and
sums the cross-entropy. Only the epoch's loop is timed (ours: train_time_s). The two alternate, and each
side's fastest of --repeats runs counts (shared machines are noisy; the minimum is the least disturbed).
Goals (issue 15): ours at most 1.15x the floor at M = 1, H = 64 and at most 1.05x at M = 4, H = 256.
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_ensemble as te  # noqa: E402
from bench_train import run_summary  # noqa: E402  (benchmarks/ is on sys.path when this runs as a script)

GOALS = {(1, 64): 1.15, (4, 256): 1.05}
RECIPE = te.RECIPES['mlp']


def floor_epoch(x, y, members, hidden, batch_size, seed=0):
    """One epoch of the hand-written loop; returns (seconds, mean training loss)."""
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    params = [torch.randn(members, d, hidden, generator=g) / math.sqrt(d), torch.zeros(members, 1, hidden),
              torch.randn(members, hidden, 10, generator=g) / math.sqrt(hidden), torch.zeros(members, 1, 10)]
    params = [p.requires_grad_() for p in params]
    kilostep = 1024 * (1 + 1 / (1 - RECIPE['momentum']))
    lr = RECIPE['lr'] / kilostep
    decay = RECIPE['weight_decay'] * batch_size / kilostep
    opt = torch.optim.SGD(params, lr=lr, momentum=RECIPE['momentum'], nesterov=True, weight_decay=decay / lr)
    steps = n // batch_size
    order = torch.randperm(n, generator=g)
    start, total = time.perf_counter(), 0.0
    for i in range(steps):
        opt.param_groups[0]['lr'] = lr * te.lr_factor(i, steps)
        idx = order[i * batch_size:(i + 1) * batch_size]
        h = torch.relu(torch.matmul(x.index_select(0, idx), params[0]) + params[1])   # (M, B, H)
        z = torch.baddbmm(params[3], h, params[2])                             # (M, B, 10)
        loss = F.cross_entropy(z.view(-1, 10), y.index_select(0, idx).repeat(members), reduction='sum')
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
    return time.perf_counter() - start, float(total) / (steps * batch_size * members)


def ours_epoch(members, hidden, batch_size, seed=0):
    summary, _ = run_summary(dataset='fashion-mnist', arch='mlp', hidden=[hidden], members=members,
                             batch_size=batch_size, epochs=1, device='cpu', seed=seed)
    return summary['train_time_s'], summary['train_loss']


def main(
    sizes: str = typer.Option('1x64,4x256', help='Ensemble sizes as MxH (members x hidden units), comma-separated.'),
    batch_size: int = typer.Option(256, help='Batch size.'),
    repeats: int = typer.Option(3, help='Runs of each side per size, alternating; the fastest counts.'),
    threads: int = typer.Option(1, help='torch threads (1: the per-step overhead is not hidden by parallel kernels).'),
):
    """Print our epoch time, the floor's, and their ratio for each size, with the goal."""
    torch.set_num_threads(threads)
    console = Console()
    data = te.load_data('fashion-mnist')
    x = te.to_float_images(data.x_train).flatten(1)
    x = (x - x.mean()) / x.std()   # the floor's images: standardized once (ours standardizes in its first layer)
    table = Table(title=f'One epoch of Fashion-MNIST ({len(x)} images), MLP 784-H-10, batch {batch_size}, '
                        f'{threads} thread(s), CPU, {time.strftime("%Y-%m-%d")}: fastest of {repeats}')
    for col in ['M', 'H', 'ours s', 'floor s', 'ours / floor', 'goal', 'ours loss', 'floor loss']:
        table.add_column(col, justify='right')
    for size in sizes.split(','):
        m, h = (int(v) for v in size.lower().split('x'))
        ours, floor = [], []
        for _ in range(repeats):
            ours.append(ours_epoch(m, h, batch_size))
            floor.append(floor_epoch(x, data.y_train, m, h, batch_size))
        (t_ours, loss_ours), (t_floor, loss_floor) = min(ours), min(floor)
        goal = GOALS.get((m, h))
        ratio = t_ours / t_floor
        verdict = '' if goal is None else f"{goal:g}x {'met' if ratio <= goal else 'MISSED'}"
        table.add_row(str(m), str(h), f'{t_ours:.3f}', f'{t_floor:.3f}', f'{ratio:.3f}', verdict,
                      f'{loss_ours:.4f}', f'{loss_floor:.4f}')
    console.print(table)


if __name__ == '__main__':
    typer.run(main)
