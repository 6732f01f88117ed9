"""The claims train_ensemble.py makes, on real numbers (CPU, synthetic data or a Fashion-MNIST slice)."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import ROOT

import train_ensemble as te

def quiet_console():
    from rich.console import Console
    return Console(quiet=True)


def run(tmp_path, name, **options):
    cfg = te.Config(out=str(tmp_path / name), device='cpu', **options)
    return te.train(cfg, console=quiet_console())


def member_states(run_dir):
    return [load_file(p) for p in te.member_paths(run_dir)]


SMALL_AIRBENCH = dict(dataset='synthetic', arch='airbench', width=1 / 16, subset=256, batch_size=64, epochs=2)
TINY_MLP = dict(dataset='synthetic', arch='mlp', hidden=[32], subset=256, batch_size=64, epochs=3)


# ---- the objective ----

def member_outputs(combiner, members=3, batch=64, seed=1):
    """Random member outputs and targets for a COMBINERS entry's task, in float64."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(members, batch, 10, generator=g, dtype=torch.float64)
    if te.COMBINERS[combiner].task == 'regression':
        return logits, torch.randn(batch, 10, generator=g, dtype=torch.float64)
    return logits, torch.randint(10, (batch,), generator=g)


@pytest.mark.parametrize('combiner', te.COMBINERS)
def test_every_combiner_gives_each_member_its_solo_gradient_at_beta0(combiner):
    logits, y = member_outputs(combiner)
    logits.requires_grad_()
    smoothing = 0.2 if te.COMBINERS[combiner].task == 'classification' else 0.0
    objective, _ = te.ensemble_objective(logits, y, beta=0.0, combiner=combiner, label_smoothing=smoothing)
    objective.backward()
    for j in range(3):
        solo = logits[j:j + 1].detach().clone().requires_grad_()   # an ensemble of one: the member alone
        te.ensemble_objective(solo, y, beta=0.0, combiner=combiner, label_smoothing=smoothing)[0].backward()
        assert torch.allclose(logits.grad[j], solo.grad[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize('combiner', te.COMBINERS)
def test_every_combiner_has_nonnegative_diversity_that_vanishes_for_identical_members(combiner):
    logits, y = member_outputs(combiner, members=5)
    member, ensemble, div = te.ensemble_terms(logits, y, combiner)
    assert (div >= -1e-12).all() and div.mean() > 0
    assert torch.allclose(div, member.mean(0) - ensemble)
    same = logits[:1].expand(4, -1, -1)
    assert te.ensemble_terms(same, y, combiner)[2].abs().max() < 1e-12


def test_the_solo_gradient_is_the_members_own_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 64, 10, generator=g, requires_grad=True)
    y = torch.randint(10, (64,), generator=g)
    objective, _ = te.ensemble_objective(logits, y, beta=0.0, combiner='prob', label_smoothing=0.2)
    objective.backward()
    for j in range(3):
        solo = logits[j].detach().clone().requires_grad_()
        te.cross_entropy(torch.log_softmax(solo, -1), y, 0.2).sum().backward()
        assert torch.allclose(logits.grad[j], solo.grad, atol=1e-6)


def test_objective_at_beta1_is_M_times_the_ensemble_loss_and_bagging_weights_members():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 32, 10, generator=g)
    y = torch.randint(10, (32,), generator=g)
    objective, (_, ensemble_ce) = te.ensemble_objective(logits, y, 1.0, 'prob')
    assert torch.allclose(objective, 4 * ensemble_ce.sum())
    weights = torch.randint(0, 3, (4, 32), generator=g).float()
    objective, (member_ce, ensemble_ce) = te.ensemble_objective(logits, y, 0.25, 'logit', weights=weights)
    expected = 0.75 * (weights * member_ce).sum() + 0.25 * 4 * (weights.mean(0) * ensemble_ce).sum()
    assert torch.allclose(objective, expected)


# ---- training ----

