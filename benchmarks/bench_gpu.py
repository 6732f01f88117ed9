"""The GPU benchmark: our trainer side by side with airbench94 (PyPI `airbench` 0.1.8) in one process,
on the same synthetic CIFAR-shaped data, and the issue's speed goals checked on the spot.

    python benchmarks/bench_gpu.py                           # one GPU, about 8 minutes on an H100
    python benchmarks/bench_gpu.py --profile runs/profile    # and torch.profiler tables of one epoch each
    python benchmarks/bench_gpu.py --device cpu --tiny       # the whole script end to end on a CPU (no airbench rows)

Rows: airbench94 itself (its own fp16 network, `net.half()`), the same airbench94 network kept fp32 and run
under fp16 autocast (is half faster than autocast?), airbench94 compiled; ours with the airbench94 recipe
(width 1, 9.9 epochs, batch 1024) at M = 1, 3 and 8, eager and compiled, at M = 1 in each precision; ours
resnet18 at M = 1 and 3 for one epoch. Each row: one warm-up run, then the median (and spread) of
--repeats timed runs of the training loop only (airbench: its own CUDA-event timer; ours: train_time_s,
host clock after a device synchronization at each epoch's ends; neither counts evaluation), peak GPU
memory, test accuracy on the synthetic test set, and a sanity check (every epoch's training loss finite
and the last one below ln K, a uniform prediction's loss, where all of them start).

airbench reads `cifar10/train.pt` and `cifar10/test.pt` relative to the working directory (a torch
pickle of uint8 NHWC images, labels and class names) and downloads CIFAR-10 otherwise. This script
writes that file from our synthetic data into a temporary directory and works from there: the one
place in the project where a pickle is written, and only of synthetic data, for the peer's own loader.
On a machine without internet, bring airbench as a wheel (README.md, GPU benchmark).
"""
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_ensemble as te  # noqa: E402

AIRBENCH94 = dict(arch='airbench', width=1.0, epochs=9.9, batch_size=1024)   # our defaults; spelled out for the table


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float('nan')


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sane(losses, num_classes=10):
    return bool(losses) and all(math.isfinite(v) for v in losses) and losses[-1] < math.log(num_classes)


# ---- ours ----

def run_ours(module, out_dir, **options):
    """One training run of train_ensemble `module`: (train seconds, test acc, per-epoch train losses, peak GiB)."""
    fields = {f.name for f in dataclasses.fields(module.Config)}
    cfg = module.Config(dataset='synthetic', out=str(out_dir), tta=False,
                        **{k: v for k, v in options.items() if k in fields})
    reset_peak()
    summary = module.train(cfg, console=Console(quiet=True))
    losses = [json.loads(line)['train_loss'] for line in (Path(out_dir) / 'metrics.jsonl').read_text().splitlines()]
    return summary['train_time_s'], summary['test_acc'], losses, peak_gib()


# ---- airbench94 ----

