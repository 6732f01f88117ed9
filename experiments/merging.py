"""Merges that work (issue 24, part 5): every merge method of rebasin.py on the same networks, with seeds.

    python experiments/merging.py            # all three parts, 3 seeds (2 shared CPU cores: about 40 minutes)
    python experiments/merging.py --quick    # the smoke size the tests run

- same task: two independent models (the MLP 784-128-128-128 and airbench at width 0.125, both on
  Fashion-MNIST): the midpoint's test-loss barrier L(merge) − (L(A) + L(B))/2 for naive averaging, weight
  matching, activation matching, learned matching (ste) and zipping (zip). airbench midpoints have their
  BatchNorm statistics recomputed on training images, as every merge of the toolkit does.
- many models: 2, 4 and 8 members of one independent airbench ensemble, merged by each method (statistics
  recomputed): the merged model's test accuracy against the mean member's and the ensemble's.
- disjoint tasks: MLP A trained on classes 0-4 and MLP B on classes 5-9 (`train_ensemble.py --classes`),
  merged by each method and zipped partially at every K: joint 10-class accuracy and each task's accuracy,
  against the two models' ensemble, and against the merged model's parameter count (ZipIt's figure).

Training images for the data-driven merges are the first --examples of the full training set (for the
disjoint tasks: both tasks' images). Writes results.json, then results.md (mean ± standard deviation over
--seeds) and one PNG per part under --out (default runs/merging); finished runs are read back, interrupted
ones resumed, and each seed's measurements are kept in cache/, so an interrupted experiment continues.
"""
import json
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analyze  # noqa: E402
import rebasin  # noqa: E402
import train_ensemble as te  # noqa: E402

METHODS = ('naive', 'weight', 'activation', 'ste', 'zip')   # naive: the models averaged as they are
# held: training images per task that the disjoint-task models never train on (train_ensemble --val-size), on
# which zip's (α, β) are chosen from grid (ZipIt's authors' grid: 36 zips per setting, about 10 s per seed)
FULL = dict(seeds=3, mlp_hidden=[128, 128, 128], mlp_epochs=4, mlp_subset=None, width=0.125, subset=5000, epochs=3,
            models=[2, 4, 8], examples=2000, test_examples=None, steps=300, held=1000, grid=rebasin.ZIP_GRID)
QUICK = dict(seeds=1, mlp_hidden=[32, 32, 32], mlp_epochs=1, mlp_subset=600, width=1 / 16, subset=600, epochs=1,
             models=[2], examples=200, test_examples=500, steps=5, held=100,
             grid=dict(within=(1.0,), alpha=(0.3, 1.0), beta=(0.125, 1.0)))