def assert_members_train_as_if_alone(tmp_path, members, options, **tolerance):
    """An M-member β=0 run ends with member j's weights equal to a single-member run with member j's
    init seed (seed + j) and the ensemble's batches (data seed)."""
    run(tmp_path, 'ensemble', members=members, beta=0.0, seed=10, **options)
    ensemble = member_states(tmp_path / 'ensemble')
    for j in range(members):
        run(tmp_path, f'solo{j}', members=1, seed=10 + j, data_seed=10, **options)
        solo = member_states(tmp_path / f'solo{j}')[0]
        for key in solo:
            assert torch.allclose(ensemble[j][key], solo[key], **tolerance), (j, key)


def test_at_beta0_an_ensemble_trains_each_member_exactly_as_if_alone(tmp_path, float64):
    """To float64 precision, through the whole recipe: schedule, weight decay, Lookahead from epoch 3."""
    options = dict(dataset='synthetic', arch='mlp', hidden=[32, 16], subset=256, batch_size=32, epochs=4,
                   lookahead=True, label_smoothing=0.2)
    assert_members_train_as_if_alone(tmp_path, 3, options, atol=1e-12, rtol=0)


def test_the_wide_conv_network_with_batchnorm_trains_members_as_if_alone(tmp_path):
    """The same claim through grouped convs, BatchNorm and augmentation (float32, 2 epochs: before the
    high-lr phase amplifies rounding)."""
    assert_members_train_as_if_alone(tmp_path, 2, SMALL_AIRBENCH, atol=1e-5, rtol=1e-4)


def test_joint_run_writes_the_run_directory_and_members_reload_exactly(tmp_path):
    out = tmp_path / 'joint'
    last_state = tmp_path / 'last_state.safetensors'   # the resume state is removed once the members are written

    def keep_state(epoch):
        shutil.copy(out / 'state.safetensors', last_state)
    cfg = te.Config(out=str(out), device='cpu', members=3, beta=1.0, **SMALL_AIRBENCH)
    summary = te.train(cfg, console=quiet_console(), on_epoch_end=keep_state)
    for name in ['config.json', 'metrics.jsonl', 'summary.json'] + [f'member_{j}.safetensors' for j in range(3)]:
        assert (out / name).is_file(), name
    assert not (out / 'state.safetensors').exists()
    lines = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    keys = {'epoch', 'time_s', 'lr', 'train_objective', 'train_loss', 'train_acc', 'test_loss', 'test_acc',
            'member_test_loss', 'member_test_acc', 'train_div', 'test_div'}
    assert len(lines) == 2 and keys <= set(lines[-1])
    assert keys | {'train_time_s'} <= set(summary)
    config = json.loads((out / 'config.json').read_text())
    assert config['beta'] == 1.0 and config['lr'] == te.RECIPES['airbench']['lr'] and 'torch' in config['versions']

    # The wide network in the resume state and the rebuilt members compute the same logits.
    spec = config['model']
    wide = te.build_model(spec, members=3)
    wide.load_state_dict({k[4:]: v for k, v in load_file(last_state).items() if k.startswith('net/')})
    x = torch.rand(16, 3, 32, 32)
    expected = te.member_logits(wide.eval(), x, 3)
    _, members = te.load_run(out)
    for j, member in enumerate(members):
        assert torch.allclose(member(x), expected[j], atol=1e-5)
    # ...and the summary's numbers are what the rebuilt members give (TTA on for 3-channel data).
    data = te.load_data('synthetic', subset=256)
    again = te.evaluate(members, data.x_test, data.y_test, 'prob', tta=summary['tta'])
    assert again['acc'] == pytest.approx(summary['test_acc'], abs=1e-6)
    assert again['div'] == pytest.approx(summary['test_div'], abs=1e-4)


