"""The git re-basin report's experiments (snimu's hlb-CIFAR10 fork, ../shared/seeds; issue 9, experiment 3),
one subcommand each, with seeds and error bars.

    python experiments/rebasin_report.py kernel-size         # barriers against the conv kernel size (3, 5, 7)
    python experiments/rebasin_report.py weight-decay        # barriers against the weight decay
    python experiments/rebasin_report.py merge-many          # MergeMany of 3, 6, 9, 12 models, kernel size 3 and 5
    python experiments/rebasin_report.py train-merge-train   # n models for e epochs, merged, e more; against 2e epochs
    python experiments/rebasin_report.py shards              # n models on disjoint shards, merged, trained on the last
    python experiments/rebasin_report.py kernel-size --quick # the smoke size the tests run

Every model is an airbench network (the report's hlb-CIFAR10 is its ancestor), by default at --width 0.25,
trained 5 epochs on 5,000 Fashion-MNIST images, so that the whole report runs on a CPU in about an hour;
--dataset cifar10 --width 1 --subset 0 --epochs 10 is the report's own setting, for a GPU.
Independent models are the members of a β = 0 ensemble (exactly as if trained alone:
tests/test_train_ensemble.py), member j from its own seed.

- kernel-size, weight-decay: two models per seed; along A → B, A → π(B) and B → π(B) (π from weight
  matching), the test loss and error barriers max_λ L(λ) − ((1 − λ)·L(0) + λ·L(1)), as trained and
  with the BatchNorm statistics recomputed at each inner λ (analyze.lmc_curves).
- merge-many: one ensemble of max(--models) per kernel size and seed; MergeMany of its first n members
  (statistics recomputed on training images) against the mean member and the n members' ensemble.
- train-merge-train: n models trained e epochs, merged, trained e more epochs from the merge (a fresh
  schedule), against one model trained 2e epochs: the report's L, LC, L/LC, A, AC, A/AC.
- shards: the training set cut into n + 1 disjoint parts; n models trained e epochs on parts 0..n−1,
  merged, then trained e epochs on part n; against models trained on part n alone for e epochs
  (control 1) and n·e epochs (control n).

Each writes results.md (mean ± standard deviation over --seeds), results.json (every number) and a
figure under --out (default runs/rebasin_report/<subcommand>); finished runs are read back and
interrupted ones resumed.
"""
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analyze  # noqa: E402
import rebasin  # noqa: E402
import train_ensemble as te  # noqa: E402

CURVES = tuple(analyze.CURVES.values())   # the table's columns: each curve's label
LMC_BN_EXAMPLES = 1000   # training images the BatchNorm statistics are recomputed on at each inner λ (after a
                         # merge, once: rebasin.BN_EXAMPLES)
QUICK = dict(width=1 / 16, subset=600, epochs=1, examples=200, steps=3, seeds=1)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="The git re-basin report's experiments: kernel-size, weight-decay, merge-many, "
                       'train-merge-train, shards.')
# The options every subcommand shares, each written once.
Out = Annotated[Optional[Path], typer.Option(help='Where the runs and results go '
                                                  '(default: runs/rebasin_report/<subcommand>).')]
Seeds = Annotated[int, typer.Option(help='Seeds per setting.')]
Quick = Annotated[bool, typer.Option('--quick', help='Tiny networks and data, 1 seed, small grids: the smoke test.')]
Dataset = Annotated[str, typer.Option(help='Any train_ensemble.py image dataset.')]
Width = Annotated[float, typer.Option(help='airbench width multiplier (the report: 1).')]
Subset = Annotated[int, typer.Option(help='Training (and test) images; 0 for all of them.')]
Epochs = Annotated[float, typer.Option(help='Epochs of every model (the report: about 10).')]
Examples = Annotated[int, typer.Option(help='Test images every model is evaluated on.')]
Device = Annotated[str, typer.Option(help='auto, cpu or cuda.')]


