"""Does the spectral condition stop learner collusion? (the reproduction log's hypothesis; issues 9 and 11)

    python experiments/spectral_collusion.py                  # Fashion-MNIST, 4-member MLP 256-256, 3 seeds
    python experiments/spectral_collusion.py --arch airbench --width 0.125 --subset 10000 --val-size 2000 \
        --batch-size 256 --out runs/spectral_collusion_airbench    # airbench at reduced width (40 CPU minutes)
    python experiments/spectral_collusion.py --quick          # the smoke size the tests run (seconds)

Three ways to train, each at its own best learning rate: standard SGD (PyTorch init, one lr), the
spectral parametrization (`--param spectral`: spectral init and per-layer lrs) and spectral updates
(`--optimizer muon`: orthogonalized steps). For each, at β = 0 (independent) and β = 1 (joint): a
learning-rate sweep on seed 0, judged on a held-out validation split (never the test set); then every
seed at the best lr. The table reports ensemble and mean-member test error, train and test DIV and the
generalization gap (test minus training loss of the ensemble), mean ± standard deviation over seeds.
Collusion shows as a large DIV at β = 1 with a worse ensemble; the hypothesis holds if it vanishes.

Runs live under --out, one directory each; a finished run is read back, an interrupted one resumed, so
an interrupted experiment continues where it stopped. Writes results.md, results.json, sweep.png and
results.png there.
"""
import statistics
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analyze  # noqa: E402
import train_ensemble as te  # noqa: E402

METHODS = {   # how each way of training is asked for, and which option its swept learning rate sets
    'standard': (dict(param='standard', optimizer='sgd'), 'lr'),
    'spectral': (dict(param='spectral', optimizer='sgd'), 'lr'),
    'muon': (dict(param='standard', optimizer='muon'), 'muon_lr'),
}
# Learning-rate grids per architecture: around the recipe's lr (mlp 4, airbench 11.5) for standard training,
# and where a first look put the other two (the spectral parametrization rescales every matrix's lr).
LRS = {'mlp': {'standard': (2.0, 4.0, 8.0, 16.0), 'spectral': (8.0, 16.0, 32.0, 64.0), 'muon': (0.025, 0.05, 0.1, 0.2)},
       'airbench': {'standard': (5.75, 11.5, 23.0), 'spectral': (11.5, 23.0, 46.0), 'muon': (0.05, 0.1, 0.2)}}
QUICK_LRS = {'standard': (2.0, 8.0), 'spectral': (8.0, 32.0), 'muon': (0.05, 0.2)}
BETAS = (0.0, 1.0)


def train_or_read(out, console, **options):
    """te.complete_run of these options in `out`; None if it diverges (a sweep's too-high learning rate)."""
    try:
        return te.complete_run(te.Config(out=str(out), **options), console)
    except te.EnsembleError as e:
        if 'diverged' not in str(e):
            raise
        return None



def row_of(summaries):
    """The table's numbers over seeds, each (mean, std)."""
    columns = dict(ensemble_error=lambda s: 1 - s['test_acc'],
                   member_error=lambda s: 1 - statistics.mean(s['member_test_acc']),
                   train_div=lambda s: s['train_div'], test_div=lambda s: s['test_div'],
                   gap=lambda s: s['test_loss'] - s['train_loss'])
    return {name: analyze.mean_std([f(s) for s in summaries]) for name, f in columns.items()}


def plot(path_sweep, path_results, sweep, rows):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.2), squeeze=False)
    for ax, method in zip(axes[0], METHODS):
        for beta in BETAS:
            points = sorted((lr, loss) for (m, b, lr), loss in sweep.items() if m == method and b == beta)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=f'β = {beta:g}')
        ax.set(xscale='log', xlabel='learning rate', ylabel='validation loss (ensemble)', title=method)
        ax.legend(fontsize=7)
    fig.tight_layout()
    te.save_figure(fig, path_sweep)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [f'{m}\nβ={b:g}' for m, b in rows]
    for ax, key, title in ((axes[0], 'ensemble_error', 'ensemble test error'), (axes[1], 'test_div', 'test DIV')):
        ax.bar(labels, [r[key][0] for r in rows.values()], yerr=[r[key][1] for r in rows.values()], capsize=3)
        ax.set_title(title)
        ax.tick_params(axis='x', labelsize=7)
    fig.tight_layout()
    te.save_figure(fig, path_results)
    plt.close('all')


