"""Learner collusion (Jeffares et al. 2023): the β sweep from independent (β = 0) to joint (β = 1) training,
for both combiners, with the paper's diagnostics (issue 9, experiment 1).

    python experiments/collusion.py                  # Fashion-MNIST, 4-member MLP 784-256-10, 3 seeds
    python experiments/collusion.py --quick          # the smoke size the tests run (seconds)
    python experiments/collusion.py --task regression --dataset data/bikeshare.npz --hidden 64,64 --members 5

For every combiner, β and seed: ensemble and mean-member test error, train and test DIV, the
generalization gap (test minus training loss of the ensemble), the loss increase when half the members
are dropped, and the share of test DIV that debiasing (removing each member's constant class-wise
offset, fitted on training images) takes away. Mean ± standard deviation over seeds. Figures: error and
DIV against β; training and test loss per epoch at β = 0 and 1 (the paper's gap figure). With --task
regression the paper's regression half: score averaging (the one combiner, 'mean'), squared error, RMSE
as the error, and DIV = mean_j (f_j − f̄)²; --quick then runs on synthetic-regression.

Runs live under --out, one directory each; finished runs are read back and interrupted ones resumed
(train_ensemble.complete_run). Writes results.md, results.json, sweep.png and curves.png there.
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

FIT_EXAMPLES = 10000   # training images the debiasing offsets are estimated on


def diagnostics(run_dir, combiner, fit_examples):
    """Half the members dropped (loss increase) and debiasing (share of test DIV removed) of a run."""
    config, nets = te.load_run(run_dir)
    data = te.load_run_data(config, download=False)
    test = te.predict_logits(nets, data.x_test)
    fit = te.predict_logits(nets, data.x_train[:fit_examples])
    drop = analyze.drop_learners(test, data.y_test, combiner, [0.5])['fractions'][0]

    def div_of(outputs):
        if combiner == 'mean':
            return analyze.regression_report(outputs, data.y_test)['div']
        return analyze.ambiguity(outputs, data.y_test, combiner)[0].mean().item()

    div, debiased = div_of(test), div_of(analyze.debias(fit, test))
    return dict(drop_half_loss=drop['loss_increase'], debias_removed=(div - debiased) / div if div > 0 else 0.0)



def plot(path_sweep, path_curves, rows, curves, betas, error='error'):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for combiner in sorted({c for c, _ in rows}):
        for ax, key, title in ((axes[0], 'ensemble_error', f'ensemble test {error}'),
                               (axes[1], 'member_error', f'member test {error}'),
                               (axes[2], 'test_div', 'test DIV')):
            ax.errorbar(betas, [rows[combiner, b][key][0] for b in betas], [rows[combiner, b][key][1] for b in betas],
                        marker='o', capsize=3, label=combiner)
            ax.set(xlabel='β', title=title)
    axes[0].legend(fontsize=7)
    axes[2].set_yscale('log')   # DIV grows by orders of magnitude towards β = 1
    fig.tight_layout()
    te.save_figure(fig, path_sweep)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for (beta, split), values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker='o' if len(values) <= 30 else None,
                linestyle='-' if split == 'test' else '--',
                label=f'β = {beta:g}, {split}')
    ax.set(xlabel='epoch', ylabel='ensemble loss', yscale='log',
           title=f'training and test loss ({next(iter(rows))[0]}, seed 0)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    te.save_figure(fig, path_curves)
    plt.close('all')


def configure(task, quick, seeds, *, dataset, arch, hidden, members, betas, combiners, epochs, device):
    """The options every run shares, the β grid, the combiners, the number of seeds and the debiasing fit size
    (--quick shrinks them; regression has the one combiner, mean)."""
    regression = task == 'regression'
    common = dict(task=task, dataset=dataset, arch=arch, hidden=te.parse_ints(hidden), members=members, epochs=epochs,
                  device=device)
    beta_grid, combiner_list, fit_examples = [float(b) for b in betas.split(',')], combiners.split(','), FIT_EXAMPLES
    if regression:
        combiner_list = ['mean']
    if quick:
        common.update(hidden=[32], members=2, epochs=2, subset=1500)
        if regression:
            common['dataset'] = 'synthetic-regression'
        beta_grid, seeds, fit_examples = [0.0, 1.0], 1, 500
    return common, beta_grid, combiner_list, seeds, fit_examples


def seed_numbers(summary, extra, regression):
    """One run's numbers for the table: errors (RMSE, or the error rate), DIV, gap and the diagnostics."""
    return dict(ensemble_error=summary['test_rmse'] if regression else 1 - summary['test_acc'],
                member_error=statistics.mean(summary['member_test_rmse']) if regression
                else 1 - statistics.mean(summary['member_test_acc']),
                train_div=summary['train_div'], test_div=summary['test_div'],
                gap=summary['test_loss'] - summary['train_loss'], **extra)


