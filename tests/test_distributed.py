"""Several processes (torchrun, gloo on the CPU) train the same ensemble as one process: each rank holds a
block of the members, the ensemble term gathers every member's logits, and the gradients that flow back
are those of the single-process run. A rank that dies takes the job down, and --resume finishes it."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import train_ensemble as te
from conftest import ROOT
from test_train_ensemble import member_states, run

TINY = dict(dataset='synthetic', arch='mlp', hidden=[16], subset=256, batch_size=64, epochs=2)


def arguments(options):
    args = ['--device', 'cpu']
    for key, value in options.items():
        flag = '--' + key.replace('_', '-')
        if value is True:
            args.append(flag)
        else:
            args += [flag, ','.join(map(str, value)) if isinstance(value, list) else str(value)]
    return args


def torchrun(args, processes=2, env=None, timeout=240):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes),
               'train_ensemble.py', *args]
    return subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def assert_same_weights(a_dir, b_dir, atol):
    a, b = member_states(a_dir), member_states(b_dir)
    assert len(a) == len(b)
    for j, (sa, sb) in enumerate(zip(a, b)):
        for key in sa:
            assert torch.allclose(sa[key], sb[key], atol=atol, rtol=0), (j, key, (sa[key] - sb[key]).abs().max())


def test_member_blocks_are_contiguous_cover_every_member_and_differ_by_at_most_one():
    for members in range(1, 12):
        for world in range(1, members + 1):
            blocks = [te.member_block(members, world, r) for r in range(world)]
            assert [j for b in blocks for j in b] == list(range(members))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(te.EnsembleError, match='at least one member'):
        te.MemberBlock(members=2, rank=0, world=3)


@pytest.mark.parametrize('options', [
    dict(members=4, beta=1.0),                                        # joint training, even blocks
    dict(members=3, beta=0.5, bagging=True, combine='logit'),         # uneven blocks (2 + 1), bootstrap weights
    dict(members=3, beta=0.0),                                        # independent: no communication in the step
    dict(members=3, beta=1.0, sam_rho=0.05, flat_ratio=0.3),          # SharpBalance: scores gathered, sets split
    dict(members=3, beta=1.0, task='regression', dataset='synthetic-regression', bagging=True),   # (M, B, T) outputs
], ids=['beta1', 'beta0.5-uneven-bagging', 'beta0', 'sharpbalance', 'regression'])
def test_two_processes_train_the_weights_of_one(tmp_path, options):
    options = {**TINY, **options}
    run(tmp_path, 'one', **options)
    result = torchrun(arguments({**options, 'out': tmp_path / 'two'}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(tmp_path / 'one', tmp_path / 'two', atol=1e-5)
    config = json.loads((tmp_path / 'two' / 'config.json').read_text())
    assert config['world_size'] == 2 and config['member_blocks'][0] == [0, (options['members'] + 1) // 2]
    one, two = (json.loads((tmp_path / d / 'summary.json').read_text()) for d in ('one', 'two'))
    for key in ('train_objective', 'train_loss', 'train_div', 'test_loss', 'test_div'):
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-6), key
    score = te.score_name(options.get('task'))
    assert one[f'member_test_{score}'] == pytest.approx(two[f'member_test_{score}'], rel=1e-4, abs=1 / 256)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp('straight') / 'run'
    result = torchrun(arguments({**KILLED, 'out': out}))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


KILLED = {**TINY, 'members': 3, 'beta': 1.0, 'epochs': 3}


@pytest.mark.parametrize('kill_at', [
    'state.rank1.safetensors:after:2',    # rank 1 has epoch 2's state; rank 0 may or may not
    'state.rank0.safetensors:before:2',   # rank 0 holds epoch 1's state only as its previous one
])
def test_a_killed_rank_takes_the_job_down_and_resume_finishes_it_with_the_same_weights(tmp_path, straight, kill_at):
    options = KILLED

    out = tmp_path / 'killed'
    start = time.perf_counter()   # one rank dies (SIGKILL); the other is in a collective or about to enter one
    killed = torchrun(arguments({**options, 'out': out}), env={'TRAIN_ENSEMBLE_KILL_AT': kill_at})
    assert killed.returncode != 0 and time.perf_counter() - start < te.COLLECTIVE_TIMEOUT_S
    assert not (out / 'summary.json').exists()

    alone = subprocess.run([sys.executable, 'train_ensemble.py', '--resume', str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2 and 'trained by 2 process(es)' in alone.stderr, alone.stderr
    resumed = torchrun(['--resume', str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(straight, out, atol=0)
    assert [json.loads(line)['epoch'] for line in (out / 'metrics.jsonl').read_text().splitlines()] == [0, 1, 2]
    assert sorted(out.glob('state*')) == []   # every rank's resume state is gone once the run is complete


def test_when_rank_0_cannot_take_the_run_directory_every_rank_stops_at_once(tmp_path):
    out = tmp_path / 'busy'
    out.mkdir()
    lock = te.lock_run_dir(out)   # another writer holds it
    try:
        start = time.perf_counter()
        result = torchrun(arguments({**TINY, 'members': 2, 'beta': 1.0, 'out': out}))
    finally:
        lock.close()
    assert result.returncode != 0 and time.perf_counter() - start < 60
    assert 'is being written by' in result.stderr and 'another rank stopped' in result.stderr
    assert not (out / 'config.json').exists()