AUTHORS = dict(within=1.0, alpha=0.3, beta=0.125)   # match_tensors_zipit's defaults
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class Experiment:
    def __init__(self, out, quick, seeds, device, steps, lr, within):
        self.s = dict(QUICK if quick else FULL)
        self.s.update({k: v for k, v in dict(seeds=seeds, steps=steps).items() if v is not None})
        self.s.update(lr=lr, within=within, dataset='fashion-mnist', date=time.strftime('%Y-%m-%d'))
        self.out, self.device, self.start = Path(out), te.resolve_device(device), time.perf_counter()
        self.console, self.quiet = Console(highlight=False, soft_wrap=True), Console(quiet=True)
        full = te.load_data('fashion-mnist')   # class-balanced order: any prefix holds every class
        self.x_train, self.y_train = full.x_train[:self.s['examples']], full.y_train[:self.s['examples']]
        self.x_test, self.y_test = full.x_test[:self.s['test_examples']], full.y_test[:self.s['test_examples']]

    def train(self, name, **options):
        cfg = te.Config(out=str(self.out / name), dataset='fashion-mnist', device=str(self.device), beta=0.0, **options)
        te.complete_run(cfg, self.quiet)
        return [te.load_member_state(p) for p in te.member_paths(self.out / name)]

    def cached(self, name, compute):
        """A seed's measurements, read back when an earlier call finished them."""
        path = self.out / 'cache' / f'{name}.json'
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        te.write_json(path, value)
        return value

    def module(self, spec, state):
        net = te.build_model(spec)
        net.load_state_dict(state)
        return net.to(self.device).eval()

    def scores(self, spec, states, classes=None):
        """Test (loss, accuracy) of the states' ensemble (one state: that model). classes: a task's accuracy
        as ZipIt measures it, on that task's images, the prediction the most probable of its classes."""
        x, y = self.x_test, self.y_test
        if classes is not None:
            keep, index = torch.isin(y, torch.tensor(classes)), torch.tensor(classes)
            x, y = x[keep], (y[keep, None] == index).long().argmax(1)   # labels as positions among the classes
        logits = te.predict_logits([self.module(spec, s) for s in states], x)
        if classes is not None:
            logits = logits[..., index.to(logits.device)]
        loss, error = analyze.ensemble_loss_error(logits, y.to(logits.device), 'prob')
        return loss, 1 - error

    def merge(self, method, spec, states, targets=None, plain=False, batches=None, zipping=None):
        """The merged state by a method of rebasin's registry (naive: the plain average), then its channel
        statistics restored on training images (batches; default: the first --examples): BatchNorm's
        recomputed or, without BatchNorm, REPAIR (zip: its own of either). plain: (that, the merged state as
        it is) for a network without BatchNorm. zipping: zip's alpha, beta, within (default: rebasin's, and
        --within)."""
        net = self.module(spec, states[0])
        perm_spec = rebasin.permutation_spec(net, torch.zeros(1, *te.input_shape(spec), device=self.device))
        batches = batches or te.float_batches(self.x_train, rebasin.BN_BATCH, self.device)
        zipping = zipping or dict(within=self.s['within'])
        options = dict(module=lambda s: self.module(spec, s), batches=batches, device=self.device, seed=0,
                       steps=self.s['steps'], lr=self.s['lr'], targets=targets, **zipping)
        if method == 'zip':   # its statistics are part of the method
            zipped = [rebasin.zip_models(perm_spec, states, options['module'], batches, device=self.device, bn=bn,
                                         **zipping)[0] for bn in (True, False)[:1 + plain]]
            return tuple(zipped) if plain else zipped[0]
        if method == 'naive':
            merged, perms = rebasin.average(states), [rebasin.identity_permutation(perm_spec)] * len(states)
        else:
            merged, perms = rebasin.merge_models(method, perm_spec, states, **options)
        net.load_state_dict(merged)
        if rebasin._batchnorms(net):
            return rebasin.reset_bn(net, batches)
        ends = [self.module(spec, rebasin.apply_permutation(perm_spec, q, s)) for q, s in zip(perms, states)]
        repaired = rebasin.repair_many(ends, [1 / len(ends)] * len(ends), net, batches)
        return (repaired, merged) if plain else repaired

    def labels(self):
        return list(self.y_train.to(self.device).split(rebasin.BN_BATCH))


def mlp_options(s, **extra):
    return dict(arch='mlp', hidden=s['mlp_hidden'], epochs=s['mlp_epochs'], subset=s['mlp_subset'], **extra)


def airbench_options(s, members):
    return dict(arch='airbench', width=s['width'], subset=s['subset'], epochs=s['epochs'], members=members)


def same_task(exp, seed):
    """Midpoint test-loss barriers of the MLP pair and the airbench pair (members 0 and 1 of the big run)."""
    s, rows = exp.s, {}
    pairs = {'mlp': exp.train(f'mlp_s{seed}', members=2, seed=2 * seed, **mlp_options(s)),
             'airbench': exp.train(f'airbench_s{seed}', seed=10 * seed, **airbench_options(s, max(s['models'])))[:2]}
    for arch, members in pairs.items():
        spec, states = members[0][0], [m[1] for m in members]
        ends = [exp.scores(spec, [state]) for state in states]
        for method in METHODS:
            merged = exp.merge(method, spec, states, exp.labels(), plain=arch == 'mlp')
            loss, acc = exp.scores(spec, [merged[0] if arch == 'mlp' else merged])
            row = dict(barrier=loss - sum(e[0] for e in ends) / 2, midpoint_acc=acc,
                       member_acc=sum(e[1] for e in ends) / 2)
            if arch == 'mlp':   # the plain midpoint too: what learned matching lowers
                loss, acc = exp.scores(spec, [merged[1]])
                row.update(plain_barrier=loss - sum(e[0] for e in ends) / 2, plain_midpoint_acc=acc)
            rows[f'{arch} {method}'] = row
        exp.console.print(f'seed {seed} {arch}: barriers ' + ', '.join(
            f"{m} {rows[f'{arch} {m}']['barrier']:.3f}" + (f" (plain {rows[f'{arch} {m}']['plain_barrier']:.3f})"
                                                            if arch == 'mlp' else '') for m in METHODS))
    return rows