def configure(arch, quick, seeds, *, dataset, members, hidden, width, subset, epochs, batch_size, val_size, device):
    """Check --arch; the options every run shares, the learning-rate grids and the number of seeds
    (--quick shrinks all three)."""
    if arch not in LRS:
        raise typer.BadParameter(f"'{arch}': use mlp or airbench", param_hint='--arch')
    airbench = arch == 'airbench'
    common = dict(dataset=dataset, arch=arch, members=members, epochs=epochs, device=device, batch_size=batch_size,
                  val_size=val_size if val_size is not None else 4000 if airbench else 10000,
                  **(dict(width=width, subset=(20000 if subset is None else subset) or None) if airbench else
                     dict(hidden=te.parse_ints(hidden), subset=subset or None)))
    lrs = QUICK_LRS if quick else LRS[arch]
    if quick:
        common.update(members=2, epochs=1 if airbench else 2, subset=1000 if airbench else 1500, val_size=500,
                      **(dict(width=1 / 16) if airbench else dict(hidden=[32, 16])))   # mlp: one hidden matrix for muon
        seeds = 1
    return common, lrs, seeds


def lr_sweep(out, quiet, common, method, beta, lrs, runs):
    """Seed 0 at each learning rate: {lr: ensemble validation loss}, inf where the run diverged."""
    options, lr_option = METHODS[method]
    losses = {}
    for lr in lrs:
        name = f'{method}_beta{beta:g}_lr{lr:g}_s0'
        summary = train_or_read(out / name, quiet, **common, **options, beta=beta, seed=0, **{lr_option: lr})
        diverged = summary is None or summary['val_loss'] is None
        losses[lr] = float('inf') if diverged else summary['val_loss']
        runs[name] = summary
    return losses


def train_seeds(out, quiet, common, method, beta, lr, seeds, runs):
    """Every seed at learning rate `lr`: the summaries of the runs that did not diverge."""
    options, lr_option = METHODS[method]
    summaries = []
    for seed in range(seeds):
        name = f'{method}_beta{beta:g}_lr{lr:g}_s{seed}'
        summary = train_or_read(out / name, quiet, **common, **options, beta=beta, seed=seed, **{lr_option: lr})
        runs[name] = summary
        summaries += [summary] if summary is not None else []
    if not summaries:
        raise te.EnsembleError(f'{method} at beta={beta:g} diverged at every learning rate: widen the sweep')
    return summaries


def run_all(out, console, quiet, common, lrs, seeds, runs):
    """Each method at each β: sweep the learning rate, then every seed at the best one.
    Returns the sweep {(method, β, lr): validation loss}, the best lr and the table row of each (method, β)."""
    sweep, best, rows = {}, {}, {}
    for method in METHODS:
        for beta in BETAS:
            losses = lr_sweep(out, quiet, common, method, beta, lrs[method], runs)
            sweep.update({(method, beta, lr): loss for lr, loss in losses.items()})
            best[method, beta] = min(lrs[method], key=lambda lr: sweep[method, beta, lr])
            summaries = train_seeds(out, quiet, common, method, beta, best[method, beta], seeds, runs)
            rows[method, beta] = dict(row_of(summaries), diverged=seeds - len(summaries))
            console.print(f'{method} β={beta:g}: best lr {best[method, beta]:g}; ensemble error '
                          f"{rows[method, beta]['ensemble_error'][0]:.4f}, "
                          f"test DIV {rows[method, beta]['test_div'][0]:.4f}",
                          highlight=False)
    return sweep, best, rows