def test_resume_after_interruption_finishes_with_the_same_weights(tmp_path):
    options = dict(SMALL_AIRBENCH, members=2, beta=0.5, lookahead=True, bagging=True, epochs=4)
    run(tmp_path, 'straight', **options)

    def interrupt(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        te.train(te.Config(out=str(tmp_path / 'resumed'), device='cpu', **options), console=quiet_console(),
                 on_epoch_end=interrupt)
    assert not (tmp_path / 'resumed' / 'member_0.safetensors').exists()
    result = CliRunner().invoke(cli(), ['--resume', str(tmp_path / 'resumed')])
    assert result.exit_code == 0, result.output
    for a, b in zip(member_states(tmp_path / 'straight'), member_states(tmp_path / 'resumed')):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    lines = (tmp_path / 'resumed' / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line)['epoch'] for line in lines] == [0, 1, 2, 3]


def test_init_starts_every_member_from_given_weights(tmp_path):
    run(tmp_path, 'a', members=1, **SMALL_AIRBENCH)
    source = load_file(tmp_path / 'a' / 'member_0.safetensors')
    cfg = te.resolve_config(te.Config(members=3, init=str(tmp_path / 'a' / 'member_0.safetensors'), **SMALL_AIRBENCH))
    data = te.load_data('synthetic', subset=256)
    states = te.initial_member_states(cfg, te.model_spec(cfg, data), data)
    assert len(states) == 3 and all(torch.equal(s[k], source[k]) for s in states for k in source)


# ---- data ----

def test_shards_are_disjoint_and_class_balanced_and_val_split_is_held_out(fashion_mnist):
    full = te.load_data(fashion_mnist, val_size=1000)
    shards = [te.load_data(fashion_mnist, val_size=1000, shard=(i, 4)) for i in range(4)]
    assert sum(len(s.y_train) for s in shards) == len(full.y_train)
    flat = lambda x: {bytes(row) for row in x.flatten(1).numpy()}   # noqa: E731
    parts = [flat(s.x_train) for s in shards]
    assert sum(len(p) for p in parts) == len(set().union(*parts))     # disjoint
    assert not flat(full.x_val) & set().union(*parts)                 # validation never trained on
    counts = torch.stack([torch.bincount(s.y_train, minlength=10) for s in shards])
    assert (counts.max(0).values - counts.min(0).values).max() <= 1  # every class dealt evenly


