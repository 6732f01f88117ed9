"""Bad input, table-driven: every row is a command given something wrong (a broken table, a run directory
whose files disagree with its config.json, options no command line accepts). Each must exit with status 2,
print one line on stderr that names the problem, never a traceback, and create or change no file."""

import json
import shutil

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import analyze
import rebasin
import spectral
import train_ensemble as te
from test_train_ensemble import quiet_console

RUN = dict(dataset='synthetic', arch='mlp', hidden=[16], members=2, subset=200, batch_size=64, epochs=1, device='cpu')


def train_app():
    app = typer.Typer()
    app.command()(te.command())
    return app


APPS = {'train': train_app, 'analyze': analyze.make_app, 'rebasin': rebasin.make_app, 'spectral': spectral.make_app}


def regression_table(folder, name, x, y):
    np.savez(folder / f'{name}.npz', x_train=x[:150], y_train=y[:150], x_test=x[150:], y_test=y[150:])
    return str(folder / f'{name}.npz')


def run_variant(folder, name, change):
    """A copy of the finished run `ok`, changed by change(run_dir)."""
    shutil.copytree(folder / 'ok', folder / name)
    change(folder / name)
    return str(folder / name)


def edit_config(**changes):
    def change(run_dir):
        config = json.loads((run_dir / 'config.json').read_text())
        (run_dir / 'config.json').write_text(json.dumps({**config, **changes}))
    return change


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """{name: path} of every bad input, in one folder that no command may change."""
    folder = tmp_path_factory.mktemp('bad')
    te.train(te.Config(out=str(folder / 'ok'), **RUN), console=quiet_console())
    te.train(te.Config(out=str(folder / 'wider'), **{**RUN, 'hidden': [32]}), console=quiet_console())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = x @ np.array([1.0, 2.0, 3.0])
    images = rng.integers(0, 256, size=(10, 1, 8, 8), dtype=np.uint8)
    np.savez(folder / 'ten_images.npz', x_train=images, y_train=np.arange(10) % 2, x_test=images,
             y_test=np.arange(10) % 2)
    paths = dict(
        tiny_targets=regression_table(folder, 'tiny', x, y * 1e-30),
        no_targets=regression_table(folder, 'noy', x, np.zeros((200, 0))),
        no_features=regression_table(folder, 'nox', np.zeros((200, 0)), y),
        huge_targets=regression_table(folder, 'huge', x, y * 1e20),
        beyond_float32=regression_table(folder, 'f32inf', x, y * 1e39),
        complex_features=regression_table(folder, 'complex', x + 1j, y),
        ten_images=str(folder / 'ten_images.npz'),
        ok=str(folder / 'ok'),
        extra_member=run_variant(folder, 'extra', lambda d: shutil.copy(d / 'member_1.safetensors',
                                                                          d / 'member_2.safetensors')),
        foreign_member=run_variant(folder, 'foreign', lambda d: shutil.copy(folder / 'wider' / 'member_0.safetensors',
                                                                            d / 'member_1.safetensors')),
        members_text=run_variant(folder, 'members_text', edit_config(members='2')),
        negative_subset=run_variant(folder, 'negative_subset', edit_config(subset=-5)),
        config_list=run_variant(folder, 'config_list', lambda d: (d / 'config.json').write_text('[1]')),
        config_lost=run_variant(folder, 'config_lost', lambda d: (d / 'config.json').unlink()),
        empty_config=run_variant(folder, 'empty_config', lambda d: (d / 'config.json').write_text('{}')),
    )
    return folder, paths


REGRESSION = ['--task', 'regression', '--epochs', '1', '--device', 'cpu', '--dataset']
CASES = [   # (app, arguments: {name} is an input's path, what the one line must say)
    ('train', ['--members', '0'], 'members must be at least 1'),
    ('train', REGRESSION + ['{tiny_targets}'], 'varies by only'),
    ('train', REGRESSION + ['{no_targets}'], 'y_train must be'),
    ('train', REGRESSION + ['{no_features}'], 'x_train must be'),
    ('train', REGRESSION + ['{huge_targets}'], 'overflow float32'),
    ('train', REGRESSION + ['{beyond_float32}'], 'beyond float32'),
    ('train', REGRESSION + ['{complex_features}'], 'real numbers'),
    ('train', ['--dataset', '{ten_images}', '--arch', 'mlp', '--shard', '9/10', '--device', 'cpu'],
     'no training examples'),
    ('train', ['--resume', '{config_lost}'], 'config.json is missing'),
    ('train', ['--dataset', '{ten_images}', '--classes', '0-4', '--device', 'cpu'], 'distinct classes of'),
    ('train', ['--dataset', '{ten_images}', '--classes', '', '--device', 'cpu'], 'distinct classes of'),
    ('train', ['--dataset', '{ten_images}', '--classes', '4-1', '--device', 'cpu'], 'ranges a-b'),
    ('train', REGRESSION + ['{huge_targets}', '--classes', '0'], 'does not apply to --task regression'),
    ('train', ['--resume', '{empty_config}'], 'not a training run'),
    ('train', ['--resume', '{config_list}'], 'not a training run'),
    ('train', ['--resume', '{members_text}'], "'members' is \"2\""),
    ('analyze', ['evaluate', '{extra_member}'], 'config.json says 2 member(s)'),
    ('analyze', ['evaluate', '{foreign_member}'], 'not the network'),
    ('analyze', ['evaluate', '{members_text}'], "'members' is \"2\", not int"),
    ('analyze', ['evaluate', '{negative_subset}'], "'subset' must be at least 1"),
    ('analyze', ['evaluate', '{config_list}'], 'JSON list'),
    ('analyze', ['evaluate', '{ok}', '--dataset', 'fashion-mnist'], 'shape'),
    ('rebasin', ['merge', '{ok}/member_0.safetensors', '--out', '{ok}_merged'], 'at least two'),
    ('rebasin', ['align', '{ok}/member_0.safetensors', '{foreign_member}/member_1.safetensors', '--out', '{ok}_a'],
     'does not match'),
    ('spectral', ['report', '{ok}/member_9.safetensors'], 'does not exist'),
]


def snapshot(folder):
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob('*')) if p.name != '.lock'}


@pytest.mark.parametrize('app, args, message', CASES, ids=[f'{c[0]}-{"-".join(c[1])[:40]}' for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(inputs, app, args, message, tmp_path, monkeypatch):
    folder, paths = inputs
    monkeypatch.chdir(tmp_path)   # a default --out or ./data would appear here
    before = snapshot(folder)
    result = CliRunner().invoke(APPS[app](), [a.format(**paths) for a in args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], result.stderr
    assert 'Traceback' not in result.output + result.stderr
    assert snapshot(folder) == before and list(tmp_path.iterdir()) == []
