"""Sharpness against diversity: plain, SAM and SharpBalance ensembles over a ρ grid (SharpBalance, Lu et al.
2024; issue 9)

    python experiments/sharpness_diversity.py          # Fashion-MNIST, 3-member MLP 256, ρ ∈ {0.02, 0.05, 0.1}, 3 seeds
    python experiments/sharpness_diversity.py --quick  # the smoke size the tests run

SharpBalance's claim: sharpness-aware training (SAM) flattens every member but also makes them alike
(lower diversity), which costs the ensemble; SharpBalance gives each member SAM only on the examples the
other members select, and recovers diversity at a similar flatness. For each method and ρ, three
members trained independently (β = 0), every seed: the members' mean sharpness (adaptive, the ASAM
ball of analyze.sharpness on fixed training images), test DIV, disagreement, ensemble improvement rate
and ensemble and mean-member accuracy (analyze.ensemble_report), mean ± standard deviation over seeds.

Writes results.md, results.json and tradeoff.png (sharpness against DIV, the paper's trade-off plot;
and ensemble accuracy against ρ) under --out; finished runs are read back, interrupted ones resumed.
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

RHOS = (0.02, 0.05, 0.1)
FLAT_RATIO = 0.5            # SharpBalance's fraction of the data each member selects (the paper's CIFAR setting)
SHARP_EXAMPLES = 2000       # training images the sharpness is measured on


def method_options(method, rho, flat_ratio):
    return {'plain': {}, 'sam': dict(sam_rho=rho), 'sharpbalance': dict(sam_rho=rho, flat_ratio=flat_ratio)}[method]


def measure(run_dir, examples):
    """The run's ensemble report on the test set and its members' mean sharpness on training images."""
    config, nets = te.load_run(run_dir)
    data = analyze.run_data(config)
    x, y = analyze.split_examples(data, 'test')
    report = analyze.ensemble_report(te.predict_logits(nets, x), y, config['combine'])
    x, y = analyze.split_examples(data, 'train', examples)
    batches = analyze.sharpness_batches(x, y)
    sharpness = statistics.mean(analyze.sharpness(net, batches)['sharpness'] for net in nets)
    return dict(sharpness=sharpness, div=report['div'], disagreement=report['disagreement'],
                improvement_rate=report['ensemble_improvement_rate'], ensemble_acc=report['ensemble']['acc'],
                member_acc=report['mean_member']['acc'])



def plot(path, rows):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for method, marker, colour in (('plain', 's', 'C0'), ('sam', 'o', 'C1'), ('sharpbalance', '^', 'C2')):
        points = sorted((rho, r) for (m, rho), r in rows.items() if m == method)
        if not points:
            continue
        axes[0].errorbar([r['sharpness'][0] for _, r in points], [r['div'][0] for _, r in points],
                         xerr=[r['sharpness'][1] for _, r in points], yerr=[r['div'][1] for _, r in points],
                         marker=marker, color=colour, linestyle='-' if len(points) > 1 else 'none', capsize=3,
                         label=method)
        for rho, r in points:
            if rho:
                axes[0].annotate(f'ρ={rho:g}', (r['sharpness'][0], r['div'][0]), fontsize=6)
        if method != 'plain':
            axes[1].errorbar([rho for rho, _ in points], [r['ensemble_acc'][0] for _, r in points],
                             yerr=[r['ensemble_acc'][1] for _, r in points], marker=marker, color=colour, capsize=3,
                             label=method)
    if ('plain', 0.0) in rows:
        axes[1].axhline(rows['plain', 0.0]['ensemble_acc'][0], color='C0', linestyle=':', label='plain')
    axes[0].set(xlabel='mean member sharpness (adaptive, training images)', ylabel='test DIV',
                title='the sharpness–diversity trade-off')
    axes[1].set(xscale='log', xlabel='ρ', ylabel='ensemble test accuracy', title='accuracy')
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    te.save_figure(fig, path)
    plt.close('all')


def main(
    out: Path = typer.Option(Path('runs/sharpness_diversity'), help='Where the runs and results go.'),
    seeds: int = typer.Option(3, help='Seeds per method and ρ.'),
    quick: bool = typer.Option(False, '--quick', help='Tiny data, one ρ, 1 seed: the smoke test (seconds).'),
    dataset: str = typer.Option('fashion-mnist', help='Any train_ensemble.py dataset.'),
    members: int = typer.Option(3, help='Ensemble size M (the paper: 3).'),
    hidden: str = typer.Option('256', help='MLP hidden sizes (with --arch mlp).'),
    arch: str = typer.Option('mlp', help='Network (the paper: resnet18 on CIFAR, on a GPU).'),
    rhos: str = typer.Option(','.join(f'{r:g}' for r in RHOS), help='SAM radii.'),
    flat_ratio: float = typer.Option(FLAT_RATIO, help="SharpBalance: the fraction of the data each member selects."),
    epochs: float = typer.Option(None, help="Epochs per run (default: the architecture's recipe)."),
    device: str = typer.Option('auto', help='auto, cpu or cuda.'),
):
    """Plain vs SAM vs SharpBalance over ρ: members' sharpness, DIV, disagreement, improvement rate, accuracy."""
    console, quiet = Console(), Console(quiet=True)
    common = dict(dataset=dataset, arch=arch, hidden=te.parse_ints(hidden), members=members, epochs=epochs,
                  device=device)
    grid, examples = [float(r) for r in rhos.split(',')], SHARP_EXAMPLES
    if quick:
        common.update(hidden=[32], epochs=2, subset=1500)
        grid, seeds, examples = grid[1:2], 1, 500
    start = time.perf_counter()
    rows, results = {}, dict(settings=dict(common, seeds=seeds, rhos=grid, flat_ratio=flat_ratio), runs={})
    for method, rho_list in (('plain', [0.0]), ('sam', grid), ('sharpbalance', grid)):
        for rho in rho_list:
            per_seed = []
            for seed in range(seeds):
                name = f'{method}_rho{rho:g}_s{seed}'
                te.complete_run(te.Config(out=str(out / name), seed=seed, **common,
                                          **method_options(method, rho, flat_ratio)), quiet)
                per_seed.append(measure(out / name, examples))
                results['runs'][name] = per_seed[-1]
            rows[method, rho] = {k: analyze.mean_std([s[k] for s in per_seed]) for k in per_seed[0]}
            console.print(f"{method} ρ={rho:g}: sharpness {rows[method, rho]['sharpness'][0]:.4f}, "
                          f"DIV {rows[method, rho]['div'][0]:.4f}, acc {rows[method, rho]['ensemble_acc'][0]:.4f}",
                          highlight=False)

    fmt = lambda v, digits=4: f'{v[0]:.{digits}f} ± {v[1]:.{digits}f}'  # noqa: E731
    lines = [f'# Sharpness and diversity: {dataset}, {members}-member {arch} '
             f'{common["hidden"] if arch == "mlp" else ""}, '
             f'{seeds} seed(s), SharpBalance flat ratio {flat_ratio:g}, {time.strftime("%Y-%m-%d")}', '',
             '| method | ρ | sharpness | test DIV | disagreement | improvement rate | ensemble acc | member acc |',
             '|---|---|---|---|---|---|---|---|']
    for (method, rho), r in rows.items():
        lines.append(f'| {method} | {rho:g} | ' + ' | '.join(fmt(r[k]) for k in (
            'sharpness', 'div', 'disagreement', 'improvement_rate', 'ensemble_acc', 'member_acc')) + ' |')
    lines.append('')
    for rho in grid:   # the paper's claim, per ρ: SharpBalance more diverse than SAM, beyond the seeds' spread
        sam, sb = rows['sam', rho]['div'], rows['sharpbalance', rho]['div']
        spread = sam[1] + sb[1]
        verdict = ('one seed: no spread to judge by' if seeds < 2 else
                   'more diverse than SAM, beyond the seeds\' spread' if sb[0] - sam[0] > spread else
                   'less diverse than SAM, beyond the seeds\' spread' if sam[0] - sb[0] > spread else
                   'no different from SAM within the seeds\' spread')
        lines.append(f'ρ = {rho:g}: SharpBalance test DIV {sb[0]:.4f} vs SAM {sam[0]:.4f}: {verdict}.')
    lines.append(f'\n{time.perf_counter() - start:.0f} s in all (runs read back count only their measurements).')
    out.mkdir(parents=True, exist_ok=True)
    results.update(rows={f'{m} rho={rho:g}': r for (m, rho), r in rows.items()})
    te.write_json(out / 'results.json', results)
    te.write_text(out / 'results.md', '\n'.join(lines) + '\n')   # after results.json: the table last
    plot(out / 'tradeoff.png', rows)
    console.print('\n'.join(lines), highlight=False, soft_wrap=True)
    console.print(f'wrote {out}/results.md, results.json, tradeoff.png')


if __name__ == '__main__':
    with te.user_errors():   # a missing dataset or bad option: one line, exit 2
        typer.run(main)