def test_npz_datasets_load_in_nhwc_and_nchw(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 20)
    np.savez(tmp_path / 'nhwc.npz', x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    np.savez(tmp_path / 'nchw.npz', x_train=x.transpose(0, 3, 1, 2), y_train=y, x_test=x[:5].transpose(0, 3, 1, 2),
             y_test=y[:5])
    a, b = te.load_data(str(tmp_path / 'nhwc.npz')), te.load_data(str(tmp_path / 'nchw.npz'))
    assert a.x_train.shape == (20, 3, 8, 8) and torch.equal(a.x_train, b.x_train)


def test_synthetic_data_is_deterministic_and_learnable_but_not_trivial(tmp_path):
    assert torch.equal(te.load_data('synthetic', seed=3, subset=100).x_train,
                       te.load_data('synthetic', seed=3, subset=100).x_train)
    summary = run(tmp_path, 'syn', members=1, dataset='synthetic', arch='mlp', hidden=[128], subset=2000, epochs=3)
    assert 0.5 < summary['test_acc'] < 0.995


# ---- real data: Fashion-MNIST ----

def test_on_fashion_mnist_models_learn_and_joint_training_inflates_diversity(tmp_path, fashion_mnist):
    common = dict(dataset=fashion_mnist, arch='mlp', hidden=[64], members=3, subset=5000, epochs=3)
    independent = run(tmp_path, 'beta0', beta=0.0, **common)
    joint = run(tmp_path, 'beta1', beta=1.0, **common)
    assert independent['test_acc'] > 0.75 and min(independent['member_test_acc']) > 0.7   # chance is 0.1
    assert joint['train_div'] > 5 * independent['train_div']
    assert joint['test_div'] > 5 * independent['test_div']


# ---- the command line ----

def cli():
    import typer
    app = typer.Typer()
    app.command()(te.command())
    return app


@pytest.mark.parametrize('args, message', [
    (['--beta', '1.5'], 'allow-unstable'),
    (['--members', '0'], 'members'),
    (['--dataset', 'imagenet'], 'unknown dataset'),
    (['--combine', 'median'], 'unknown combiner'),
    (['--shard', '3/2'], 'shard'),
    (['--beta', '-0.5'], '--beta must be'), (['--beta', 'nan'], '--beta must be'),
    (['--lr', '-1'], '--lr must be'), (['--lr', '0'], '--lr must be'), (['--momentum', '1'], '--momentum must be'),
    (['--epochs', 'nan'], '--epochs must be'), (['--epochs', 'inf'], '--epochs must be'),
    (['--label-smoothing', '2'], '--label-smoothing must be'), (['--examples', '0'], '--examples must be'),
    (['--subset', '-5'], '--examples must be'), (['--arch', 'mlp', '--hidden', '0'], '--hidden must be'),
    (['--arch', 'mlp', '--hidden', '64,-3'], '--hidden must be'), (['--width', '0'], '--width must be'),
    (['--width', '-1'], '--width must be'), (['--kernel-size', '0'], '--kernel-size must be'),
    (['--hidden', '1,x'], 'comma-separated integers'),
])
def test_bad_options_get_a_one_line_error(args, message, tmp_path):
    result = CliRunner().invoke(cli(), args + ['--out', str(tmp_path / 'x')])
    assert result.exit_code == 2 and message in result.output and 'Traceback' not in result.output
    assert not (tmp_path / 'x').exists()


def test_corrupt_or_missing_checkpoints_get_a_one_line_error(tmp_path):
    bad = tmp_path / 'member_0.safetensors'
    bad.write_bytes(b'not a safetensors file')
    for args, message in [(['--init', str(bad)], 'not a readable safetensors'),
                          (['--init', str(tmp_path / 'nope.safetensors')], 'does not exist'),
                          (['--resume', str(tmp_path / 'nothing')], 'no config.json')]:
        result = CliRunner().invoke(cli(), args + ['--dataset', 'synthetic', '--subset', '64',
                                                   '--out', str(tmp_path / 'o')])
        assert result.exit_code == 2 and message in result.output, result.output
    run(tmp_path, 'r', members=1, **SMALL_AIRBENCH)
    (tmp_path / 'r' / 'state.safetensors').write_bytes(b'\x00' * 10)
    (tmp_path / 'r' / 'summary.json').unlink()   # an unfinished run, so that --resume reads the state
    result = CliRunner().invoke(cli(), ['--resume', str(tmp_path / 'r')])
    assert result.exit_code == 2 and 'safetensors' in result.output


# ---- nothing lost ----

def test_a_run_killed_before_its_first_resume_state_resumes_from_its_config(tmp_path):
    """Killed during epoch 0: only config.json (and maybe a stale temporary) is there. --resume starts
    over from the same seeds and ends with the weights of an uninterrupted run."""
    options = dict(TINY_MLP, members=2, beta=0.5)
    run(tmp_path, 'straight', **options)
    killed = tmp_path / 'killed'
    killed.mkdir()
    (killed / 'config.json').write_text((tmp_path / 'straight' / 'config.json').read_text()
                                        .replace(str(tmp_path / 'straight'), str(killed)))
    (killed / '.state.safetensors.tmp4242').write_bytes(b'half a file')
    result = CliRunner().invoke(cli(), ['--resume', str(killed)])
    assert result.exit_code == 0, result.output
    for a, b in zip(member_states(tmp_path / 'straight'), member_states(killed)):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert not list(killed.glob('.*tmp*'))


def test_a_run_killed_while_writing_its_members_is_finished_without_training(tmp_path):
    """Killed after the last epoch's resume state but before the member files: --resume writes them
    (and summary.json, last) from the state; the weights are those of the finished run."""
    last_state = tmp_path / 'last_state.safetensors'
    cfg = te.Config(out=str(tmp_path / 'done'), device='cpu', members=2, beta=1.0, **TINY_MLP)
    te.train(cfg, console=quiet_console(),
             on_epoch_end=lambda epoch: shutil.copy(tmp_path / 'done' / 'state.safetensors', last_state))
    before = member_states(tmp_path / 'done')
    summary = json.loads((tmp_path / 'done' / 'summary.json').read_text())
    for name in ['summary.json', 'member_1.safetensors', 'member_0.safetensors']:
        (tmp_path / 'done' / name).unlink()
    shutil.copy(last_state, tmp_path / 'done' / 'state.safetensors')   # as the kill left it
    result = CliRunner().invoke(cli(), ['--resume', str(tmp_path / 'done')])
    assert result.exit_code == 0, result.output
    for a, b in zip(before, member_states(tmp_path / 'done')):
        assert all(torch.equal(a[key], b[key]) for key in a)
    again = json.loads((tmp_path / 'done' / 'summary.json').read_text())
    assert again['test_acc'] == summary['test_acc'] and again['train_time_s'] == summary['train_time_s']
    result = CliRunner().invoke(cli(), ['--resume', str(tmp_path / 'done')])
    assert result.exit_code == 2 and 'already complete' in result.output


def test_divergence_is_refused_before_anything_is_written_and_json_never_holds_nan(tmp_path):
    with pytest.raises(te.EnsembleError, match='diverged'):
        run(tmp_path, 'boom', lr=1e9, **TINY_MLP)
    out = tmp_path / 'boom'
    assert not (out / 'state.safetensors').exists() and not (out / 'metrics.jsonl').exists()
    for path in out.glob('*.json*'):
        for line in path.read_text().splitlines():
            assert 'NaN' not in line and 'Infinity' not in line, path
    assert te.json_safe({'a': [1.0, float('nan')], 'b': float('inf')}) == {'a': [1.0, None], 'b': None}


def test_one_writer_per_run_directory(tmp_path):
    """A second writer is refused at once, naming the owner, and writes nothing; the lock dies with its owner."""
    out = tmp_path / 'busy'
    out.mkdir()
    owner = te.lock_run_dir(out)
    with pytest.raises(te.EnsembleError, match='being written by process'):
        run(tmp_path, 'busy', **TINY_MLP)
    assert not (out / 'config.json').exists()
    owner.close()   # the owner ends (a killed process's lock is released by the OS the same way)
    run(tmp_path, 'busy', **TINY_MLP)
    assert (out / 'summary.json').exists()


def test_readers_refuse_an_unfinished_run_and_say_how_to_finish_it(tmp_path):
    run(tmp_path, 'r', members=2, **TINY_MLP)
    (tmp_path / 'r' / 'member_1.safetensors').unlink()   # as if killed while writing the members
    (tmp_path / 'r' / 'summary.json').unlink()
    with pytest.raises(te.EnsembleError, match='unfinished run .*--resume'):
        te.load_run(tmp_path / 'r')
    with pytest.raises(te.EnsembleError, match='unfinished run'):
        run(tmp_path, 'init', members=2, init=str(tmp_path / 'r'), **TINY_MLP)
    assert not (tmp_path / 'init').exists()


def npz(path, **overrides):
    g = np.random.default_rng(0)
    arrays = dict(x_train=g.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8), y_train=np.arange(40) % 4,
                  x_test=g.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8), y_test=np.arange(12) % 4)
    np.savez(path, **{**arrays, **overrides})
    return path


