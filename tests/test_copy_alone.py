"""SPEC's promise: rebasin.py, spectral.py and analyze.py each work copied alone into another project, with
only torch, numpy and scipy installed. Each file is copied into an empty directory and its core is run in a
fresh interpreter in which typer, rich, matplotlib and the other scripts cannot be imported."""
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

BLOCK = '''
import sys
BLOCKED = {'typer', 'rich', 'matplotlib', 'train_ensemble', 'analyze', 'rebasin', 'spectral'} - {SELF}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{name} is not installed in this test')

sys.meta_path.insert(0, Blocker())
sys.path = [p for p in sys.path if p not in ('', %r)]
''' % str(ROOT)   # SELF: the copied script's own module name, set before this runs

REBASIN = '''
import torch
from torch import nn
import rebasin

def net():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

torch.manual_seed(0)
a, b = net(), net()
spec = rebasin.permutation_spec(a, torch.zeros(1, 8))
perm = rebasin.weight_matching(spec, a.state_dict(), b.state_dict())
aligned = net()
aligned.load_state_dict(rebasin.apply_permutation(spec, perm, b.state_dict()))
x = torch.randn(5, 8)
assert torch.allclose(aligned(x), b(x), atol=1e-5), 'a permuted network computes the same function'
merged, perms = rebasin.merge_many(spec, [a.state_dict(), b.state_dict()], seed=0)
assert set(merged) == set(a.state_dict()) and len(perms) == 2
'''

SPECTRAL = '''
import torch
import spectral as sp

torch.manual_seed(0)
net = sp.mlp(hidden=(32, 32))(1.0)
sp.spectral_init_(net)
for name, fan_in, fan_out, kind in sp.layer_fans(net):
    w = dict(net.named_parameters())[name]
    assert abs(sp.spectral_norm(w) / sp.spectral_target(fan_in, fan_out) - 1) < 1e-3, name
groups = sp.spectral_param_groups(net, 1, 0.1, 0.0)
assert sum(len(g['params']) for g in groups) == len(list(net.parameters()))
result = sp.coord_check(widths=(0.25, 1), steps=2)
assert set(result['drift']) == {'standard', 'spectral'}
'''

ANALYZE = '''
import math
import torch
import torch.nn.functional as F
import analyze

g = torch.Generator().manual_seed(0)
logits, y = 2 * torch.randn(3, 400, 10, generator=g), torch.randint(0, 10, (400,), generator=g)
for combiner in ('prob', 'logit'):
    report = analyze.ensemble_report(logits, y, combiner)
    assert report['div'] > 0 and report['decomposition_residual'] < 1e-9 and 0 < report['double_fault'] < 1
    assert report['ensemble']['nll'] < report['mean_member']['nll']
one = analyze.ensemble_report(logits[:1], y, 'prob')
assert one['div'] == 0 and one['members'][0] == one['ensemble']
metrics = analyze.prediction_metrics(F.log_softmax(logits[0], -1), y)
assert set(metrics) == {'acc', 'nll', 'brier', 'ece'} and 0 <= metrics['ece'] <= 1
assert analyze.disagreement(logits) > 0.5 and analyze.logit_variance(logits) > 0
div, residual = analyze.ambiguity(logits, y, 'logit')
assert div.shape == (400,) and residual < 1e-9
drop = analyze.drop_learners(logits, y, 'prob', [0.34])
assert drop['fractions'][0]['kept'] == 2
assert torch.allclose(analyze.debias(logits, logits).mean(0), logits.mean(0), atol=1e-6)
outputs, targets = torch.randn(3, 50, 2, generator=g), torch.randn(50, 2, generator=g)
assert abs(analyze.regression_report(outputs, targets)['decomposition_residual']) < 1e-9
scores = analyze.ood_scores(logits, 'logit')
report = analyze.ood_report(logits, logits + 3 * torch.randn(3, 400, 10, generator=g))
assert set(scores) == set(analyze.OOD_SCORES) == set(report)
tied = torch.zeros(10)
assert analyze.auroc(tied, tied) == 0.5 and analyze.aupr(tied, tied) == 0.5 and analyze.fpr_at_tpr(tied, tied) == 1
assert math.isclose(analyze.barrier([0, 1, 0]), 1)
x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
assert analyze.corrupt(x, 'contrast', 3).shape == x.shape
try:
    analyze.run_data({'dataset': 'fashion-mnist'})
except analyze.EnsembleError as e:   # what needs a sibling script names it
    assert 'train_ensemble.py' in str(e), e
else:
    raise AssertionError('loading data needs train_ensemble.py')
'''


