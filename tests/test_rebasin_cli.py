"""rebasin.py at first contact: `merge runs/*` merges the finished runs it is given, names what it skips and
merges the same models when run again; merge and align print and record the result's test accuracy beside
its sources'; merge restores the merged model's statistics by default where the training data can be had,
and says in one line when it cannot; every merge method of the registry keeps its promises; a copied
rebasin.py says in one line what its command line lacks, and its version."""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import rebasin
import train_ensemble as te
from rebasin import tune_zip
from conftest import ROOT
from test_copy_alone import BLOCK


def cli(*args):
    from typer.testing import CliRunner
    return CliRunner().invoke(rebasin.make_app(), [str(a) for a in args])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Three finished one-member MLP runs (a second each), trained once for the whole file."""
    root = tmp_path_factory.mktemp('trained')
    for seed in range(3):
        cfg = te.Config(dataset='synthetic', arch='mlp', hidden=[32], subset=256, batch_size=64, epochs=2,
                        device='cpu', seed=seed, data_seed=0, out=str(root / f'mlp_s{seed}'))   # one dataset
        te.train(cfg, console=Console(quiet=True))
    return root


@pytest.fixture
def runs(trained, tmp_path, monkeypatch):
    """A working directory whose runs/ holds the three runs and what else piles up there: a plot, an
    unfinished run, a folder of notes. Commands run from inside it, so default outputs land in it."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, 'runs')
    (tmp_path / 'runs' / 'coord.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(64))
    shutil.copytree(tmp_path / 'runs' / 'mlp_s0', tmp_path / 'runs' / 'unfinished')
    (tmp_path / 'runs' / 'unfinished' / 'summary.json').unlink()   # stopped before its end
    (tmp_path / 'runs' / 'notes').mkdir()
    (tmp_path / 'runs' / 'notes' / 'ideas.txt').write_text('try beta = 0.5')
    return tmp_path / 'runs'


def members(config):
    return [str(p) for p in config['sources']]


#############################################
#            merge runs/*, twice            #
#############################################

def test_merging_a_glob_over_runs_twice_merges_the_same_three_models_and_names_what_it_skips(runs):
    by_hand = cli('align', 'runs/mlp_s0', 'runs/mlp_s1', '--out', 'runs/by_hand', '--no-eval')   # an output in runs/
    assert by_hand.exit_code == 0, by_hand.output
    shutil.copytree(runs / 'mlp_s2', runs / 'training')
    lock = te.lock_run_dir(runs / 'training')   # as a trainer holds it while it writes
    before = sorted(p.name for p in runs.iterdir())
    outputs = []
    for _ in range(2):
        result = cli('merge', *sorted(glob.glob('runs/*')), '--test-examples', 128)   # what the shell's runs/* gives
        assert result.exit_code == 0, result.output
        for skipped in ('runs/coord.png: not a member checkpoint (a .png file)',
                        'runs/notes: holds no member_<i>.safetensors files',
                        'runs/unfinished: an unfinished run (1 of 1 member files, no summary.json)',
                        'runs/by_hand: the output of rebasin.py align, not a training run',
                        f'runs/training: still being written by process {os.getpid()}'):
            assert f'skipped {skipped}' in result.output, result.output
        assert 'merging 3 models from 3 runs' in result.output
        outputs.append(result.output.splitlines()[-1].rpartition('wrote ')[2])
    lock.close()
    assert outputs == ['merges/mlp_merge3', 'merges/mlp_merge3_2']   # beside the first, outside the glob
    assert sorted(p.name for p in runs.iterdir()) == before
    configs = [te.read_config(out) for out in outputs]
    assert members(configs[0]) == members(configs[1]) == [f'runs/mlp_s{i}/member_0.safetensors' for i in range(3)]
    first, second = (te.load_member_state(f'{out}/member_0.safetensors')[1] for out in outputs)
    assert all(torch.equal(first[k], second[k]) for k in first)   # the same merge, both times


def test_fewer_than_two_models_left_is_one_line_after_the_skips(runs):
    result = cli('merge', 'runs/mlp_s0', 'runs/coord.png', 'runs/notes')
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == 'error: merge needs at least two models; the paths given hold 1'
    assert not (runs.parent / 'merges').exists()


def test_member_files_named_explicitly_are_merged_even_from_an_output_or_an_unfinished_run(runs):
    result = cli('merge', 'runs/unfinished/member_0.safetensors', 'runs/mlp_s1/member_0.safetensors',
                 '--out', 'mine', '--no-eval')
    assert result.exit_code == 0 and 'skipped' not in result.output, result.output
    assert members(te.read_config('mine')) == ['runs/unfinished/member_0.safetensors',
                                               'runs/mlp_s1/member_0.safetensors']
    assert te.read_config('mine')['evaluation'] is None and 'test accuracy' not in result.output


#############################################
#         The result's test accuracy         #
#############################################

def test_merge_prints_and_records_the_merged_accuracy_beside_its_sources(runs):
    result = cli('merge', 'runs/mlp_s0', 'runs/mlp_s1', 'runs/mlp_s2', '--out', 'merged')
    assert result.exit_code == 0, result.output
    r = te.read_config('merged')['evaluation']
    data = te.load_run_data(te.read_config('runs/mlp_s0'))
    assert r['dataset'] == 'synthetic' and r['examples'] == len(data.y_test) == 256
    # each source's accuracy is the one its run reported, on the same test set
    reported = [json.loads((runs / f'mlp_s{i}' / 'summary.json').read_text())['test_acc'] for i in range(3)]
    assert r['source_test_acc'] == pytest.approx(reported, abs=1e-6)
    assert r['source_mean_test_acc'] == pytest.approx(sum(reported) / 3)
    nets = [te.load_member(runs / f'mlp_s{i}' / 'member_0.safetensors') for i in range(3)]
    assert r['tta']   # the runs' recipe measures with test-time augmentation: so does merge
    ensemble = te.evaluate(nets, data.x_test, data.y_test, 'prob', tta=True)
    assert r['source_ensemble_test_acc'] == pytest.approx(ensemble['acc'])
    merged = te.evaluate([te.load_member('merged/member_0.safetensors')], data.x_test, data.y_test, tta=True)
    assert r['test_acc'] == r['member_test_acc'][0] == pytest.approx(merged['acc'])
    assert 0 < r['test_acc'] < 1 and r['test_loss'] == pytest.approx(merged['loss'])
    lines = result.output.splitlines()
    assert 'test accuracy on synthetic (256 test examples, test-time augmentation):' in lines
    for label, value in [('runs/mlp_s1/member_0.safetensors', r['source_test_acc'][1]),
                         ('mean of the 3 source models', r['source_mean_test_acc']),
                         ('ensemble of the 3 (probability averaging)', r['source_ensemble_test_acc']),
                         ('merged', r['test_acc'])]:
        assert any(line.split() == [*label.split(), f'{100 * value:.2f}%'] for line in lines), (label, lines)


def test_align_prints_the_same_accuracy_for_each_aligned_member_as_for_its_source(runs):
    result = cli('align', 'runs/mlp_s0', 'runs/mlp_s1', '--test-examples', 100)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == 'wrote aligned/mlp_s1_aligned'
    r = te.read_config('aligned/mlp_s1_aligned')['evaluation']
    assert r['examples'] == 100 and len(r['source_test_acc']) == 2   # A, then B's one member
    assert r['member_test_acc'] == pytest.approx(r['source_test_acc'][1:])   # a permutation changes no prediction
    lines = result.output.splitlines()
    assert any(line.split()[:2] == ['runs/mlp_s1/member_0.safetensors', 'aligned'] for line in lines), lines


def test_a_test_set_that_cannot_be_had_offline_skips_the_accuracy_in_one_line_not_the_merge(runs, tmp_path):
    result = cli('merge', 'runs/mlp_s0', 'runs/mlp_s1', '--out', 'merged', '--dataset', 'cifar10',
                 '--data-dir', tmp_path / 'empty')
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith('test accuracy')]
    assert len(skipped) == 1 and skipped[0].startswith('test accuracy: skipped (') and 'cifar10' in skipped[0]
    assert 'skipped' in te.read_config('merged')['evaluation']
    te.load_member('merged/member_0.safetensors')
    # nor the statistics: one line, and the merge is the plain average
    stats = [line for line in result.output.splitlines() if line.startswith('statistics')]
    assert len(stats) == 1 and stats[0].startswith('statistics: REPAIR skipped, no training data (') \
        and 'cifar10' in stats[0] and stats[0].endswith('; the merged model is the plain average'), stats
    config = te.read_config('merged')
    assert config['stats'] == 'auto' and not config['repair'] and config['stats_why'].startswith('REPAIR skipped')