@pytest.mark.parametrize('make, message', [
    (lambda p: npz(p, y_train=-(np.arange(40) % 4)), 'negative label'),
    (lambda p: npz(p, y_train=np.zeros((40, 2), dtype=np.int64)), '1-D array of integer labels'),
    (lambda p: npz(p, y_train=(np.arange(40) % 4).astype(np.float32)), '1-D array of integer labels'),
    (lambda p: npz(p, y_train=np.arange(30) % 4), 'must match'),
    (lambda p: npz(p, x_train=np.zeros((0, 8, 8, 3), np.uint8), y_train=np.zeros(0, np.int64)),
     'must match and not be empty'),
    (lambda p: npz(p, x_test=np.zeros((12, 6, 6, 3), np.uint8)), 'test images are'),
    (lambda p: npz(p, y_test=np.full(12, 12)), 'no image of class'),
    (lambda p: (np.save(str(p) + '.npy', np.zeros(3)), (p.parent / (p.name + '.npy')).rename(p))[1], 'cannot read'),
    (lambda p: p.write_bytes(b''), 'cannot read'),
])
def test_bad_npz_datasets_get_a_one_line_error_and_nothing_is_written(tmp_path, make, message):
    data = tmp_path / 'data.npz'
    make(data)
    result = CliRunner().invoke(cli(), ['--dataset', str(data), '--arch', 'mlp', '--hidden', '8', '--epochs', '1',
                                        '--out', str(tmp_path / 'x')])
    assert result.exit_code == 2 and message in result.output and 'Traceback' not in result.output, result.output
    assert not (tmp_path / 'x').exists()