def many_models(exp, seed):
    """n = 2, 4, 8 members of one airbench ensemble merged by each method."""
    s, rows = exp.s, {}
    members = exp.train(f'airbench_s{seed}', seed=10 * seed, **airbench_options(s, max(s['models'])))
    spec = members[0][0]
    for n in s['models']:
        states = [m[1] for m in members[:n]]
        member_acc = sum(exp.scores(spec, [state])[1] for state in states) / n
        row = dict(member_acc=member_acc, ensemble_acc=exp.scores(spec, states)[1])
        for method in METHODS:
            row[method] = exp.scores(spec, [exp.merge(method, spec, states, exp.labels())])[1]
        rows[str(n)] = row
        exp.console.print(f'seed {seed} airbench x{n}: mean member {member_acc:.4f}, '
                          f'ensemble {row["ensemble_acc"]:.4f}, '
                          + ', '.join(f'{m} {row[m]:.4f}' for m in METHODS))
    return rows


def task_split(exp, classes):
    """One task's training images as its model trains on them, and the images held out of its training."""
    data = te.load_data('fashion-mnist', classes=classes, val_size=exp.s['held'], subset=exp.s['mlp_subset'])
    return data.x_train, te.float_batches(data.x_val, rebasin.BN_BATCH), data.y_val