class Experiment:
    """The settings one subcommand shares with the others, and the runs it trains."""

    def __init__(self, name, out, seeds, quick, dataset, width, subset, examples, device, epochs=None):
        settings = dict(seeds=seeds, width=width, subset=subset, examples=examples, epochs=epochs,
                        steps=analyze.INTERP_POINTS)
        if quick:
            settings.update(QUICK)
        self.name, self.quick, self.start = name, quick, time.perf_counter()
        self.out = Path(out or f'runs/rebasin_report/{name}')
        self.seeds, self.examples, self.steps, self.epochs = (settings[k]
                                                              for k in ('seeds', 'examples', 'steps', 'epochs'))
        self.base = dict(dataset=dataset, arch='airbench', width=settings['width'], subset=settings['subset'] or None,
                         device=device, beta=0.0)
        self.device = te.resolve_device(device)
        self.console, self.quiet = Console(), Console(quiet=True)
        self.settings = dict(self.base, seeds=self.seeds, examples=self.examples, epochs=self.epochs)

    def train(self, name, **options):
        """A finished run under out/name with the shared settings and these options: (run dir, summary)."""
        options = {**self.base, 'epochs': self.epochs, **options}
        return self.out / name, te.complete_run(te.Config(out=str(self.out / name), **options), self.quiet)

    def test_split(self, run_dir=None):
        """The first --examples test images of a run's data (class-balanced), or without a run of the dataset's."""
        config = te.read_config(run_dir) if run_dir else dict(dataset=self.base['dataset'], subset=self.examples)
        return analyze.split_examples(analyze.run_data(config), 'test', self.examples)

    def evaluate(self, spec, states, x, y):
        """Test (loss, accuracy) of the ensemble of these states (one state: that model), probability averaging."""
        nets = [self.module(spec, state) for state in states]
        loss, error = analyze.ensemble_loss_error(te.predict_logits(nets, x), y.to(self.device), 'prob')
        return loss, 1 - error

    def module(self, spec, state):
        net = te.build_model(spec)
        net.load_state_dict(state)
        return net.to(self.device).eval()

    def merge(self, states, spec, run_dir, path=None):
        """MergeMany of the states, BatchNorm statistics recomputed on run_dir's training images; with
        `path`, written there as a member file (read back when it exists) so that a run can --init from it."""
        if path is not None and Path(path).exists():
            return te.load_member_state(path)[1]
        net = self.module(spec, states[0])
        merged, _ = rebasin.merge_many(rebasin.permutation_spec(net, torch.zeros(1, *te.input_shape(spec),
                                                                                 device=self.device)),
                                       states, device=self.device)
        net.load_state_dict(merged)
        x = analyze.run_data(te.read_config(run_dir)).x_train[:rebasin.BN_EXAMPLES]
        merged = rebasin.reset_bn(net, te.float_batches(x, rebasin.BN_BATCH, self.device))
        if path is not None:
            te.save_member(path, merged, spec, merged_from=len(states))
        return merged

    def barriers(self, run_dir):
        """Member 0 against member 1 of a run: test loss and error barriers of the three curves, as trained
        and with BatchNorm reset, and the members' mean test accuracy."""
        spec, (a, b) = load_members(te.member_paths(run_dir)[:2])
        data = analyze.run_data(te.read_config(run_dir))
        x, y = analyze.split_examples(data, 'test', self.examples)
        row = dict(member_acc=sum(self.evaluate(spec, [s], x, y)[1] for s in (a, b)) / 2)
        for bn in (None, 'reset'):
            curves = analyze.lmc_curves(spec, a, b, {'test': (x, y)}, self.steps, align=True, bn=bn,
                                        bn_inputs=data.x_train[:LMC_BN_EXAMPLES], device=self.device)
            for name, curve in analyze.CURVES.items():
                for key in ('loss', 'error'):
                    row[f'{curve} {key}{" reset" if bn else ""}'] = curves[name]['barrier'][f'test_{key}']
        return row

    def report(self, title, lines, results, figure):
        """Write results.md (the title, then `lines`), results.json and the figure (figure(path) draws it)."""
        lines = [f'# {title}: {self.base["dataset"]}, airbench width {self.base["width"]:g}, '
                 f'{self.base["subset"] or "all"} training images, {self.seeds} seed(s), '
                 f'{time.strftime("%Y-%m-%d")}'] + lines
        lines.append(f'\n{time.perf_counter() - self.start:.0f} s in all '
                     '(runs read back count only their measurements).')
        self.out.mkdir(parents=True, exist_ok=True)
        te.write_json(self.out / 'results.json', dict(settings=self.settings, **results))
        te.write_text(self.out / 'results.md', '\n'.join(lines) + '\n')   # after results.json: the table last
        figure(self.out / 'results.png')
        self.console.print('\n'.join(lines), highlight=False, soft_wrap=True)
        self.console.print(f'wrote {self.out}/results.md, results.json, results.png')