def test_bad_output_places_and_resume_misuse_get_a_one_line_error(tmp_path):
    (tmp_path / 'file').write_text('not a directory')
    common = ['--dataset', 'synthetic', '--subset', '64', '--arch', 'mlp', '--hidden', '8', '--epochs', '1']
    for out, message in [(tmp_path / 'file', 'is a file'), (tmp_path / 'file' / 'run', 'cannot create')]:
        result = CliRunner().invoke(cli(), common + ['--out', str(out)])
        assert result.exit_code == 2 and message in result.output and 'Traceback' not in result.output, result.output
    run(tmp_path, 'r', **TINY_MLP)
    (tmp_path / 'r' / 'summary.json').unlink()
    result = CliRunner().invoke(cli(), ['--resume', str(tmp_path / 'r'), '--members', '3'])
    assert result.exit_code == 2 and 'drop --members' in result.output
    (tmp_path / 'r' / 'config.json').write_text('{"members": ')
    result = CliRunner().invoke(cli(), ['--resume', str(tmp_path / 'r')])
    assert result.exit_code == 2 and 'not valid JSON' in result.output


def test_edited_checkpoint_metadata_is_refused_before_anything_is_allocated(tmp_path):
    spec = dict(arch='mlp', in_channels=1, image_size=28, num_classes=10, width=1.0, kernel_size=3, hidden=[8],
                mean=[0.5], std=[0.25])
    net = te.build_model(spec)
    for edit, message in [(dict(hidden=[10**6, 10**6]), 'over the limit'), (dict(arch='transformer'), "known 'arch'"),
                          (dict(arch='vit'), "needs 'depth'"), (dict(hidden=[0]), "'hidden'"),
                          (dict(mean=[0.5, 0.5]), "'mean'")]:
        metadata = {'format': te.FORMAT, 'model': json.dumps({**spec, **edit})}   # as if edited by hand
        save_file(net.state_dict(), str(tmp_path / 'm.safetensors'), metadata=metadata)
        with pytest.raises(te.EnsembleError, match=message):
            te.load_member(tmp_path / 'm.safetensors')
    state = net.state_dict()
    te.save_member(tmp_path / 'shape.safetensors', {**state, '2.weight': state['2.weight'][:4]}, spec)
    with pytest.raises(te.EnsembleError, match="tensor '2.weight' is \\(4, 784\\), the spec says \\(8, 784\\)"):
        te.load_member_state(tmp_path / 'shape.safetensors')
    state['2.weight'][0, 0] = float('nan')
    te.save_member(tmp_path / 'nan.safetensors', state, spec)
    with pytest.raises(te.EnsembleError, match='non-finite'):
        te.load_member(tmp_path / 'nan.safetensors')