def report(common, seeds, lrs, sweep, best, rows, start):
    """results.md's lines: the table over seeds at each best lr, then the learning-rate sweep."""
    fmt = lambda v: f'{v[0]:.4f} ± {v[1]:.4f}'  # noqa: E731
    network = f'airbench width {common["width"]:g}' if common['arch'] == 'airbench' else f'MLP {common["hidden"]}'
    lines = [f'# Spectral hypothesis: {common["dataset"]}, {common["members"]}-member {network}, '
             f'{common["epochs"]:g} epochs, {seeds} seed(s), {time.strftime("%Y-%m-%d")}', '',
             '| method | β | best lr | ensemble test error | member test error | train DIV | test DIV '
             '| gap (test − train loss) |',
             '|---|---|---|---|---|---|---|---|']
    for (method, beta), r in rows.items():
        diverged = f' ({r["diverged"]} seed(s) diverged)' if r['diverged'] else ''
        lines.append(f'| {method} | {beta:g} | {best[method, beta]:g}{diverged} | {fmt(r["ensemble_error"])} | '
                     f'{fmt(r["member_error"])} | {fmt(r["train_div"])} | {fmt(r["test_div"])} | {fmt(r["gap"])} |')
    lines += ['', 'Learning-rate sweep (seed 0, ensemble validation loss):', '',
              '| method | β | ' + ' | '.join('lr' for _ in range(max(map(len, lrs.values())))) + ' |',
              '|---|---|' + '---|' * max(map(len, lrs.values()))]
    for (method, beta) in rows:
        lines.append(f'| {method} | {beta:g} | '
                     + ' | '.join(f'{lr:g}: {sweep[method, beta, lr]:.4f}'.replace('inf', 'diverged')
                                  for lr in lrs[method]) + ' |')
    lines.append(f'\n{time.perf_counter() - start:.0f} s in all (runs read back count nothing).')
    return lines


def write_results(out, results, lines, sweep, best, rows):
    """Write results.json, results.md, sweep.png and results.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    results.update(best_lr={f'{m} beta={b:g}': lr for (m, b), lr in best.items()},
                   rows={f'{m} beta={b:g}': r for (m, b), r in rows.items()},
                   sweep={f'{m} beta={b:g} lr={lr:g}': v for (m, b, lr), v in sweep.items()})
    te.write_json(out / 'results.json', results)
    te.write_text(out / 'results.md', '\n'.join(lines) + '\n')   # after results.json: the table last
    plot(out / 'sweep.png', out / 'results.png', sweep, rows)


def main(
    out: Path = typer.Option(Path('runs/spectral_collusion'), help='Where the runs and results go.'),
    seeds: int = typer.Option(3, help='Seeds per configuration at its best learning rate.'),
    quick: bool = typer.Option(False, '--quick', help='Tiny data, 1 seed, 2 learning rates: the smoke test (seconds).'),
    dataset: str = typer.Option('fashion-mnist', help='Any train_ensemble.py dataset.'),
    members: int = typer.Option(4, help='Ensemble size M.'),
    arch: str = typer.Option('mlp', help='mlp or airbench '
                                         '(its recipe otherwise: batch 1024, label smoothing, Lookahead).'),
    hidden: str = typer.Option('256,256', help='MLP hidden sizes.'),
    width: float = typer.Option(0.25, help='airbench width multiplier.'),
    subset: int = typer.Option(None, help='Training (and test) images; default all for mlp, 20,000 for airbench.'),
    epochs: float = typer.Option(5, help='Epochs per run.'),
    batch_size: int = typer.Option(None, help="Batch size (default: the architecture's recipe)."),
    val_size: int = typer.Option(None, help='Training images held out to choose each learning rate '
                                            '(default 10,000; 4,000 for airbench).'),
    device: str = typer.Option('auto', help='auto, cpu or cuda.'),
):
    """Standard, spectral and muon training at β = 0 and 1, each at its best lr: does collusion persist?"""
    console, quiet = Console(), Console(quiet=True)
    common, lrs, seeds = configure(arch, quick, seeds, dataset=dataset, members=members, hidden=hidden, width=width,
                                   subset=subset, epochs=epochs, batch_size=batch_size, val_size=val_size,
                                   device=device)
    start = time.perf_counter()
    results = dict(settings=dict(common, seeds=seeds, lrs=lrs), runs={})
    sweep, best, rows = run_all(out, console, quiet, common, lrs, seeds, results['runs'])
    lines = report(common, seeds, lrs, sweep, best, rows, start)
    write_results(out, results, lines, sweep, best, rows)
    console.print('\n'.join(lines), highlight=False, soft_wrap=True)
    console.print(f'wrote {out}/results.md, results.json, sweep.png, results.png')


if __name__ == '__main__':
    with te.user_errors():   # a missing dataset or bad option: one line, exit 2
        typer.run(main)