@contextlib.contextmanager
def airbench_workdir(x_train, y_train, x_test, y_test):
    """A temporary working directory holding airbench's CIFAR-10 cache, made of our synthetic data."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix='bench_gpu_') as tmp:
        (Path(tmp) / 'cifar10').mkdir()
        for name, x, y in (('train', x_train, y_train), ('test', x_test, y_test)):
            torch.save({'images': x.permute(0, 2, 3, 1).contiguous(), 'labels': y,
                        'classes': [f'class{i}' for i in range(10)]}, Path(tmp) / 'cifar10' / f'{name}.pt')
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(cwd)


class AutocastSequential(torch.nn.Sequential):
    """airbench94's own network, kept fp32 and run under fp16 autocast instead of converted by net.half():
    the same training loop, so the two rows differ only in how fp16 is reached."""

    def forward(self, x):
        with torch.autocast('cuda', torch.float16):
            return super().forward(x)


def airbench_nets(airbench):
    def compiled():
        net = airbench.make_net94()
        net.compile()
        return net
    return {'airbench94 (net.half())': airbench.make_net94,
            'airbench94, fp32 net under fp16 autocast': lambda: AutocastSequential(*airbench.make_net94().float()),
            'airbench94 compiled': compiled}


def run_airbench(airbench, loader, make_net):
    """One airbench94 run, read off its own printed table: (train seconds, TTA test acc, per-epoch train losses,
    peak GiB). Its seconds column is its CUDA-event timer of the whitening init plus the training loop
    (no evaluation)."""
    printed = io.StringIO()
    reset_peak()
    with contextlib.redirect_stdout(printed):
        airbench.train94(loader, make_net=make_net, run=0, verbose=True)
    peak = peak_gib()
    rows = [[c.strip() for c in line.strip().strip('|').split('|')] for line in printed.getvalue().splitlines()
            if line.startswith('|')]
    header, rows = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    epochs = [r for r in rows if r[col['epoch']].isdigit()]
    final = [r for r in rows if r[col['epoch']] == 'eval'][-1]
    return (float(epochs[-1][col['total_time_seconds']]), float(final[col['tta_val_acc']]),
            [float(r[col['train_loss']]) for r in epochs], peak)


# ---- the table ----

def timed(name, run, repeats, console, log):
    """Warm up once, then time `repeats` runs; print progress and append the row to `log`. A row that
    fails is reported and skipped, so one broken configuration does not cost the others."""
    t0 = time.perf_counter()
    try:
        first = run()
        results = [run() for _ in range(repeats)]
    except Exception as e:  # noqa: BLE001 - report any failure of one row and go on
        console.print(f'{name}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""})',
                      highlight=False)
        log.append(dict(name=name, failed=f'{type(e).__name__}: {e}'[:2000]))
        return None
    seconds = [r[0] for r in results]
    row = dict(name=name, median_s=statistics.median(seconds), min_s=min(seconds), max_s=max(seconds),
               warmup_s=first[0], test_acc=statistics.median(r[1] for r in results),
               peak_gib=max(r[3] for r in results), sane=all(sane(r[2]) for r in results),
               losses=results[-1][2], wall_s=time.perf_counter() - t0)
    console.print(f"{name}: median {row['median_s']:.3f} s ({row['min_s']:.3f}–{row['max_s']:.3f}), "
                  f"warm-up {row['warmup_s']:.2f} s, acc {row['test_acc']:.4f}, peak {row['peak_gib']:.2f} GiB, "
                  f"sane {row['sane']}, {row['wall_s']:.0f} s wall", highlight=False)
    log.append(row)
    return row


def goals(rows):
    """The issue's goals as (goal, measured ratio, limit) where both rows exist."""
    t = {r['name']: r['median_s'] for r in rows if 'median_s' in r}
    checks = [('ours M=1 / airbench94, eager', 'ours M=1', 'airbench94 (net.half())', 1.0),
              ('ours M=1 / airbench94, compiled', 'ours M=1 compiled', 'airbench94 compiled', 1.0),
              ('ours M=3 / ours M=1, eager', 'ours M=3', 'ours M=1', 1.8),
              ('ours M=8 / ours M=1, eager', 'ours M=8', 'ours M=1', 4.0),
              ('ours M=3 / ours M=1, compiled', 'ours M=3 compiled', 'ours M=1 compiled', 1.8),
              ('ours M=8 / ours M=1, compiled', 'ours M=8 compiled', 'ours M=1 compiled', 4.0)]
    return [(goal, t[a] / t[b], limit) for goal, a, b, limit in checks if a in t and b in t]


def configure(device, members, resnet18, tiny):
    """The device, the ensemble sizes of the recipe and resnet18 rows, and the options of each (--tiny shrinks them)."""
    dev = te.resolve_device(device)
    sizes = [int(m) for m in members.split(',') if m.strip()]
    resnet_sizes = [int(m) for m in resnet18.split(',') if m.strip()]
    recipe = dict(AIRBENCH94, device=dev.type)
    resnet = dict(arch='resnet18', epochs=1, device=dev.type)
    if tiny:
        recipe.update(width=1 / 8, epochs=2, subset=2048, batch_size=256)
        resnet.update(width=1 / 8, subset=512, batch_size=128, epochs=3)
    return dev, sizes, resnet_sizes, recipe, resnet