def run_sweep(out, console, quiet, common, combiner_list, beta_grid, seeds, fit_examples, error_name, runs):
    """Every (combiner, β, seed): train or read back, diagnose; the row of each (combiner, β), mean ± std over seeds."""
    regression = common['task'] == 'regression'
    rows = {}
    for combiner in combiner_list:
        for beta in beta_grid:
            per_seed = []
            for seed in range(seeds):
                name = f'{combiner}_beta{beta:g}_s{seed}'
                summary = te.complete_run(te.Config(out=str(out / name), combine=combiner, beta=beta, seed=seed,
                                                    **common), quiet)
                extra = diagnostics(out / name, combiner, fit_examples)
                runs[name] = dict(summary, **extra)
                per_seed.append(seed_numbers(summary, extra, regression))
            rows[combiner, beta] = {k: analyze.mean_std([s[k] for s in per_seed]) for k in per_seed[0]}
            console.print(f"{combiner} β={beta:g}: ensemble {error_name} "
                          f"{rows[combiner, beta]['ensemble_error'][0]:.4f}, "
                          f"test DIV {rows[combiner, beta]['test_div'][0]:.4f}", highlight=False)
    return rows


def table(rows, common, seeds, error_name):
    """results.md's table: one row per (combiner, β)."""
    fmt = lambda v, pct=False: f'{100 * v[0]:.0f}% ± {100 * v[1]:.0f}%' if pct else f'{v[0]:.4f} ± {v[1]:.4f}'  # noqa: E731
    arch = common['arch']
    lines = [f'# Learner collusion: {common["dataset"]}, {common["members"]}-member {arch} '
             f'{common["hidden"] if arch == "mlp" else ""}, '
             f'{seeds} seed(s), {time.strftime("%Y-%m-%d")}', '',
             f'| combiner | β | ensemble test {error_name} | member test {error_name} | train DIV | test DIV | gap '
             '| Δ loss, half dropped | DIV removed by debias |',
             '|---|---|---|---|---|---|---|---|---|']
    for (combiner, beta), r in rows.items():
        lines.append(f'| {combiner} | {beta:g} | ' + ' | '.join(fmt(r[k]) for k in (
            'ensemble_error', 'member_error', 'train_div', 'test_div', 'gap', 'drop_half_loss'))
            + f' | {fmt(r["debias_removed"], True)} |')
    return lines


def verdicts(rows, combiner_list, beta_grid, error_name):
    """Per combiner: where the mean ensemble error is lowest, and whether an intermediate β beats both ends."""
    lines = []
    for combiner in combiner_list:   # the paper's question, answered only beyond the seeds' spread
        error = {b: rows[combiner, b]['ensemble_error'] for b in beta_grid}
        best = min(beta_grid, key=lambda b: error[b][0])
        end = min((beta_grid[0], beta_grid[-1]), key=lambda b: error[b][0])
        margin = error[end][0] - error[best][0]
        if best in (beta_grid[0], beta_grid[-1]):
            verdict = 'no intermediate β beats it'
        elif margin > error[best][1] + error[end][1]:
            verdict = f'an intermediate β beats both ends, by {margin:.4f} over β = {end:g}, beyond the seeds\' spread'
        else:
            verdict = (f'{margin:.4f} below β = {end:g}, within the seeds\' spread: '
                       'no intermediate β is shown to be better')
        lines.append(f'{combiner}: lowest mean ensemble {error_name} at β = {best:g} ({verdict}).')
    return lines