#############################################
#     Statistics restored unless told not    #
#############################################

def merged_state(out):
    return te.load_member_state(f'{out}/member_0.safetensors')[1]


def test_merge_repairs_an_mlp_by_default_as_repair_does_and_records_it(runs):
    for out, args in (('auto', []), ('repair', ['--repair']), ('none', ['--stats', 'none'])):
        result = cli('merge', 'runs/mlp_s0', 'runs/mlp_s1', '--out', out, '--no-eval', *args)
        assert result.exit_code == 0, result.output
        assert (out == 'auto') == ('(--stats auto: measured best for networks without BatchNorm; --stats none turns '
                                   'it off)' in result.output), result.output
        assert (out == 'none') == ('statistics' not in result.output), result.output
    configs = {out: te.read_config(out) for out in ('auto', 'repair', 'none')}
    assert [(c['stats'], c['repair'], c['reset_bn']) for c in configs.values()] == [
        ('auto', True, False), ('repair', True, False), ('none', False, False)]
    auto, repair, plain = map(merged_state, configs)
    assert all(torch.equal(auto[k], repair[k]) for k in auto)
    assert not torch.equal(auto['2.weight'], plain['2.weight'])   # the hidden layer rescaled


def test_without_a_known_dataset_auto_skips_in_one_line_and_an_explicit_choice_fails(runs, tmp_path):
    bare = tmp_path / 'bare'   # member files without their runs' config.json: no dataset is known
    bare.mkdir()
    for i in (0, 1):
        shutil.copy(runs / f'mlp_s{i}' / 'member_0.safetensors', bare / f'm{i}.safetensors')
    models = [bare / 'm0.safetensors', bare / 'm1.safetensors']
    result = cli('merge', *models, '--out', 'merged', '--no-eval')
    assert result.exit_code == 0, result.output
    stats = [line for line in result.output.splitlines() if line.startswith('statistics')]
    assert stats == ['statistics: REPAIR skipped, no training data (no dataset is known for this model: pass '
                     '--dataset); the merged model is the plain average'], result.output
    result = cli('merge', *models, '--out', 'repaired', '--repair')
    assert result.exit_code == 2 and result.output.splitlines()[-1] == ('error: no dataset is known for this model: '
                                                                        'pass --dataset'), result.output
    assert not (runs.parent / 'repaired').exists()


