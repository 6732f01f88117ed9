"""Spending a fixed parameter budget: one big network or many small ones, trained how? (issue 9)

    python experiments/parameter_budget.py           # Fashion-MNIST: 1x1024, 16x64, 64x16, 256x4 at λ ∈ {0, .5, .9, 1}
    python experiments/parameter_budget.py --quick   # the smoke size the tests run

The modular-loss paper (Webb et al. 2020, supplementary B.1): single-hidden-layer ReLU MLPs in four
shapes of about 815K parameters each, M modules of H hidden units (1x1024, 16x64, 64x16, 256x4), trained
with the modular loss at λ ∈ {0, 0.5, 0.9, 1}; 10,000 training images held out, and the test error
reported at the epoch of lowest validation error. Their modular loss is our objective divided by M
with λ = β (λ·D(p‖q̄) + (1 − λ)·mean_j D(p‖q_j)); q̄ is the normalized geometric mean of the members,
for which their decomposition holds: `--combine logit` (the default here). With one module λ changes
nothing, so 1x1024 trains once per seed. Differences from the paper, for a CPU: the mlp recipe (Nesterov
SGD, batch 256, its lr, --epochs, default 5) instead of 200 epochs at a tuned lr, and 3 seeds, not 5.

Also the paper's supplementary C, on its scalar case: at a stationary point the Hessian of the modular
loss in the members' natural parameters has condition number 1/(1 − λ) for 0 < λ < 1, and a negative
eigenvalue for λ > 1. Computed with torch.func.hessian for Gaussian and Poisson outputs.

Writes results.md, results.json, budget.png (test error against λ per shape) and curves.png (validation
error per epoch) under --out; finished runs are read back, interrupted ones resumed.
"""
import math
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analyze  # noqa: E402
import train_ensemble as te  # noqa: E402

SHAPES = ((1, 1024), (16, 64), (64, 16), (256, 4))   # (modules M, hidden units H): about 815K parameters each
QUICK_SHAPES = ((1, 64), (4, 16))
LAMBDAS = (0.0, 0.5, 0.9, 1.0)


def modular_loss(eta, y, lam, family):
    """The paper's modular loss of M scalar natural parameters eta for one target y (up to terms free of eta):
    λ·D(y‖ȳ) + (1 − λ)·mean_j D(y‖ŷ_j), with ȳ from the mean parameter; D is the family's deviance / 2."""
    if family == 'gaussian':   # identity link: D = (y − η)² / 2
        divergence = lambda e: (y - e) ** 2 / 2  # noqa: E731
    elif family == 'poisson':  # log link: D = exp(η) − y·η (+ a constant)
        divergence = lambda e: torch.exp(e) - y * e  # noqa: E731
    else:
        raise ValueError(family)
    return lam * divergence(eta.mean()) + (1 - lam) * divergence(eta).mean()


def hessian_at_stationary_point(lam, members, family, y=2.0):
    """Eigenvalues of the modular loss's Hessian at its stationary point (every η_j at the target's)."""
    eta = torch.full((members,), y if family == 'gaussian' else math.log(y), dtype=torch.float64)
    h = torch.func.hessian(lambda e: modular_loss(e, torch.tensor(y, dtype=torch.float64), lam, family))(eta)
    return torch.linalg.eigvalsh(h)


def early_stopped(run_dir):
    """(test error, epoch) at the epoch of lowest validation error, from the run's per-epoch metrics."""
    rows = te.read_metrics(run_dir)
    best = min(rows, key=lambda r: (1 - r['val_acc'], r['epoch']))
    return 1 - best['test_acc'], best['epoch']


def parameter_count(run_dir, members):
    """Trainable parameters of the whole ensemble, from the run's model spec (counted without allocating)."""
    with torch.device('meta'):
        return members * sum(p.numel() for p in te.build_model(te.read_config(run_dir)['model']).parameters())



def plot(path_budget, path_curves, rows, curves, shapes, lambdas):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for i, (m, h) in enumerate(shapes):
        points = [(lam, rows[m, h, lam]['test_error']) for lam in lambdas if (m, h, lam) in rows]
        if m == 1:   # one module: λ changes nothing, a level across the grid
            ax.axhline(points[0][1][0], color=f'C{i}', linestyle='--', label=f'{m}x{h} (any λ)')
            continue
        ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                    marker='o', capsize=3, color=f'C{i}', label=f'{m}x{h}')
    ax.set(xlabel='λ (β)', ylabel='test error at best validation epoch', title='a fixed budget of parameters')
    ax.legend(fontsize=7)
    fig.tight_layout()
    te.save_figure(fig, path_budget)
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 3), squeeze=False, sharey=True)
    for ax, (m, h) in zip(axes[0], shapes):
        for lam in lambdas:
            if (m, h, lam) in curves:
                ax.plot(curves[m, h, lam], marker='.', label=f'λ = {lam:g}')
        ax.set(title=f'{m}x{h}', xlabel='epoch', ylabel='validation error (seed 0)')
        ax.legend(fontsize=7)
    fig.tight_layout()
    te.save_figure(fig, path_curves)
    plt.close('all')


