"""analyze.py on ensembles of separate runs: three one-member runs trained apart (different seeds) are
evaluated as one three-member ensemble, whose numbers are those of their stacked logits; runs that do not
share dataset, task, input shape or number of classes are refused in one line; an ensemble of one member shows
one row. A run trained on some classes is evaluated on them, runs on disjoint classes on their union, and
--classes all on every class. The metrics are rows (key, label, format, function): a metric added as one row
shows in evaluate, compare and their JSON. The combiners analyze.py keeps (to work copied alone) equal
train_ensemble's."""
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

import analyze
import train_ensemble as te

SMALL = dict(arch='mlp', hidden=[64], members=1, subset=2000, epochs=1, device='cpu')


def npz(path, size=28, classes=10, n=200):
    """A tiny image dataset (uint8 NHWC) of another shape or number of classes than Fashion-MNIST's."""
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
    y = np.arange(n) % classes
    np.savez(path, x_train=x, y_train=y, x_test=x[:50], y_test=y[:50])
    return str(path)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Three one-member Fashion-MNIST runs (seeds 0, 1, 2), a two-member one, runs on classes 0-4 (low) and 5-9
    (high), runs of the same MLP on data of another input shape (14 x 14) and of another number of classes (5),
    and a regression run."""
    if not te.DEBIAN_FASHION_MNIST.exists():
        pytest.fail('Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (.ci/run does this)')
    root, quiet = tmp_path_factory.mktemp('ensembles'), Console(quiet=True)
    found = {}
    for seed in range(3):
        found[f's{seed}'] = root / f's{seed}'
        te.train(te.Config(dataset='fashion-mnist', seed=seed, out=str(found[f's{seed}']), **SMALL), console=quiet)
    found['pair'] = root / 'pair'
    te.train(te.Config(dataset='fashion-mnist', out=str(found['pair']), **dict(SMALL, members=2)), console=quiet)
    found['small_images'], found['five_classes'] = npz(root / 'small.npz', size=14), npz(root / 'five.npz', classes=5)
    for name in ('small_images', 'five_classes'):
        te.train(te.Config(dataset=found[name], out=str(root / name), **dict(SMALL, subset=None)), console=quiet)
        found[f'{name}_run'] = root / name
    for name, classes in (('low', [0, 1, 2, 3, 4]), ('high', [5, 6, 7, 8, 9])):
        found[name] = root / name
        te.train(te.Config(dataset='fashion-mnist', classes=classes, out=str(found[name]), **SMALL), console=quiet)
    found['regression'] = root / 'regression'
    te.train(te.Config(task='regression', dataset='synthetic-regression', out=str(found['regression']),
                       **dict(SMALL, hidden=[8], subset=None)), console=quiet)
    return found


def cli(*args):
    return CliRunner().invoke(analyze.make_app(), [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args):
    """Exit status 2 and one line naming the problem, never a traceback; returns that line."""
    result = cli(*args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and 'Traceback' not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return lines[0]


def stacked_logits(sources, split='test'):
    """The members of every source, stacked, on one split of the first source's data (the oracle)."""
    nets = [te.load_member(p) for s in sources for p in te.member_paths(s)]
    data = analyze.run_data(analyze.run_config(sources[0]))
    x, y = analyze.split_examples(data, split)
    return te.predict_logits(nets, x), y