def test_readers_never_download_or_create_the_data_dir_a_config_names(tmp_path):
    """A run's config.json is data, not instructions: analyze.py and rebasin.py read datasets that are
    there and create nothing where a (possibly crafted) data_dir points."""
    config = dict(dataset='cifar10', data_dir=str(tmp_path / 'elsewhere' / 'deep'))
    with pytest.raises(te.EnsembleError, match='is not there'):
        te.load_run_data(config, download=False)
    assert not (tmp_path / 'elsewhere').exists()


# ---- muon ----

def test_at_beta0_a_muon_ensemble_trains_each_member_exactly_as_if_alone(tmp_path, float64):
    """Each member's hidden matrix is orthogonalized on its own: the wide run equals M single runs."""
    options = dict(dataset='synthetic', arch='mlp', hidden=[32, 16], subset=256, batch_size=32, epochs=3,
                   optimizer='muon')
    assert_members_train_as_if_alone(tmp_path, 3, options, atol=1e-12, rtol=0)


def test_muon_learns_records_its_groups_and_resumes_exactly(tmp_path):
    """On 1,024 synthetic images, 4 epochs, β = 1: muon reaches 0.86 test accuracy where SGD reaches 0.76."""
    options = dict(TINY_MLP, hidden=[32, 16], subset=1024, epochs=4, members=2, beta=1.0, optimizer='muon')
    straight = run(tmp_path, 'straight', **options)
    lines = [json.loads(line) for line in (tmp_path / 'straight' / 'metrics.jsonl').read_text().splitlines()]
    assert lines[-1]['train_loss'] < lines[0]['train_loss'] and straight['test_acc'] > 0.75
    groups = json.loads((tmp_path / 'straight' / 'config.json').read_text())['optimizer_groups']
    assert [g['update'] for g in groups] == ['sgd', 'orthogonalized'] and groups[1]['name'] == '4.weight'

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        te.train(te.Config(out=str(tmp_path / 'resumed'), device='cpu', **options), console=quiet_console(),
                 on_epoch_end=interrupt)
    te.train(te.Config(out=str(tmp_path / 'resumed'), device='cpu', **options), console=quiet_console(), resume=True)
    for a, b in zip(member_states(tmp_path / 'straight'), member_states(tmp_path / 'resumed')):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_complete_run_trains_reads_back_resumes_and_never_mixes_options(tmp_path):
    cfg = te.Config(out=str(tmp_path / 'r'), device='cpu', **TINY_MLP)
    first = te.complete_run(cfg, quiet_console())
    stamp = (tmp_path / 'r' / 'summary.json').stat().st_mtime
    assert te.complete_run(cfg, quiet_console()) == json.loads((tmp_path / 'r' / 'summary.json').read_text())
    assert (tmp_path / 'r' / 'summary.json').stat().st_mtime == stamp and first['test_acc'] > 0
    with pytest.raises(te.EnsembleError, match='other options \\(--beta: 0.0 there, 1.0 here\\)'):
        te.complete_run(te.Config(out=str(tmp_path / 'r'), device='cpu', beta=1.0, **TINY_MLP), quiet_console())
    (tmp_path / 'r' / 'summary.json').unlink()   # as if stopped while writing its members
    assert te.complete_run(cfg, quiet_console())['test_acc'] == first['test_acc']


def test_complete_run_reads_back_a_run_made_before_an_option_existed(tmp_path):
    """A config.json without a newer option ran as that option's default: it is read back, not refused."""
    cfg = te.Config(out=str(tmp_path / 'old'), device='cpu', **TINY_MLP)
    summary = te.train(cfg, console=quiet_console())
    config = json.loads((tmp_path / 'old' / 'config.json').read_text())
    del config['depth'], config['heads']   # options added after this run was made
    (tmp_path / 'old' / 'config.json').write_text(json.dumps(config))
    assert te.complete_run(cfg, quiet_console()) == summary
    with pytest.raises(te.EnsembleError, match='other options'):
        te.complete_run(te.Config(out=str(tmp_path / 'old'), device='cpu', **dict(TINY_MLP, epochs=4)), quiet_console())