def load_members(paths):
    """(model spec, state dicts) of member files of one architecture."""
    loaded = [te.load_member_state(p) for p in paths]
    return loaded[0][0], [state for _, state, _ in loaded]


def first_members(run_dirs):
    """(model spec, state dicts) of the first member of each run."""
    return load_members([te.member_paths(run_dir)[0] for run_dir in run_dirs])


def summarize(per_seed):
    return {k: analyze.mean_std([s[k] for s in per_seed]) for k in per_seed[0]}


def fmt(v, digits=4):
    return f'{v[0]:.{digits}f} ± {v[1]:.{digits}f}'


def markdown(columns, rows):
    """A markdown table: a header of `columns`, then one line per row (cells already text)."""
    return (['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
            + ['| ' + ' | '.join(r) + ' |' for r in rows])


def _axes(panels):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path, title):
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    te.save_figure(fig, path)
    plt.close(fig)


def barrier_sweep(exp, label, tag, values, options_of):
    """kernel-size and weight-decay: barriers of two models per seed at each value of one option (runs
    named <tag><value>_s<seed>)."""
    rows = {}
    for value in values:
        per_seed = []
        for seed in range(exp.seeds):
            run_dir, _ = exp.train(f'{tag}{value:g}_s{seed}', members=2, seed=2 * seed, **options_of(value))
            per_seed.append(exp.barriers(run_dir))
        rows[value] = summarize(per_seed)
        exp.console.print(f"{label} {value:g}: test loss barrier A → B {rows[value]['A → B loss'][0]:.4f}, "
                          f"A → π(B) {rows[value]['A → π(B) loss'][0]:.4f}", highlight=False)
    lines = []
    for key in ('loss', 'error'):
        lines += ['', f'Test {key} barriers, as trained and with the BatchNorm statistics reset at each inner λ:', '']
        lines += markdown([label, 'member acc', *CURVES, *(f'{c}, BN reset' for c in CURVES)],
                          [[f'{v:g}', fmt(r['member_acc']),
                            *(fmt(r[f'{c} {key}{s}']) for s in ('', ' reset') for c in CURVES)]
                           for v, r in rows.items()])

    def figure(path):
        plt, fig, axes = _axes(2)
        for ax, key in zip(axes, ('loss', 'error')):
            for i, curve in enumerate(CURVES):
                for suffix, style in (('', '-'), (' reset', '--')):
                    r = [rows[v][f'{curve} {key}{suffix}'] for v in values]
                    ax.errorbar(values, [m for m, _ in r], [s for _, s in r], linestyle=style, marker='o', capsize=3,
                                color=f'C{i}', label=f'{curve}{", BN reset" if suffix else ""}')
            ax.set(xlabel=label, ylabel=f'test {key} barrier')
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        _save(plt, fig, path, f'barriers against {label} (mean ± std over {exp.seeds} seed(s))')
    return rows, lines, figure


@app.command('kernel-size')
def kernel_size(kernel_sizes: str = typer.Option('3,5,7', help='Conv kernel sizes k (k × k).'),
                out: Out = None, seeds: Seeds = 3, quick: Quick = False, dataset: Dataset = 'fashion-mnist',
                width: Width = 0.25, subset: Subset = 5000, epochs: Epochs = 5, examples: Examples = 2000,
                device: Device = 'auto'):
    """Barriers between two models against the kernel size (the report: larger kernels are said to match better)."""
    exp = Experiment('kernel-size', out, seeds, quick, dataset, width, subset, examples, device, epochs)
    ks = te.parse_ints(kernel_sizes)[:2] if quick else te.parse_ints(kernel_sizes)
    exp.settings.update(kernel_sizes=ks)
    rows, lines, figure = barrier_sweep(exp, 'kernel size', 'k', ks, lambda k: dict(kernel_size=k))
    exp.report('Barriers against the kernel size', lines, dict(rows={f'k={k}': r for k, r in rows.items()}), figure)