def main(
    out: Path = typer.Option(Path('runs/parameter_budget'), help='Where the runs and results go.'),
    seeds: int = typer.Option(3, help='Seeds per shape and λ (the paper: 5).'),
    quick: bool = typer.Option(False, '--quick', help='Tiny data, small shapes, 1 seed: the smoke test (seconds).'),
    dataset: str = typer.Option('fashion-mnist', help='Any train_ensemble.py dataset.'),
    lambdas: str = typer.Option(','.join(f'{v:g}' for v in LAMBDAS), help='λ grid (the toolkit\'s β).'),
    combine: str = typer.Option('logit', help='Combiner (logit: the normalized geometric mean '
                                              'of the paper\'s decomposition).'),
    epochs: float = typer.Option(5, help='Epochs per run.'),
    val_size: int = typer.Option(10000, help='Training images held out for early stopping.'),
    device: str = typer.Option('auto', help='auto, cpu or cuda.'),
):
    """Four MLP shapes of one parameter budget, at four λ: test error at the best validation epoch."""
    console, quiet = Console(), Console(quiet=True)
    common = dict(dataset=dataset, arch='mlp', combine=combine, epochs=epochs, val_size=val_size, device=device)
    shapes, grid = SHAPES, [float(v) for v in lambdas.split(',')]
    if quick:
        common.update(epochs=2, subset=1500, val_size=500)
        shapes, seeds = QUICK_SHAPES, 1
    start = time.perf_counter()
    rows, curves, results = {}, {}, dict(settings=dict(common, seeds=seeds, shapes=shapes, lambdas=grid), runs={})
    for m, h in shapes:
        for lam in grid if m > 1 else grid[:1]:   # one module: λ changes nothing
            errors, epochs_at = [], []
            for seed in range(seeds):
                name = f'm{m}_h{h}_lam{lam:g}_s{seed}'
                summary = te.complete_run(te.Config(out=str(out / name), members=m, hidden=[h], beta=lam, seed=seed,
                                                    **common), quiet)
                error, epoch = early_stopped(out / name)
                results['runs'][name] = dict(summary, early_stopped_test_error=error, best_val_epoch=epoch)
                errors.append(error)
                epochs_at.append(epoch)
            rows[m, h, lam] = dict(test_error=analyze.mean_std(errors), best_epoch=analyze.mean_std(epochs_at))
            curves[m, h, lam] = [1 - r['val_acc'] for r in te.read_metrics(out / f'm{m}_h{h}_lam{lam:g}_s0')]
            console.print(f'{m}x{h} λ={lam:g}: test error {rows[m, h, lam]["test_error"][0]:.4f}', highlight=False)

    lines = [f'# A fixed parameter budget: {dataset}, {common["epochs"]:g} epochs, {seeds} seed(s), combine={combine}, '
             f'{time.strftime("%Y-%m-%d")}', '',
             'Test error at the epoch of lowest validation error, mean ± standard deviation over seeds.', '',
             '| shape (M x H) | parameters | ' + ' | '.join(f'λ = {lam:g}' for lam in grid) + ' |',
             '|---|---|' + '---|' * len(grid)]
    for m, h in shapes:
        cells = [f'{rows[m, h, lam]["test_error"][0]:.4f} ± {rows[m, h, lam]["test_error"][1]:.4f}'
                 if (m, h, lam) in rows else '(= λ 0)' for lam in grid]
        lines.append(f'| {m} x {h} | {parameter_count(out / f"m{m}_h{h}_lam{grid[0]:g}_s0", m):,} | '
                     + ' | '.join(cells) + ' |')
    lines += ['', "The Hessian at the scalar case's stationary point (M = 4): condition number against 1/(1 − λ).", '',
              '| family | λ | smallest eigenvalue | condition number | 1/(1 − λ) |', '|---|---|---|---|---|']
    hessians = {}
    for family in ('gaussian', 'poisson'):
        for lam in (0.0, 0.5, 0.9, 0.99, 1.5):
            eig = hessian_at_stationary_point(lam, 4, family)
            kappa = (eig.max() / eig.min()).item() if eig.min() > 0 else float('nan')
            hessians[f'{family} lambda={lam:g}'] = eig.tolist()
            lines.append(f'| {family} | {lam:g} | {eig.min().item():.4g} | '
                         f'{"indefinite" if eig.min() < 0 else f"{kappa:.4g}"} | '
                         f'{1 / (1 - lam) if lam < 1 else float("nan"):.4g} |')
    lines.append(f'\n{time.perf_counter() - start:.0f} s in all (runs read back count nothing).')
    out.mkdir(parents=True, exist_ok=True)
    results.update(rows={f'{m}x{h} lambda={lam:g}': r for (m, h, lam), r in rows.items()}, hessian_eigenvalues=hessians)
    te.write_json(out / 'results.json', results)
    te.write_text(out / 'results.md', '\n'.join(lines) + '\n')   # after results.json: the table last
    plot(out / 'budget.png', out / 'curves.png', rows, curves, shapes, grid)
    console.print('\n'.join(lines), highlight=False, soft_wrap=True)
    console.print(f'wrote {out}/results.md, results.json, budget.png, curves.png')


if __name__ == '__main__':
    with te.user_errors():   # a missing dataset or bad option: one line, exit 2
        typer.run(main)