def test_a_run_on_a_label_subset_sees_only_those_labels_and_keeps_every_output(tmp_path, fashion_mnist):
    """--classes 0-4: train, validation and test keep only those classes with their own ids; the network
    keeps the dataset's ten outputs, so runs on disjoint classes share one label space (issue 24)."""
    run(tmp_path, 'low', dataset=fashion_mnist, arch='mlp', hidden=[32], subset=1000, val_size=100, epochs=1,
        classes=te.parse_ints('0-2,7'))
    config, nets = te.load_run(tmp_path / 'low')
    data = te.load_run_data(config)
    for y in (data.y_train, data.y_val, data.y_test):
        assert set(y.unique().tolist()) == {0, 1, 2, 7}
    assert (config['classes'] == [0, 1, 2, 7] and data.num_classes == 10
            and nets[0](data.x_test[:5].float()).shape == (5, 10))
    assert len(data.y_train) == 1000 and len(data.y_val) == 100 and len(data.y_test) == 1000


def test_the_command_line_helps_first_and_runs_that_differ_get_different_names(tmp_path):
    """No arguments print the help (never a CIFAR-10 run); -h, --version; options in their panels, choices
    listed; a default name tells runs with other options apart, and a collision says what differs."""
    import subprocess
    import sys
    bare = subprocess.run([sys.executable, 'train_ensemble.py'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bare.returncode == 0 and 'Usage' in bare.stdout and '╭─ The network' in bare.stdout
    assert 'prob|logit|mean' in bare.stdout and '…' not in bare.stdout
    short = subprocess.run([sys.executable, 'train_ensemble.py', '-h'], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    version = subprocess.run([sys.executable, 'train_ensemble.py', '--version'], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert short.stdout == bare.stdout and version.stdout.startswith('train_ensemble.py: checkpoints deep-ensembles/1')
    names = {te.resolve_config(te.Config(dataset='synthetic', arch='mlp', **given)).out
             for given in (dict(), dict(hidden=[64]), dict(hidden=[128]), dict(epochs=2), dict(lr=0.1))}
    assert len(names) == 5 and 'runs/synthetic_mlp_m1_beta0_prob_s0' in names
    run(tmp_path, 'r', **TINY_MLP)
    result = CliRunner().invoke(cli(), ['--dataset', 'synthetic', '--arch', 'mlp', '--hidden', '64', '--subset', '256',
                                        '--batch-size', '64', '--epochs', '3', '--out', str(tmp_path / 'r')])
    assert result.exit_code == 2 and '--hidden: [32] there, [64] here' in result.output


def test_branches_average_their_networks_probabilities_and_reload_from_one_file(tmp_path):
    """A partially zipped merge is one member: networks side by side, their probabilities averaged."""
    base = dict(arch='mlp', in_channels=1, image_size=8, num_classes=5, hidden=[16], mean=[0.5], std=[0.25])
    nets = [te.init_member(base, seed) for seed in (0, 1, 2)]
    spec = te.branches_spec(base, 3)
    state = {f'branches.{i}.{k}': v for i, net in enumerate(nets) for k, v in net.state_dict().items()}
    te.save_member(tmp_path / 'member_0.safetensors', state, spec)
    model = te.load_member(tmp_path / 'member_0.safetensors')
    x = torch.rand(6, 1, 8, 8)
    expected = te.combine(torch.stack([net(x) for net in nets]), 'prob')
    torch.testing.assert_close(model(x).log_softmax(-1), expected)
    for bad in (dict(spec, count=0), dict(spec, num_classes=7), dict(spec, base=dict(base, hidden=[0]))):
        with pytest.raises(te.EnsembleError, match='model spec'):
            te.check_model_spec(bad, 'edited')