def disjoint(exp, seed):
    """MLP A on classes 0-4, MLP B on 5-9: joint and per-task test accuracy of each merge and partial zip;
    zip and partial zip also with ZipIt's (α, β) at the authors' defaults and tuned on held-out training images."""
    s, tasks = exp.s, ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    pair = [exp.train(f'disjoint_held_{t}_s{seed}', seed=2 * seed + t, classes=c, val_size=s['held'],
                      **mlp_options(s))[0] for t, c in enumerate(tasks)]
    spec, states = pair[0][0], [m[1] for m in pair]
    net = exp.module(spec, states[0])
    one = sum(p.numel() for p in net.parameters())
    perm_spec = rebasin.permutation_spec(net, torch.zeros(1, *te.input_shape(spec), device=exp.device))
    splits = [task_split(exp, c) for c in tasks]   # correlations on the models' own training images (half each)
    batches = te.float_batches(torch.cat([x[:s['examples'] // 2] for x, _, _ in splits]), rebasin.BN_BATCH,
                               exp.device)
    x_held, y_held = torch.cat([torch.cat(x) for _, x, _ in splits]), torch.cat([y for _, _, y in splits])

    def row(models, params, **extra):
        return dict(joint=exp.scores(spec, models)[1], task_a=exp.scores(spec, models, tasks[0])[1],
                    task_b=exp.scores(spec, models, tasks[1])[1], params=params / one, **extra)

    rows = {'ensemble': row(states, 2 * one), **{f'model {n}': row([st], one) for n, st in zip('AB', states)}}
    for method in ('naive', 'weight', 'activation', 'zip'):
        rows[method] = row([exp.merge(method, spec, states, batches=batches)], one)
    module = lambda st: exp.module(spec, st)  # noqa: E731
    rows['zip, ZipIt defaults'] = row([exp.merge('zip', spec, states, batches=batches, zipping=AUTHORS)], one)
    point, held, _ = rebasin.tune_zip(perm_spec, states, module, batches, x_held, y_held, s['grid'], None, exp.device)
    rows['zip, tuned'] = row([exp.merge('zip', spec, states, batches=batches, zipping=point)], one, held=held, **point)
    names = {k for k, _ in net.named_parameters()}
    for k in range(len(perm_spec.perms) + 1):
        settings = [('', dict(within=s['within']))]
        if k:
            point, held, _ = rebasin.tune_zip(perm_spec, states, module, batches, x_held, y_held, s['grid'], k,
                                              exp.device)
            settings.append((', tuned', dict(point, held=held)))
        for tag, point in settings:
            zipping = {key: v for key, v in point.items() if key != 'held'}
            branches, shared = rebasin.partial_zip(perm_spec, states, k, module, batches, device=exp.device, **zipping)
            trunk = sum(states[0][key].numel() for key in shared if key in names)
            rows[f'partial zip K={k}{tag}'] = row(branches, trunk + 2 * (one - trunk), **(point if tag else {}))
    exp.console.print(f'seed {seed} disjoint: ' + ', '.join(f"{m} {r['joint']:.4f}" for m, r in rows.items()))
    return rows


def summarize(per_seed):
    """{row: {key: (mean, std)}} over seeds of {row: {key: value}}."""
    return {r: {k: analyze.mean_std([p[r][k] for p in per_seed]) for k in per_seed[0][r]} for r in per_seed[0]}


def fmt(v, scale=1.0, digits=3):
    return f'{scale * v[0]:.{digits}f} ± {scale * v[1]:.{digits}f}'


def table(columns, rows):
    head = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    return head + ['| ' + ' | '.join(r) + ' |' for r in rows]


def report_lines(exp, results):
    s, lines = exp.s, []
    same = results['same_task']
    lines += ['', '## Same task: midpoint test-loss barrier', '',
              f"MLP 784-{'-'.join(map(str, s['mlp_hidden']))} ({s['mlp_epochs']} epochs) and airbench width "
              f"{s['width']:g} ({s['epochs']} epochs, {s['subset']} images). Barrier: L(merge) − (L(A) + L(B))/2 "
              'in test cross-entropy; accuracy in %. Plain: the merged weights as they are; REPAIR / BN reset: '
              'channel statistics restored on training images (zip: its own REPAIR or reset).', '']
    lines += table(['method', 'MLP barrier, plain', 'MLP barrier, REPAIR', 'MLP acc, REPAIR', 'airbench barrier, '
                    'BN reset', 'airbench acc'],
                   [[m, fmt(same[f'mlp {m}']['plain_barrier']), fmt(same[f'mlp {m}']['barrier']),
                     fmt(same[f'mlp {m}']['midpoint_acc'], 100, 1), fmt(same[f'airbench {m}']['barrier']),
                     fmt(same[f'airbench {m}']['midpoint_acc'], 100, 1)] for m in METHODS])
    many = results['many_models']
    lines += ['', f"## Many models: airbench width {s['width']:g}, test accuracy % (statistics recomputed)", '']
    lines += table(['method', *(f'{n} models' for n in many)],
                   [['mean member', *(fmt(r['member_acc'], 100, 1) for r in many.values())],
                    ['ensemble', *(fmt(r['ensemble_acc'], 100, 1) for r in many.values())]]
                   + [[m, *(fmt(r[m], 100, 1) for r in many.values())] for m in METHODS])
    if 'disjoint' in results:
        lines += ['', '## Disjoint tasks: MLP on classes 0-4 and on 5-9, test accuracy %', '',
                  "Joint: 10-way on all test images. Task A / B (ZipIt's per-task accuracy): on that task's images, "
                  'the most probable of its 5 classes.', '']
        lines += table(['merge', 'joint 10-class', 'task A (0-4)', 'task B (5-9)', 'parameters (× one model)'],
                       [[name, fmt(r['joint'], 100, 1), fmt(r['task_a'], 100, 1), fmt(r['task_b'], 100, 1),
                         f"{r['params'][0]:.2f}"] for name, r in results['disjoint'].items()])
        lines += ['', f"ZipIt defaults: α {AUTHORS['alpha']}, β {AUTHORS['beta']}, within-model weight 1. Tuned: "
                  f"(α, β) from the grid {s['grid']} by joint accuracy on {2 * s['held']} training images held "
                  'out of both models\' training (never the test set). Chosen per seed (held-out accuracy %):', '']
        lines += table(['merge', *(f'seed {i}' for i in range(len(results['disjoint_tuned'])))],
                       [[name, *(f"α {p[name]['alpha']:g}, β {p[name]['beta']:g} ({100 * p[name]['held']:.1f})"
                                 for p in results['disjoint_tuned'])] for name in results['disjoint_tuned'][0]])
    return lines


def figures(exp, results):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    same, many = results['same_task'], results['many_models']
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (arch, key, title) in zip(axes, (('mlp', 'plain_barrier', 'MLP, plain'), ('mlp', 'barrier', 'MLP, REPAIR'),
                                             ('airbench', 'barrier', 'airbench, BN reset'))):
        values = [same[f'{arch} {m}'][key] for m in METHODS]
        ax.bar(METHODS, [v[0] for v in values], yerr=[v[1] for v in values], capsize=3, color='C0')
        ax.set(title=title, ylabel='midpoint test-loss barrier')
        ax.tick_params(axis='x', labelrotation=30)   # five method names side by side would touch
        ax.grid(alpha=0.3, axis='y')
    save(plt, fig, exp.out / 'same_task.png', f"same task, mean ± std over {exp.s['seeds']} seed(s)")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ns = [int(n) for n in many]
    for i, key in enumerate(('member_acc', 'ensemble_acc', *METHODS)):
        values = [many[str(n)][key] for n in ns]
        ax.errorbar(ns, [100 * v[0] for v in values], [100 * v[1] for v in values], marker='o', capsize=3,
                    linestyle='--' if key.endswith('acc') else '-', label=key.replace('_acc', ''), color=f'C{i}')
    ax.set(xlabel='models merged', ylabel='test accuracy %', xticks=ns)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(plt, fig, exp.out / 'many_models.png', 'airbench members merged')
    if 'disjoint' in results:
        disjoint_figure(plt, results['disjoint'], exp.out / 'disjoint.png')


def disjoint_figure(plt, rows, path):
    """Left: the one-model merges side by side (they share one size, so one axis of sizes would stack them);
    right: accuracy against size, partial zips from one model's size to the ensemble's."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.8), gridspec_kw=dict(width_ratios=(1, 1.2)))
    single = [(name, r) for name, r in rows.items() if not name.startswith('partial') and r['params'][0] < 1.5]
    for i, (name, r) in enumerate(single):
        left.errorbar(i, 100 * r['joint'][0], 100 * r['joint'][1], marker='s', capsize=3, color=f'C{i}')
    left.set_xticks(range(len(single)), [name for name, _ in single], rotation=35, ha='right', fontsize=7)
    left.set(ylabel='joint 10-class test accuracy %', title='one model (1.0× parameters)')
    for tag, color, style in (('', 'C0', '-'), (', tuned', 'k', '--')):
        partial = [r for name, r in rows.items() if name.startswith('partial') and name.endswith('tuned') == bool(tag)]
        right.errorbar([r['params'][0] for r in partial], [100 * r['joint'][0] for r in partial],
                       [100 * r['joint'][1] for r in partial], marker='o', capsize=3, color=color, linestyle=style,
                       label=f'partial zip{tag}, K = {len(partial) - (not tag)} … {int(bool(tag))} (left to right)')
    for name, marker, color in (('ensemble', 's', 'C1'), ('zip, tuned', 'D', 'C9')):
        if name in rows:
            r = rows[name]
            right.errorbar(r['params'][0], 100 * r['joint'][0], 100 * r['joint'][1], marker=marker, capsize=3,
                           color=color, label=name, linestyle='none')
    right.set(xlabel="parameters (× one model's)", title='accuracy against size')
    right.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    save(plt, fig, path, 'disjoint tasks (0-4 / 5-9)')


def save(plt, fig, path, title):
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    te.save_figure(fig, path)
    plt.close(fig)


@app.command()
def main(out: Path = typer.Option(Path('runs/merging'), help='Where the runs and results go.'),
         quick: bool = typer.Option(False, '--quick', help='Tiny networks and data, 1 seed: the smoke test.'),
         seeds: int = typer.Option(None, help='Seeds per setting (default 3; --quick 1).'),
         steps: int = typer.Option(None, help='Learned-matching steps (default 300; --quick 5).'),
         lr: float = typer.Option(rebasin.STE_LR, help="Learned matching's learning rate."),
         within: float = typer.Option(rebasin.ZIP_WITHIN, help="Zipping's weight of a within-model pair."),
         parts: str = typer.Option('same,many,disjoint', help='Which parts to run (comma-separated).'),
         device: str = typer.Option('auto', help='auto, cpu or cuda.')):
    """Every merge method on the same task, on many models and on disjoint tasks, with seeds."""
    with te.user_errors(rebasin.RebasinError):
        exp = Experiment(out, quick, seeds, device, steps, lr, within)
        chosen = set(parts.split(','))
        sections = [('same_task', same_task, 'same', 'same_task'), ('many_models', many_models, 'many', 'many_models')]
        if 'classes' in te.option_defaults():   # train_ensemble.py --classes: models on disjoint label sets
            sections.append(('disjoint', disjoint, 'disjoint', 'disjoint_held'))   # held: models with held-out images
        results = {}
        for name, run, part, cache in sections:
            if part in chosen:
                per_seed = [exp.cached(f'{cache}_s{seed}', lambda: run(exp, seed)) for seed in range(exp.s['seeds'])]
                results[name] = summarize(per_seed)
                if name == 'disjoint':   # the (α, β) each seed's tuning chose
                    results['disjoint_tuned'] = [{r: v for r, v in p.items() if 'held' in v} for p in per_seed]
        if not {'same_task', 'many_models'} <= set(results):
            raise rebasin.RebasinError('results.md needs the parts same and many: add them to --parts')
        lines = [f"# Merging on Fashion-MNIST, {exp.s['seeds']} seed(s), {exp.s['date']}"] + report_lines(exp, results)
        lines.append(f'\n{time.perf_counter() - exp.start:.0f} s (cached seeds count only their reading).')
        exp.out.mkdir(parents=True, exist_ok=True)
        te.write_json(exp.out / 'results.json', dict(settings=exp.s, **results))
        te.write_text(exp.out / 'results.md', '\n'.join(lines) + '\n')
        figures(exp, results)
        exp.console.print('\n'.join(lines))
        exp.console.print(f'wrote {exp.out}/results.md, results.json and figures')


if __name__ == '__main__':
    app()