@app.command('weight-decay')
def weight_decay(weight_decays: str = typer.Option('0,0.005,0.015,0.05',
                                                   help="Weight decays (fraction of the weights removed "
                                                        "per 1024 examples; airbench's is 0.0153)."),
                 out: Out = None, seeds: Seeds = 3, quick: Quick = False, dataset: Dataset = 'fashion-mnist',
                 width: Width = 0.25, subset: Subset = 5000, epochs: Epochs = 5, examples: Examples = 2000,
                 device: Device = 'auto'):
    """Barriers between two models against the weight decay (the report: matching needs strong decay)."""
    exp = Experiment('weight-decay', out, seeds, quick, dataset, width, subset, examples, device, epochs)
    wds = [float(w) for w in weight_decays.split(',')]
    wds = [wds[0], wds[-1]] if quick else wds
    exp.settings.update(weight_decays=wds)
    rows, lines, figure = barrier_sweep(exp, 'weight decay', 'wd', wds, lambda wd: dict(weight_decay=wd))
    exp.report('Barriers against the weight decay', lines, dict(rows={f'wd={w:g}': r for w, r in rows.items()}), figure)


@app.command('merge-many')
def merge_many(models: str = typer.Option('3,6,9,12', help='How many models MergeMany merges (n).'),
               kernel_sizes: str = typer.Option('3,5', help='Conv kernel sizes k.'),
               out: Out = None, seeds: Seeds = 3, quick: Quick = False, dataset: Dataset = 'fashion-mnist',
               width: Width = 0.25, subset: Subset = 5000, epochs: Epochs = 5, examples: Examples = 2000,
               device: Device = 'auto'):
    """MergeMany of n models against the kernel size: the merged model against its members and their ensemble."""
    exp = Experiment('merge-many', out, seeds, quick, dataset, width, subset, examples, device, epochs)
    ns, ks = te.parse_ints(models), te.parse_ints(kernel_sizes)
    if quick:
        ns, ks = [2, 3], ks[:1]
    exp.settings.update(models=ns, kernel_sizes=ks)
    rows = {}
    for k in ks:
        per_seed = {n: [] for n in ns}
        for seed in range(exp.seeds):
            run_dir, _ = exp.train(f'k{k}_s{seed}', members=max(ns), seed=max(ns) * seed, kernel_size=k)
            spec, states = load_members(te.member_paths(run_dir))
            x, y = exp.test_split(run_dir)
            for n in ns:
                merged = exp.evaluate(spec, [exp.merge(states[:n], spec, run_dir)], x, y)
                members = [exp.evaluate(spec, [s], x, y) for s in states[:n]]
                ensemble = exp.evaluate(spec, states[:n], x, y)
                per_seed[n].append(dict(merged_loss=merged[0], merged_acc=merged[1],
                                        member_loss=sum(m[0] for m in members) / n,
                                        member_acc=sum(m[1] for m in members) / n,
                                        ensemble_loss=ensemble[0], ensemble_acc=ensemble[1]))
        for n in ns:
            rows[k, n] = summarize(per_seed[n])
            exp.console.print(f"k={k}, n={n}: merged acc {rows[k, n]['merged_acc'][0]:.4f}, members "
                              f"{rows[k, n]['member_acc'][0]:.4f}, ensemble {rows[k, n]['ensemble_acc'][0]:.4f}",
                              highlight=False)
    keys = ('merged_acc', 'member_acc', 'ensemble_acc', 'merged_loss', 'member_loss', 'ensemble_loss')
    lines = [''] + markdown(['kernel size', 'models', *(k.replace('_', ' ') for k in keys)],
                            [[str(k), str(n), *(fmt(r[key]) for key in keys)] for (k, n), r in rows.items()])

    def figure(path):
        plt, fig, axes = _axes(2)
        for ax, what in zip(axes, ('acc', 'loss')):
            for i, k in enumerate(ks):
                for who, style in (('merged', '-'), ('member', ':'), ('ensemble', '--')):
                    r = [rows[k, n][f'{who}_{what}'] for n in ns]
                    ax.errorbar(ns, [m for m, _ in r], [s for _, s in r], linestyle=style, marker='o', capsize=3,
                                color=f'C{i}', label=f'k={k}: {who}')
            ax.set(xlabel='models merged (n)', ylabel=f'test {"accuracy" if what == "acc" else "loss"}')
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        _save(plt, fig, path, f'MergeMany against the members (mean) and their ensemble, {exp.seeds} seed(s)')
    exp.report('MergeMany against the number of models and the kernel size', lines,
               dict(rows={f'k={k} n={n}': r for (k, n), r in rows.items()}), figure)