def loss_curves(out, combiner, beta_grid):
    """Training and test loss per epoch of seed 0 at the grid's two ends: {(β, 'train' or 'test'): losses}."""
    curves = {}
    for beta in (beta_grid[0], beta_grid[-1]):
        epochs_log = te.read_metrics(out / f'{combiner}_beta{beta:g}_s0')
        curves[beta, 'train'] = [e['train_loss'] for e in epochs_log]
        curves[beta, 'test'] = [e['test_loss'] for e in epochs_log]
    return curves


def main(
    out: Path = typer.Option(Path('runs/collusion'), help='Where the runs and results go.'),
    seeds: int = typer.Option(3, help='Seeds per (combiner, β).'),
    quick: bool = typer.Option(False, '--quick', help='Tiny data, β 0 and 1, 1 seed: the smoke test (seconds).'),
    dataset: str = typer.Option('fashion-mnist', help='Any train_ensemble.py dataset.'),
    arch: str = typer.Option('mlp', help='mlp, airbench or resnet18 (the paper: resnet18 on CIFAR-10, on a GPU).'),
    hidden: str = typer.Option('256', help='MLP hidden sizes.'),
    members: int = typer.Option(4, help='Ensemble size M (the paper: 5).'),
    betas: str = typer.Option('0,0.2,0.4,0.6,0.8,0.9,1', help='β grid.'),
    combiners: str = typer.Option('prob,logit', help='Combiners (classification; regression has one, mean).'),
    task: str = typer.Option('classification',
                             help='classification, or regression (a table: --dataset a .npz or .csv).'),
    epochs: float = typer.Option(None, help="Epochs per run (default: the architecture's recipe)."),
    device: str = typer.Option('auto', help='auto, cpu or cuda.'),
):
    """The β sweep for both combiners, with DIV, gaps, dropping and debiasing: does joint training collude?"""
    console, quiet = Console(), Console(quiet=True)
    common, beta_grid, combiner_list, seeds, fit_examples = configure(
        task, quick, seeds, dataset=dataset, arch=arch, hidden=hidden, members=members, betas=betas,
        combiners=combiners, epochs=epochs, device=device)
    # an ensemble's and a member's error: RMSE, or the error rate
    error_name = 'RMSE' if task == 'regression' else 'error'
    start = time.perf_counter()
    results = dict(settings=dict(common, seeds=seeds, betas=beta_grid, combiners=combiner_list), runs={})
    rows = run_sweep(out, console, quiet, common, combiner_list, beta_grid, seeds, fit_examples, error_name,
                     results['runs'])
    lines = table(rows, common, seeds, error_name) + [''] + verdicts(rows, combiner_list, beta_grid, error_name)
    lines.append(f'\n{time.perf_counter() - start:.0f} s in all (runs read back count only their diagnostics).')
    curves = loss_curves(out, combiner_list[0], beta_grid)
    results.update(rows={f'{c} beta={b:g}': r for (c, b), r in rows.items()},
                   curves={f'beta={b:g} {split}': v for (b, split), v in curves.items()})
    te.write_json(out / 'results.json', results)
    te.write_text(out / 'results.md', '\n'.join(lines) + '\n')   # after results.json: the table last
    plot(out / 'sweep.png', out / 'curves.png', rows, curves, beta_grid, error_name)
    console.print('\n'.join(lines), highlight=False, soft_wrap=True)
    console.print(f'wrote {out}/results.md, results.json, sweep.png, curves.png')


if __name__ == '__main__':
    with te.user_errors():   # a missing dataset or bad option: one line, exit 2
        typer.run(main)