@pytest.mark.parametrize('args, says', [
    (['--stats', 'magic'], "unknown --stats 'magic': use one of auto, repair, reset-bn, none"),
    (['--repair', '--stats', 'none'], '--repair is --stats repair: it cannot go with --stats none'),
    (['--reset-bn', '--repair'], '--reset-bn and --repair are alternatives'),
    (['--stats', 'reset-bn'], '--reset-bn: these models have no BatchNorm layers'),
])
def test_a_statistics_choice_that_cannot_be_met_is_refused_in_one_line(runs, args, says):
    result = cli('merge', 'runs/mlp_s0', 'runs/mlp_s1', '--out', 'merged', *args)
    assert result.exit_code == 2 and result.output.splitlines()[-1].startswith(f'error: {says}'), result.output
    assert not (runs.parent / 'merged').exists()


#############################################
#     merge --tune: held-out images only    #
#############################################

@pytest.fixture(scope='module')
def validated(tmp_path_factory):
    """Two one-member MLP runs on a tiny 8x8 dataset, each holding 40 training images out (--val-size 40)."""
    root = tmp_path_factory.mktemp('validated')
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 160, (10, 8, 8), generator=g)

    def images(n):   # a class pattern plus noise: learnable in two epochs
        y = torch.arange(n) % 10
        return (patterns[y] + torch.randint(0, 96, (n, 8, 8), generator=g)).to(torch.uint8).numpy(), y.numpy()
    (x_train, y_train), (x_test, y_test) = images(400), images(100)
    np.savez(root / 'tiny.npz', x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    for seed in range(2):
        cfg = te.Config(dataset=str(root / 'tiny.npz'), arch='mlp', hidden=[16], val_size=40, batch_size=32,
                        epochs=2, device='cpu', seed=seed, out=str(root / f'val_s{seed}'))
        te.train(cfg, console=Console(quiet=True))
    return root


def test_tune_chooses_zip_settings_on_the_validation_split_alone_and_records_them(validated, tmp_path, monkeypatch):
    given = []
    monkeypatch.setattr(rebasin, 'tune_zip', lambda *args, **kw: given.append(args[4:6]) or tune_zip(*args, **kw))
    monkeypatch.setattr(rebasin, 'ZIP_GRID', dict(within=(1.0,), alpha=(0.1, 1.0), beta=(0.0, 1.0)))   # quick
    val = te.load_run_data(te.read_config(validated / 'val_s0'))
    for partial in ([], ['--partial', '1']):
        out = tmp_path / f'zip{len(partial)}'
        result = cli('merge', validated / 'val_s0', validated / 'val_s1', '--method', 'zip', '--tune', *partial,
                     '--out', out, '--examples', 200)
        assert result.exit_code == 0, result.output
        config = json.loads((out / 'config.json').read_text())
        tuned = config['tuned']
        assert {k: tuned[k] for k in ('alpha', 'beta')} in [dict(alpha=a, beta=b) for a in (0.1, 1.0) for b in (0, 1)]
        assert (config['alpha'], config['beta'], config['within']) == (tuned['alpha'], tuned['beta'], 1.0)
        assert tuned['held_out_examples'] == 40   # one split: both runs hold out the same 40 images
        assert (f"tuned: α {tuned['alpha']:g}, β {tuned['beta']:g}, within 1 (best of 4 grid points): "
                f"{100 * tuned['held_out_accuracy']:.2f}% on 40 held-out validation images") in result.output
        x, y = given.pop()
        assert torch.equal(x, te.to_float_images(val.split('val')[0])) and torch.equal(y, val.split('val')[1])
    tuned = json.loads((tmp_path / 'zip0' / 'config.json').read_text())['tuned']   # the merge used its choice
    by_hand = cli('merge', validated / 'val_s0', validated / 'val_s1', '--method', 'zip', '--alpha', tuned['alpha'],
                  '--beta', tuned['beta'], '--within', 1, '--out', tmp_path / 'by_hand', '--examples', 200, '--no-eval')
    assert by_hand.exit_code == 0, by_hand.output
    chosen, given = (te.load_member_state(tmp_path / d / 'member_0.safetensors')[1] for d in ('zip0', 'by_hand'))
    assert all(torch.equal(chosen[k], given[k]) for k in chosen)


@pytest.mark.parametrize('args, says', [
    (['--method', 'zip'], 'error: --tune scores zip settings on held-out images, but runs/mlp_s0 has no validation '
                          'split: train with --val-size N, or pass --alpha and --beta by hand'),
    (['--method', 'weight'], "error: --tune chooses zip's --alpha and --beta: it needs --method zip, not weight"),
    (['--method', 'zip', '--alpha', '1'], 'error: --tune chooses --alpha on held-out images: give it by hand or '
                                          'pass --tune, not both'),
])
def test_tune_without_a_validation_split_or_beside_what_it_chooses_is_refused_in_one_line(runs, args, says):
    result = cli('merge', 'runs/mlp_s0', 'runs/mlp_s1', '--tune', *args, '--out', 'merged')
    assert result.exit_code == 2 and result.output.splitlines() == [says], result.output
    assert not (runs.parent / 'merged').exists()


#############################################
#        Every merge method's promise       #
#############################################

def tiny_net():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize('method', list(rebasin.MERGE_METHODS))
def test_every_method_undoes_a_planted_permutation_and_merges_copies_into_the_model(method):
    torch.manual_seed(0)
    net, x = tiny_net(), torch.randn(256, 8)
    spec, state = rebasin.permutation_spec(net, x[:1]), net.state_dict()

    def module(s):
        twin = tiny_net()
        twin.load_state_dict(s)
        return twin

    options = dict(module=module, batches=[x[:128], x[128:]], device='cpu', seed=0)   # every caller passes these
    copies = [state] + [rebasin.apply_permutation(spec, rebasin.random_permutation(spec, seed=i), state)
                        for i in range(1, 4)]
    perm = rebasin.align_pair(method, spec, state, copies[1], **options)
    restored = rebasin.apply_permutation(spec, perm, copies[1])
    assert all(torch.equal(restored[k], state[k]) for k in state)   # the planted permutation, found exactly
    merged, perms = rebasin.merge_models(method, spec, copies, **options)
    assert len(perms) == 4 and all(torch.allclose(merged[k], state[k], atol=1e-6) for k in state)
    for command in ('align', 'merge'):   # the command line offers it, with its help
        assert method in cli(command, '--method', method, '--help').output


def test_an_unknown_method_is_refused_with_the_registry_s_names():
    names = ', '.join(rebasin.MERGE_METHODS)
    with pytest.raises(rebasin.RebasinError, match=f"unknown method 'magic': use one of {names}"):
        rebasin.merge_models('magic', None, [])


#############################################
#                 Help texts                #
#############################################

def test_help_lists_each_command_on_one_line_and_cuts_nothing_off():
    top = cli('--help').output
    commands = top.split('─ Commands ─')[1].splitlines()[1:]
    rows = [line for line in commands if line.startswith('│ ')]
    assert [row.split()[1] for row in rows] == ['spec', 'align', 'merge']   # one row each: nothing ragged
    for args in (['--help'], ['spec', '-h'], ['align', '-h'], ['merge', '-h']):
        output = cli(*args).output
        assert '…' not in output and 'Usage' in output, output


#############################################
#           Copied alone: the CLI           #
#############################################

# The blocker of tests/test_copy_alone.py, blocking only `blocked`, then the command line as a user runs it.
CHECK = """
BLOCKED.clear()
BLOCKED.update(%r)
import runpy
sys.argv = ['rebasin.py', 'merge', 'runs/a', 'runs/b']
runpy.run_path('rebasin.py', run_name='__main__')
"""


VERSION = f'rebasin.py: checkpoints {te.FORMAT}; torch {torch.__version__}'


@pytest.mark.parametrize('blocked, says', [
    ({'train_ensemble'}, 'rebasin.py merge needs train_ensemble.py beside it'),
    ({'train_ensemble', 'typer', 'rich'}, 'rebasin.py merge needs the packages typer and rich (pip install typer '
                                          'rich)'),
])
def test_a_copied_rebasin_py_says_in_one_line_what_its_command_line_lacks(tmp_path, blocked, says):
    shutil.copy(ROOT / 'rebasin.py', tmp_path / 'rebasin.py')
    (tmp_path / 'check.py').write_text("SELF = 'rebasin'" + textwrap.dedent(BLOCK) + CHECK % (blocked,))
    result = subprocess.run([sys.executable, 'check.py'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == '', result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f'error: {says}'), result.stderr


def test_version_names_the_checkpoint_format_and_torch_also_when_copied_alone(monkeypatch, capsys):
    result = cli('--version')
    assert result.exit_code == 0 and result.output == VERSION + '\n', result.output
    monkeypatch.setitem(sys.modules, 'train_ensemble', None)   # copied alone: train_ensemble does not import
    monkeypatch.setattr(sys, 'argv', ['rebasin.py', '--version'])
    with pytest.raises(SystemExit) as exited:
        rebasin.main()
    assert exited.value.code == 0
    alone = f'rebasin.py: checkpoints none (needs train_ensemble.py); torch {torch.__version__}\n'
    assert capsys.readouterr().out == alone