def save(json_path, device_name, recipe, log):
    """Every row so far and the goals, as JSON."""
    te.write_json(json_path, dict(device=device_name, torch=torch.__version__, date=time.strftime('%Y-%m-%d'),
                                  recipe=recipe, rows=log, goals=goals(log)))


def our_runner(runs):
    """`ours(module, **options)`: a row's run of train_ensemble `module`, each call in a fresh directory
    under `runs`."""
    counter = iter(range(10**6))

    def ours(module=te, **options):
        return lambda: run_ours(module, Path(runs) / f'run{next(counter)}', **options)
    return ours


def load_baseline(path):
    """Another version of train_ensemble.py, imported from `path`."""
    spec = importlib.util.spec_from_file_location('train_ensemble_baseline', path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    return old


def bench_airbench(bench, compile, profile, console):
    """The airbench94 rows (on CUDA), skipped with a warning when airbench is not installed."""
    if importlib.util.find_spec('airbench') is None:   # a GPU session is scarce: time our rows anyway
        console.print('[bold red]airbench is not installed[/]: its rows are skipped (README, "On a GPU": '
                      'pip install the airbench 0.1.8 wheel)', highlight=False)
        return
    x_train, y_train, x_test, y_test, _ = te._synthetic(0)
    with airbench_workdir(x_train, y_train, x_test, y_test):
        import airbench   # after the cache exists: its loader reads cifar10/*.pt from the working directory
        loader = airbench.CifarLoader('cifar10', train=True, batch_size=1024, aug=dict(flip=True, translate=2),
                                      altflip=True)
        for label, make_net in airbench_nets(airbench).items():
            if compile or 'compiled' not in label:
                bench(label, lambda make_net=make_net: run_airbench(airbench, loader, make_net))
        if profile:
            profile_run(profile / 'airbench94.txt', lambda: run_airbench(airbench, loader, airbench.make_net94))


def bench_ours(bench, ours, dev, sizes, resnet_sizes, recipe, resnet, compile, precisions, baseline, profile):
    """Our rows: the airbench94 recipe at each M (eager, compiled), with muon, in each extra precision, the baseline
    version at each M, and resnet18."""
    for compiled in (False, True) if compile else (False,):
        for m in sizes:
            bench(f"ours M={m}{' compiled' if compiled else ''}", ours(members=m, compile=compiled, **recipe))
    # Issue 11: spectral updates (orthogonalized steps for the hidden convs) in the airbench94 recipe, M = 1.
    bench('ours M=1 muon', ours(members=1, optimizer='muon', **recipe))
    default = te.resolve_precision('auto', dev)
    for p in [p for p in precisions.split(',') if p.strip() and p != default]:
        bench(f'ours M=1 {p}', ours(members=1, precision=p, **recipe))
    if baseline:
        old = load_baseline(baseline)
        for m in sizes:
            bench(f'baseline M={m}', ours(old, members=m, **recipe))
    for m in resnet_sizes:
        bench(f'ours resnet18 M={m}, 1 epoch', ours(members=m, **resnet))
    if profile:
        for m in sizes:
            profile_run(profile / f'ours_m{m}.txt', ours(members=m, **dict(recipe, epochs=1)))


def print_table(console, log, device_name, repeats):
    """The rows as one table."""
    table = Table(title=f'{device_name}, torch {torch.__version__}, {time.strftime("%Y-%m-%d")}: training seconds, '
                        f'median of {repeats} after a warm-up')
    for col in ['row', 'median s', 'min–max s', 'warm-up s', 'test acc', 'peak GiB', 'loss sane']:
        table.add_column(col, justify='left' if col == 'row' else 'right')
    for r in log:
        if 'failed' in r:
            table.add_row(r['name'], 'failed', '', '', '', '', '')
            continue
        table.add_row(r['name'], f"{r['median_s']:.3f}", f"{r['min_s']:.3f}–{r['max_s']:.3f}", f"{r['warmup_s']:.2f}",
                      f"{r['test_acc']:.4f}", f"{r['peak_gib']:.2f}", 'yes' if r['sane'] else 'NO')
    console.print(table)


def print_goals(console, log, on_gpu):
    """Each goal's measured ratio, judged only on a GPU: on a CPU every member already fills the cores."""
    for goal, ratio, limit in goals(log):
        verdict = ('met' if ratio <= limit else 'MISSED') if on_gpu else '(a GPU goal; not judged on a CPU)'
        console.print(f'{goal}: {ratio:.2f}x (goal <= {limit:g}x) {verdict}', highlight=False)


def main(
    device: str = typer.Option('auto', help='auto, cuda or cpu. airbench94 rows need CUDA '
                                            '(its loader puts data on GPU 0).'),
    repeats: int = typer.Option(3, help='Timed runs per row, after one warm-up run; the table shows their median.'),
    members: str = typer.Option('1,3,8', help='Ensemble sizes of the airbench94-recipe rows.'),
    compile: bool = typer.Option(True, '--compile/--no-compile',
                                 help='Also time the compiled rows (ours and airbench94).'),
    precisions: str = typer.Option('fp16,fp32', help='Extra precisions to time at M = 1, eager '
                                                     '(the default precision is always timed).'),
    resnet18: str = typer.Option('1,3', help="Ensemble sizes of the one-epoch resnet18 rows "
                                             "('' for none; --tiny: 3 epochs)."),
    tiny: bool = typer.Option(False, '--tiny', help='Small networks and data, one epoch: '
                                                    'proves the script end to end on a CPU in minutes.'),
    baseline: Optional[Path] = typer.Option(None, help='Also time another version of train_ensemble.py '
                                                       '(e.g. `git show HEAD~3:train_ensemble.py > old.py`) '
                                                       'at each M, eager.'),
    profile: Optional[Path] = typer.Option(None, help='Write torch.profiler tables (top kernels by device time) '
                                                      'of one epoch of airbench94 and of ours at each M '
                                                      'into this directory.'),
    json_path: Path = typer.Option(Path('runs/bench_gpu.json'), '--json', help='Every row, written after each one.'),
):
    """Time airbench94 and our trainer on the same synthetic data; print one table and the goals."""
    console = Console(width=max(Console().width, 120))
    dev, sizes, resnet_sizes, recipe, resnet = configure(device, members, resnet18, tiny)
    name = torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'
    console.print(f'[bold]bench_gpu[/] on {name}, torch {torch.__version__}, {time.strftime("%Y-%m-%d")}; '
                  f'ours: {recipe}; {repeats} timed runs per row after a warm-up', highlight=False)
    log = []
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def bench(label, run):   # one row, then every row so far written to --json
        timed(label, run, repeats, console, log)
        save(json_path, name, recipe, log)

    with tempfile.TemporaryDirectory(prefix='bench_gpu_runs_') as runs:
        if dev.type == 'cuda' and not tiny:
            bench_airbench(bench, compile, profile, console)
        bench_ours(bench, our_runner(runs), dev, sizes, resnet_sizes, recipe, resnet, compile, precisions, baseline,
                   profile)
    print_table(console, log, name, repeats)
    print_goals(console, log, dev.type == 'cuda')
    save(json_path, name, recipe, log)
    console.print(f'wrote {json_path}')


def profile_run(path, run):
    """One run under torch.profiler; write the kernels by total device time, and device busy time vs wall time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        result = run()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = 'self_cuda_time_total' if torch.cuda.is_available() else 'self_cpu_time_total'
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'train seconds {result[0]:.3f}; wall {wall:.3f} s under the profiler; '
                    f'device busy {device_us / 1e6:.3f} s (all kernels, evaluation included)\n\n'
                    + events.table(sort_by=sort, row_limit=40, max_name_column_width=90)
                    + '\n\nBy host time:\n'
                    + events.table(sort_by='self_cpu_time_total', row_limit=30, max_name_column_width=90))


if __name__ == '__main__':
    typer.run(main)
