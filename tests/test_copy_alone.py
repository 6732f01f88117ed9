"""SPEC's promise: rebasin.py and spectral.py each work copied alone into another project, with only
torch, numpy and scipy installed. Each file is copied into an empty directory and its core is run in a
fresh interpreter in which typer, rich, matplotlib and train_ensemble cannot be imported."""
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

BLOCK = '''
import sys
BLOCKED = {'typer', 'rich', 'matplotlib', 'train_ensemble', 'analyze'}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{name} is not installed in this test')

sys.meta_path.insert(0, Blocker())
sys.path = [p for p in sys.path if p not in ('', %r)]
''' % str(ROOT)

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


@pytest.mark.parametrize('script, core', [('rebasin.py', REBASIN), ('spectral.py', SPECTRAL)])
def test_the_file_works_copied_alone_without_the_command_line_packages(tmp_path, script, core):
    shutil.copy(ROOT / script, tmp_path / script)
    check = textwrap.dedent(BLOCK) + textwrap.dedent(core) + textwrap.dedent('''
        assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
        print('ok')
    ''')
    (tmp_path / 'check.py').write_text(check)   # run as a file: its directory, holding the copy, is on sys.path
    result = subprocess.run([sys.executable, 'check.py'], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith('ok'), result.stderr[-3000:]


def test_the_blocker_really_blocks(tmp_path):
    """The check above would pass vacuously if the blocked packages could still be imported."""
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(BLOCK) + 'import typer'], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and 'not installed in this test' in result.stderr