TRAIN = '''
import torch
import train_ensemble as te

spec = dict(arch='airbench', in_channels=3, image_size=16, num_classes=10, width=0.125, mean=[0.5] * 3, std=[0.25] * 3)
wide = te.build_model(spec, members=3)
logits = te.member_logits(wide, torch.rand(8, 3, 16, 16), 3)
objective, (member_loss, ensemble_loss) = te.ensemble_objective(logits, torch.randint(0, 10, (8,)), 1.0, 'prob')
assert logits.shape == (3, 8, 10) and objective.item() > 0
summary = te.train(te.Config(dataset='synthetic', arch='mlp', hidden=[16], members=2, subset=128, batch_size=64,
                             epochs=1, device='cpu', out='run'))
assert 0 <= summary['test_acc'] <= 1 and len(te.load_run('run')[1]) == 2
try:
    te.train(te.Config(dataset='synthetic', arch='mlp', hidden=[16], subset=64, epochs=1, param='spectral', out='s'))
except te.EnsembleError as e:   # what needs a sibling script names it
    assert 'spectral.py' in str(e), e
else:
    raise AssertionError('--param spectral needs spectral.py')
'''


@pytest.mark.parametrize('script, core', [('rebasin.py', REBASIN), ('spectral.py', SPECTRAL), ('analyze.py', ANALYZE),
                                          ('train_ensemble.py', TRAIN)])
def test_the_file_works_copied_alone_without_the_command_line_packages(tmp_path, script, core):
    shutil.copy(ROOT / script, tmp_path / script)
    check = f'SELF = {script[:-3]!r}' + textwrap.dedent(BLOCK) + textwrap.dedent(core) + textwrap.dedent('''
        assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
        print('ok')
    ''')
    (tmp_path / 'check.py').write_text(check)   # run as a file: its directory, holding the copy, is on sys.path
    result = subprocess.run([sys.executable, 'check.py'], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith('ok'), result.stderr[-3000:]


def test_the_command_line_of_a_copied_analyze_names_the_script_it_needs_in_one_line(tmp_path):
    shutil.copy(ROOT / 'analyze.py', tmp_path / 'analyze.py')
    (tmp_path / 'run').mkdir()
    result = subprocess.run([sys.executable, 'analyze.py', 'evaluate', 'run'], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and 'train_ensemble.py' in lines[0], result.stderr
    help = subprocess.run([sys.executable, 'analyze.py', '--help'], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert help.returncode == 0 and 'evaluate' in help.stdout   # the help needs no sibling


def test_the_blocker_really_blocks(tmp_path):
    """The check above would pass vacuously if the blocked packages could still be imported."""
    result = subprocess.run([sys.executable, '-c', "SELF = ''" + textwrap.dedent(BLOCK) + 'import typer'], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and 'not installed in this test' in result.stderr


def test_the_command_line_of_a_copied_spectral_names_the_script_it_needs_in_one_line(tmp_path):
    shutil.copy(ROOT / 'spectral.py', tmp_path / 'spectral.py')
    result = subprocess.run([sys.executable, 'spectral.py', 'report', 'member_0.safetensors'], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and 'train_ensemble.py' in lines[0], result.stderr