@app.command('train-merge-train')
def train_merge_train(models: str = typer.Option('3,6', help='How many models are merged (n).'),
                      kernel_sizes: str = typer.Option('3', help='Conv kernel sizes k.'),
                      epochs: float = typer.Option(5, help='Epochs e of each phase '
                                                           '(the control trains 2e; the report: 5).'),
                      out: Out = None, seeds: Seeds = 3, quick: Quick = False, dataset: Dataset = 'fashion-mnist',
                      width: Width = 0.25, subset: Subset = 5000, examples: Examples = 2000, device: Device = 'auto'):
    """n models trained e epochs, merged, trained e more; against one model trained 2e epochs (the report's table)."""
    exp = Experiment('train-merge-train', out, seeds, quick, dataset, width, subset, examples, device, epochs)
    ns, ks, e = te.parse_ints(models), te.parse_ints(kernel_sizes), exp.epochs
    if quick:
        ns, ks = [2], ks[:1]
    exp.settings.update(models=ns, kernel_sizes=ks)
    rows = {}
    for k in ks:
        for n in ns:
            per_seed = []
            for seed in range(exp.seeds):
                first, _ = exp.train(f'k{k}_n{n}_s{seed}_first', members=n, seed=100 * seed, kernel_size=k)
                spec, states = load_members(te.member_paths(first))
                merged_path = exp.out / f'k{k}_n{n}_s{seed}_merged.safetensors'
                exp.merge(states, spec, first, merged_path)
                _, then = exp.train(f'k{k}_n{n}_s{seed}_then', members=1, seed=100 * seed, kernel_size=k,
                                    init=str(merged_path))
                _, control = exp.train(f'k{k}_s{seed}_control', members=1, seed=100 * seed + 99, kernel_size=k,
                                       epochs=2 * e)
                per_seed.append(dict(L=then['test_loss'], LC=control['test_loss'],
                                     L_LC=then['test_loss'] / control['test_loss'],
                                     A=then['test_acc'], AC=control['test_acc'],
                                     A_AC=then['test_acc'] / control['test_acc']))
            rows[k, n] = summarize(per_seed)
            exp.console.print(f"k={k}, n={n}: A/AC {rows[k, n]['A_AC'][0]:.4f}, L/LC {rows[k, n]['L_LC'][0]:.4f}",
                              highlight=False)
    keys = ('L', 'LC', 'L_LC', 'A', 'AC', 'A_AC')
    lines = ['', f'L, A: test loss and accuracy of n models trained {e:g} epochs, merged, then trained {e:g} more; '
                 f'LC, AC: one model trained {2 * e:g} epochs.', '']
    lines += markdown(['models, kernel size', *(k.replace('_', '/') for k in keys)],
                      [[f'{n} — {k}x{k}', *(fmt(r[key]) for key in keys)] for (k, n), r in rows.items()])

    def figure(path):
        plt, fig, axes = _axes(2)
        for ax, key in zip(axes, ('L_LC', 'A_AC')):
            for i, k in enumerate(ks):
                r = [rows[k, n][key] for n in ns]
                ax.errorbar(ns, [m for m, _ in r], [s for _, s in r], marker='o', capsize=3, color=f'C{i}',
                            label=f'k={k}')
            ax.axhline(1, color='gray', linestyle=':')
            ax.set(xlabel='models merged (n)', ylabel=key.replace('_', ' / '))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        _save(plt, fig, path, f'train-merge-train against a control of {2 * e:g} epochs, {exp.seeds} seed(s)')
    exp.report('Train, merge, train', lines, dict(rows={f'k={k} n={n}': r for (k, n), r in rows.items()}), figure)


