"""One process against several (torchrun) on the same ensemble: seconds per epoch and the bytes each rank
receives per step, counted at the collectives (not computed from a formula).

    python benchmarks/bench_distributed.py                           # CPU, gloo: W = 1 and 2, beta 0 and 1
    python benchmarks/bench_distributed.py --device cuda --worlds 1,2,4 --arch resnet18 --dataset cifar10

Each configuration runs in its own job (python for W = 1, torchrun for W > 1) that trains --epochs on
the same data with the same options; the timed part is the run's train_time_s (the training loop, as
reported by rank 0). On a CPU, W = 1 gets every core's threads and each of W ranks cores / W, so the
comparison is one process against several on the same machine. Goal on GPUs (issue 14): at M = 8 and
beta = 1, W = 2 at most 0.6x the time of W = 1.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_ensemble as te  # noqa: E402


def count_collectives():
    """Wrap the gather that joins the members' logits so that it counts the bytes this rank receives
    ((W − 1) blocks of rows), those of the training steps apart from the rest (the epoch's log and the
    evaluation); and count the steps."""
    counts = {'step': 0, 'other': 0, 'steps': 0, 'in_step': False}
    gather, step = te.MemberBlock.gather, te.Training.train_step

    def counted_gather(self, local):
        largest = len(self.blocks[0])
        counts['step' if counts['in_step'] else 'other'] += ((self.world - 1) * largest * local[0].numel()
                                                             * local.element_size())
        return gather(self, local)

    def counted_step(self, *batch):
        counts['steps'] += 1
        counts['in_step'] = True
        try:
            return step(self, *batch)
        finally:
            counts['in_step'] = False

    te.MemberBlock.gather, te.Training.train_step = counted_gather, counted_step
    return counts


def worker(options_json: str, report: str):
    """One job's run (under torchrun or alone); rank 0 writes its timing and byte counts to `report`."""
    options = json.loads(options_json)
    counts = count_collectives()
    summary = te.train(te.Config(**options), console=Console(quiet=True))
    if int(os.environ.get('RANK', 0)) == 0:
        Path(report).write_text(json.dumps(dict(summary=summary, counts=counts)))


def launch(world, threads, options, report):
    command = [sys.executable, __file__, 'worker', json.dumps(options), report]
    if world > 1:
        command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(world),
                   *command[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f'W={world} failed:\n{result.stderr[-3000:]}')
    return json.loads(Path(report).read_text())


def main(
    worlds: str = typer.Option('1,2', help='Numbers of processes to compare, comma-separated.'),
    betas: str = typer.Option('0,1', help='Diversity weights to time, comma-separated.'),
    members: int = typer.Option(8, help='Ensemble size M.'),
    arch: str = typer.Option('mlp', help='Network.'),
    hidden: str = typer.Option('256', help='mlp hidden sizes.'),
    dataset: str = typer.Option('fashion-mnist', help='Dataset (every rank loads it).'),
    epochs: float = typer.Option(1.0, help='Epochs per run.'),
    batch_size: int = typer.Option(256, help='Batch size.'),
    device: str = typer.Option('cpu', help='cpu (gloo) or cuda (NCCL, one GPU per rank).'),
    cores: int = typer.Option(os.cpu_count(), help='CPU threads shared out among the ranks.'),
    repeats: int = typer.Option(2, help="Runs of each configuration; the fastest counts (shared machines are noisy)."),
):
    """Print seconds per epoch, the ratio to the first world size, and the KiB each rank receives per step: in
    the step's gather of the logits, and for the epoch's log and evaluation, spread over the steps."""
    console = Console()
    sizes, beta_values = [int(w) for w in worlds.split(',')], [float(b) for b in betas.split(',')]
    table = Table(title=f'M = {members} {arch} ({hidden}) on {dataset}, batch {batch_size}, {device}, {cores} cores')
    for col in ['beta', 'W', 'threads', 's / epoch', 'ratio', 'test acc', 'KiB / step', 'log+eval KiB / step']:
        table.add_column(col, justify='right')
    with tempfile.TemporaryDirectory(prefix='bench_distributed_') as tmp:
        for beta in beta_values:
            base = None
            for world in sizes:
                out = Path(tmp) / f'b{beta:g}_w{world}'
                options = dict(members=members, beta=beta, arch=arch, hidden=[int(h) for h in hidden.split(',')],
                               dataset=dataset, epochs=epochs, batch_size=batch_size, device=device, tta=False,
                               out=str(out))
                r = min((launch(world, max(1, cores // world), {**options, 'out': f'{out}_{i}'}, f'{out}_{i}.json')
                         for i in range(repeats)), key=lambda r: r['summary']['train_time_s'])
                per_epoch = r['summary']['train_time_s'] / epochs
                base = base or per_epoch
                steps = max(r['counts']['steps'], 1)
                table.add_row(f'{beta:g}', str(world), str(max(1, cores // world)), f'{per_epoch:.2f}',
                              f'{per_epoch / base:.2f}', f"{r['summary']['test_acc']:.4f}",
                              *(f"{r['counts'][k] / steps / 1024:.1f}" for k in ('step', 'other')))
    console.print(table)


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == 'worker':
        worker(*sys.argv[2:])
    else:
        typer.run(main)