def identifiers(obj):
    """Every key of a JSON object, at any depth."""
    if isinstance(obj, dict):
        return set(obj) | set().union(*(identifiers(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(set(), *(identifiers(v) for v in obj))
    return set()


# ---- several runs, one ensemble ----

def test_three_runs_trained_apart_are_one_ensemble_of_their_stacked_members(runs, tmp_path):
    sources = [runs['s0'], runs['s1'], runs['s2']]
    out = ok('evaluate', *sources, '--json', tmp_path / 'e.json')
    result = json.loads((tmp_path / 'e.json').read_text())
    assert result['runs'] == [str(s) for s in sources] and result['members'] == 3 and result['combiner'] == 'prob'
    assert all(str(s) in out for s in sources) and 'member 2' in out and 'diversity' in out
    logits, y = stacked_logits(sources)
    expected = analyze.ensemble_report(logits, y, 'prob')
    got = result['splits']['test']
    for key in ('acc', 'nll', 'brier', 'ece'):
        assert math.isclose(got['ensemble'][key], expected['ensemble'][key], rel_tol=1e-9), key
    # each member as its own run reported it; averaging probabilities never loses to the mean member (Jensen)
    for j, source in enumerate(sources):
        summary = json.loads((source / 'summary.json').read_text())
        assert math.isclose(got['members'][j]['acc'], summary['test_acc'], abs_tol=1e-6)
    assert got['ensemble']['nll'] < got['mean_member']['nll'] and got['div'] > 0
    assert all(re.fullmatch(r'[a-z_][a-z0-9_]*', key) for key in identifiers(result))   # no display strings


def test_the_combiner_is_the_first_runs_unless_combine_overrides_it(runs, tmp_path):
    ok('evaluate', runs['pair'], runs['s0'], '--combine', 'logit', '--json', tmp_path / 'e.json')
    result = json.loads((tmp_path / 'e.json').read_text())
    logits, y = stacked_logits([runs['pair'], runs['s0']])
    assert result['combiner'] == 'logit' and result['members'] == 3
    expected = analyze.prediction_metrics(F.log_softmax(logits.double().mean(0), -1), y)
    assert math.isclose(result['splits']['test']['ensemble']['nll'], expected['nll'], rel_tol=1e-9)
    assert "unknown combiner 'mean'" in refused('evaluate', runs['s0'], runs['s1'], '--combine', 'mean')


@pytest.mark.parametrize('command', ['debias', 'drop', 'robustness', 'ood', 'sharpness'])
def test_every_ensemble_command_takes_several_runs(runs, tmp_path, command):
    extra = {'debias': ['--examples', 500], 'drop': ['--fractions', '0.34'], 'sharpness': ['--examples', 100],
             'robustness': ['--corruptions', 'contrast', '--severities', '5', '--examples', 300],
             'ood': ['--ood', runs['five_classes'], '--examples', 50]}[command]
    out = ok(command, runs['s0'], runs['s1'], runs['s2'], *extra, '--json', tmp_path / 'r.json')
    result = json.loads((tmp_path / 'r.json').read_text())
    members = result['members']   # sharpness lists each member's numbers
    assert result['runs'] == [str(runs[s]) for s in ('s0', 's1', 's2')], out
    assert (len(members) if command == 'sharpness' else members) == 3
    assert all(re.fullmatch(r'[a-z_][a-z0-9_]*', key) for key in identifiers(result)), identifiers(result)
    assert f"{runs['s0']} + {runs['s1']} + {runs['s2']}" in out


def test_runs_that_do_not_share_dataset_input_shape_or_classes_are_refused_naming_what_differs(runs, tmp_path):
    line = refused('evaluate', runs['s0'], runs['small_images_run'])
    assert 'differ in dataset' in line and 'fashion-mnist' in line
    for name in ('small_images_run', 'five_classes_run'):   # member files alone: no config.json names a dataset
        (tmp_path / name).mkdir()
        shutil.copy(runs[name] / 'member_0.safetensors', tmp_path / name / 'loose.safetensors')
    line = refused('evaluate', runs['s0'], tmp_path / 'small_images_run' / 'loose.safetensors')
    assert 'differ in input shape ((1, 14, 14) vs (1, 28, 28))' in line
    loose = tmp_path / 'five_classes_run' / 'loose.safetensors'
    line = refused('ood', runs['s1'], loose, '--ood', runs['five_classes'])
    assert 'differ in number of classes (5 vs 10)' in line
    assert 'given twice' in refused('drop', runs['s0'], runs['s0'])
    for seed in (1, 2):   # generated data: another seed is another dataset
        te.train(te.Config(dataset='synthetic', seed=seed, out=str(tmp_path / f'synthetic{seed}'),
                           **dict(SMALL, hidden=[8], subset=200)), console=Console(quiet=True))
    line = refused('evaluate', tmp_path / 'synthetic1', tmp_path / 'synthetic2')
    assert 'differ in dataset (synthetic (seed 2) vs synthetic (seed 1))' in line


@pytest.mark.parametrize('command', ['evaluate', 'debias', 'drop', 'interpolate', 'robustness', 'sharpness'])
def test_a_dataset_of_another_input_shape_is_refused_in_one_line(runs, command):
    sources = [runs['pair'], runs['pair']] if command == 'interpolate' else [runs['pair']]
    line = refused(command, *sources, '--dataset', runs['small_images'])
    assert f"--dataset {runs['small_images']} has inputs of shape (1, 14, 14); the members take (1, 28, 28)" in line
    assert 'classes' in refused(command, *sources, '--dataset', runs['five_classes'])


def test_an_ensemble_of_one_member_shows_one_row_and_no_diversity(runs, tmp_path):
    out = ok('evaluate', runs['s0'], '--split', 'train', '--split', 'test', '--json', tmp_path / 'e.json')
    assert out.count('the one member (M = 1)') == 2   # one row per split
    assert 'mean member' not in out and 'diversity' not in out and 'DIV' not in out and 'div' not in out
    assert 'ensemble loss' in out   # the generalization gap stays
    test = json.loads((tmp_path / 'e.json').read_text())['splits']['test']
    assert test['div'] == 0 and test['double_fault'] is None and test['members'][0] == test['ensemble']
    out = ok('robustness', runs['s0'], '--corruptions', 'contrast', '--severities', '5', '--examples', 300,
             '--plot', tmp_path / 'r.png')
    assert 'mean member' not in out and 'DIV' not in out


# ---- classes ----

def test_a_run_on_some_classes_is_evaluated_on_them_and_classes_all_counts_every_class(runs, tmp_path):
    """By default on the run's own classes (the accuracy its training measured, not one over ten classes);
    --data-dir reads another cache of the dataset, in which the accuracy is checked by hand."""
    ok('evaluate', runs['low'], '--json', tmp_path / 'own.json')
    own = json.loads((tmp_path / 'own.json').read_text())
    summary = json.loads((runs['low'] / 'summary.json').read_text())
    assert own['classes'] == [0, 1, 2, 3, 4]
    assert math.isclose(own['splits']['test']['ensemble']['acc'], summary['test_acc'], abs_tol=1e-6)
    full = te.load_data('fashion-mnist', subset=3000)   # a cache of 3,000 training and 600 test images
    cache = dict(x_train=full.x_train, y_train=full.y_train, x_test=full.x_test[:600], y_test=full.y_test[:600])
    save_file({k: v.contiguous() for k, v in cache.items()}, tmp_path / 'fashion-mnist.safetensors')
    net = te.load_member(te.member_paths(runs['low'])[0])
    for classes, keep in ((None, cache['y_test'] < 5), ('all', torch.ones(600, dtype=torch.bool))):
        out = ok('evaluate', runs['low'], '--data-dir', tmp_path, '--split', 'all',
                 *(['--classes', classes] if classes else []), '--json', tmp_path / 'e.json')
        result = json.loads((tmp_path / 'e.json').read_text())
        x, y = cache['x_test'][keep], cache['y_test'][keep]
        by_hand = float((te.predict_logits([net], x)[0].argmax(-1) == y).double().mean())
        assert list(result['splits']) == ['train', 'test'] and result['splits']['test']['examples'] == len(y)
        assert result['splits']['test']['ensemble']['acc'] == by_hand
        assert result['classes'] == (list(range(10)) if classes else [0, 1, 2, 3, 4])
        assert f"test split ({len(y)} examples of {'all 10 classes' if classes else 'classes 0-4'})" in out
    assert len(y) == 600 and set(y.tolist()) == set(range(10))   # half of them classes the run never saw
    assert by_hand < 0.75 * own['splits']['test']['ensemble']['acc']
    assert analyze.class_text([0, 1, 2, 5, 7, 8]) == '0-2,5,7-8'


def test_runs_on_disjoint_classes_are_one_ensemble_on_their_union(runs, tmp_path):
    ok('evaluate', runs['low'], runs['high'], '--json', tmp_path / 'e.json')
    result = json.loads((tmp_path / 'e.json').read_text())
    assert result['members'] == 2 and result['classes'] == list(range(10))
    ok('evaluate', runs['low'], runs['high'], '--classes', '5-9', '--json', tmp_path / 'e.json')
    assert json.loads((tmp_path / 'e.json').read_text())['classes'] == [5, 6, 7, 8, 9]
    ok('evaluate', runs['low'], runs['s0'], '--json', tmp_path / 'e.json')   # s0 has no --classes: every class
    assert json.loads((tmp_path / 'e.json').read_text())['classes'] == list(range(10))


@pytest.mark.parametrize('command', ['evaluate', 'debias', 'drop', 'interpolate', 'sharpness', 'ood', 'robustness',
                                     'compare'])
def test_every_command_that_reads_examples_takes_classes_and_refuses_bad_ones(runs, tmp_path, command):
    extra = {'debias': ['--examples', 200], 'drop': ['--fractions', '0.5'], 'sharpness': ['--examples', 100],
             'interpolate': ['--points', 2, '--examples', 200], 'compare': ['--examples', 200], 'evaluate': [],
             'ood': ['--ood', runs['five_classes'], '--examples', 50],
             'robustness': ['--corruptions', 'contrast', '--severities', '5', '--examples', 200]}[command]
    sources = [runs['low'], runs['low']] if command == 'interpolate' else [runs['low']]
    out = ok(command, *sources, *extra, '--classes', '1,3', '--json', tmp_path / 'r.json')
    result = json.loads((tmp_path / 'r.json').read_text())
    assert (result['runs'][0] if command == 'compare' else result)['classes'] == [1, 3]
    assert 'classes 1,3' in out
    for bad, message in (('3-12', 'class 10 is out of range'), (',', 'names no class'), ('x', 'takes all or a list')):
        assert message in refused(command, *sources, *extra, '--classes', bad)
    if command != 'interpolate':
        assert 'regression' in refused(command, runs['regression'], *extra, '--classes', 'all')


# ---- metrics as rows ----

def test_double_fault_counts_the_member_pairs_that_are_both_wrong():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(5, 300, 4, generator=g), torch.randint(0, 4, (300,), generator=g)
    wrong = logits.argmax(-1) != y
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    brute = sum((wrong[i] & wrong[j]).double().mean() for i, j in pairs) / len(pairs)
    assert math.isclose(analyze.double_fault(logits, y), float(brute), rel_tol=1e-12)
    assert analyze.double_fault(logits[:1], y) is None   # one member has no pairs
    assert analyze.double_fault(logits[:1].expand(3, -1, -1), y) == float(wrong[0].double().mean())


def test_a_metric_added_as_one_row_shows_in_evaluate_compare_and_their_json(runs, tmp_path, monkeypatch):
    def all_wrong(logits, y, combiner):   # coincident failure: every member wrong
        return float((logits.argmax(-1) != y).all(0).double().mean())
    row = analyze.Metric('all_wrong', 'all members wrong', '.3f', all_wrong)
    monkeypatch.setattr(analyze, 'ENSEMBLE_METRICS', analyze.ENSEMBLE_METRICS + [row])
    sources = [runs['s0'], runs['s1'], runs['s2']]
    out = ok('evaluate', *sources, '--json', tmp_path / 'e.json')
    logits, y = stacked_logits(sources)
    value = all_wrong(logits, y, 'prob')
    assert 0 < value < 0.5
    assert re.search(rf'all members wrong +│ +{value:.3f} ', out)
    assert json.loads((tmp_path / 'e.json').read_text())['splits']['test']['all_wrong'] == value
    monkeypatch.setenv('COLUMNS', '400')   # wide enough that no header wraps
    out = ok('compare', runs['pair'], '--json', tmp_path / 'c.json')
    pair_logits, y = stacked_logits([runs['pair']])
    compared = json.loads((tmp_path / 'c.json').read_text())['runs'][0]
    value = all_wrong(pair_logits, y, 'prob')
    assert compared['test_all_wrong'] == value
    assert ' all members wrong ┃' in out and re.search(rf'│ +{value:.3f} │', out)
    assert compared['test_double_fault'] == analyze.double_fault(pair_logits.double(), y)


# ---- the combiners analyze.py keeps to work alone ----

def test_the_combiners_copied_into_analyze_equal_train_ensembles():
    g = torch.Generator().manual_seed(0)
    logits, y = 3 * torch.randn(4, 50, 7, generator=g, dtype=torch.float64), torch.randint(0, 7, (50,), generator=g)
    assert set(analyze._COMBINE) <= set(te.COMBINERS), 'the copy has a combiner train_ensemble.py lacks'
    for combiner, (task, predict) in analyze._COMBINE.items():   # the copy, used when analyze.py is alone
        assert task == te.COMBINERS[combiner].task
        log_p = None if task == 'regression' else torch.log_softmax(logits, -1)
        torch.testing.assert_close(predict(logits, log_p), te.combine(logits, combiner), rtol=0, atol=0)
    assert analyze._combiners().keys() == te.COMBINERS.keys()   # beside train_ensemble.py: its registry
    for combiner in te.COMBINERS:
        if combiner != 'mean':
            theirs = te.ensemble_terms(logits, y, combiner)[:2]   # member losses, the ensemble's
            for ours, expected in zip(analyze._ensemble_terms(logits, y, combiner), theirs):
                torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    targets = torch.randn(50, 7, generator=g, dtype=torch.float64)
    theirs = te.ensemble_terms(logits, targets, 'mean')[:2]
    for ours, expected in zip(analyze._ensemble_terms(logits, targets, 'mean'), theirs):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


# ---- help and plots ----

@pytest.mark.parametrize('command', [None, 'evaluate', 'compare', 'debias', 'drop', 'interpolate', 'sharpness',
                                     'ood', 'robustness'])
def test_help_lists_the_choices_and_cuts_nothing_off(command, monkeypatch):
    monkeypatch.setenv('COLUMNS', '80')
    out = ok(*([command] if command else []), '--help')
    assert '…' not in out and '...' not in re.sub(r'(\[ARGS\]|\{\w+\}|\w+)\.\.\.', '', out)   # a..., not cut
    if command in ('evaluate', 'debias', 'drop', 'ood', 'robustness'):
        assert 'Combiner: prob or logit' in out
    if command:   # a paragraph of the docstring wraps at the terminal's width, not the source's line breaks
        first = analyze._help(dict(analyze.COMMANDS)[command].__doc__).split('\n\n')[0]
        assert ' '.join(out.split()).count(' '.join(first.split())) == 1


def test_plots_of_one_member_runs_have_no_negative_div_and_legends_beside_the_panels(runs, tmp_path, monkeypatch):
    figures = {}
    monkeypatch.setattr(te, 'save_figure', lambda fig, path: figures.__setitem__(path.name, fig))
    ok('compare', runs['s0'], runs['s1'], '--plot', tmp_path / 'c.png')
    div_axis = figures['c.png'].axes[1]
    assert div_axis.get_ylim()[0] >= 0 and min(div_axis.get_yticks()) >= 0
    ok('robustness', runs['pair'], '--corruptions', 'contrast,brightness', '--severities', '1-3', '--examples', 200,
       '--plot', tmp_path / 'r.png')
    fig = figures['r.png']
    fig.canvas.draw()
    legend = fig.axes[-1].get_legend().get_window_extent()
    assert all(legend.x0 >= ax.get_window_extent().x1 for ax in fig.axes)   # right of every panel
    long = tmp_path / ('fashion-mnist_mlp_' + 'a_long_default_run_name_' * 4)   # wider than the figure alone
    shutil.copytree(runs['pair'], long)
    ok('interpolate', long, runs['pair'], '--member', '0,1', '--steps', 2, '--examples', 200,
       '--plot', tmp_path / 'i.png')
    fig = figures['i.png']
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width   # the title stays inside the figure
    legend = fig.axes[-1].get_legend().get_window_extent()
    assert all(legend.x0 >= ax.get_window_extent().x1 for ax in fig.axes)