@app.command('shards')
def shards(models: str = typer.Option('2,4,8', help='How many models are merged (n); '
                                                   'the data is cut into n + 1 parts.'),
           epochs_list: str = typer.Option('2,5', '--epochs', help='Epochs e of each model.'),
           batch_size: int = typer.Option(128, help="Batch size (airbench's 1024 would leave a part of a few hundred "
                                                     'images one step an epoch).'),
           out: Out = None, seeds: Seeds = 3, quick: Quick = False, dataset: Dataset = 'fashion-mnist',
           width: Width = 0.25, subset: Subset = 5000, examples: Examples = 2000, device: Device = 'auto'):
    """n models on disjoint shards, merged, trained on the held-back shard; against models trained on it alone."""
    exp = Experiment('shards', out, seeds, quick, dataset, width, subset, examples, device)
    ns, es = te.parse_ints(models), [float(e) for e in epochs_list.split(',')]
    if quick:
        ns, es = [2], [1.0]
    exp.settings.update(models=ns, epochs=es, batch_size=batch_size)
    kinds = ('models', 'merged', 'merged_trained', 'control_1', 'control_n')
    x, y = exp.test_split()   # one test set for every n (a run's own would shrink with its part)
    rows = {}
    for e in es:
        for n in ns:
            per_seed = []
            # --subset is the whole training set: each of the n + 1 disjoint parts keeps a class-balanced
            # 1/(n + 1) of it
            part = dict(members=1, epochs=e, batch_size=batch_size,
                        subset=exp.base['subset'] and max(1, exp.base['subset'] // (n + 1)))
            for seed in range(exp.seeds):
                name, last = f'n{n}_e{e:g}_s{seed}', f'{n}/{n + 1}'
                runs = [exp.train(f'{name}_model{i}', seed=100 * seed + i, shard=f'{i}/{n + 1}', **part)[0]
                        for i in range(n)]
                spec, states = first_members(runs)
                control_1, _ = exp.train(f'{name}_control1', seed=100 * seed + 50, shard=last, **part)
                merged_path = exp.out / f'{name}_merged.safetensors'
                merged = exp.merge(states, spec, control_1, merged_path)   # statistics on the last part's images
                trained, _ = exp.train(f'{name}_merged_trained', seed=100 * seed + 50, shard=last,
                                       init=str(merged_path), **part)
                control_n, _ = exp.train(f'{name}_control{n}', seed=100 * seed + 50, shard=last,
                                         **dict(part, epochs=n * e))
                models = [exp.evaluate(spec, [s], x, y) for s in states]
                _, finals = first_members([trained, control_1, control_n])
                numbers = dict(models=(sum(m[0] for m in models) / n, sum(m[1] for m in models) / n),
                               merged=exp.evaluate(spec, [merged], x, y),
                               **{kind: exp.evaluate(spec, [state], x, y) for kind, state in
                                  zip(('merged_trained', 'control_1', 'control_n'), finals)})
                per_seed.append({f'{kind}_{what}': numbers[kind][i]
                                 for kind in kinds for i, what in enumerate(('loss', 'acc'))})
            rows[e, n] = summarize(per_seed)
            exp.console.print(f"e={e:g}, n={n}: merged+trained acc {rows[e, n]['merged_trained_acc'][0]:.4f}, "
                              f"control 1 {rows[e, n]['control_1_acc'][0]:.4f}, "
                              f"control n {rows[e, n]['control_n_acc'][0]:.4f}", highlight=False)
    lines = ['', f"The training set cut into n + 1 disjoint parts. Test accuracy on {len(y)} test images "
                 "(loss below): the "
                 "n models (mean, each trained on its own part), their merge, the merge trained e epochs on the last "
                 "part, and one model trained on the last part for e (control 1) and n·e epochs (control n).", '']
    for what in ('acc', 'loss'):
        lines += markdown(['epochs e', 'models n', *(k.replace('_', ' ') for k in kinds)],
                          [[f'{e:g}', str(n), *(fmt(r[f'{k}_{what}']) for k in kinds)]
                           for (e, n), r in rows.items()]) + ['']

    def figure(path):
        plt, fig, axes = _axes(2)
        for ax, what in zip(axes, ('acc', 'loss')):
            for i, kind in enumerate(kinds):
                for e, style in zip(es, ('-', '--', ':', '-.')):
                    r = [rows[e, n][f'{kind}_{what}'] for n in ns]
                    ax.errorbar(ns, [m for m, _ in r], [s for _, s in r], linestyle=style, marker='o', capsize=3,
                                color=f'C{i}', label=f'{kind.replace("_", " ")}, e={e:g}')
            ax.set(xlabel='models merged (n); the data is cut into n + 1 parts',
                   ylabel=f'test {"accuracy" if what == "acc" else "loss"}')
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        _save(plt, fig, path, f'merging models trained on disjoint shards, {exp.seeds} seed(s)')
    exp.report('Merging models trained on disjoint shards', lines[:-1],
               dict(rows={f'e={e:g} n={n}': r for (e, n), r in rows.items()}), figure)


if __name__ == '__main__':
    with te.user_errors(rebasin.RebasinError):   # a missing dataset or bad option: one line, exit 2
        app()
