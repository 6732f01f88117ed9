"""spectral.py: the claims of "A Spectral Condition for Feature Learning" as this toolkit implements them."""

import json
import math

import pytest
import torch

import spectral as sp
import train_ensemble as te


def spec_for(arch, width):
    """train_ensemble's model spec at a width multiplier (the mlp's hidden sizes scaled)."""
    return dict(arch=arch, in_channels=3, image_size=16, num_classes=10, kernel_size=3,
                width=1.0 if arch == 'mlp' else width, hidden=[max(1, round(256 * width))] * 2,
                mean=[0.5] * 3, std=[0.25] * 3)


def member(arch, width, seed=0):
    x, _ = sp.synthetic_batch(256, 16, seed=seed)
    return te.init_member(spec_for(arch, width), seed, x_train=x)


def test_the_spectral_norm_is_the_largest_singular_value_at_any_scale_and_in_the_weights_dtype():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 16, 3, 3, generator=g)          # a conv kernel, seen as 48 x 144
    exact = sp.spectral_norm(w)
    assert torch.isclose(exact, torch.linalg.matrix_norm(w.reshape(48, -1), ord=2), rtol=1e-5)
    assert torch.isclose(sp.spectral_norm(w.reshape(48, -1).T), exact, rtol=1e-5)  # either Gram side
    w64 = w.double().reshape(48, -1)
    for scale in (1e-200, 1e-30, 1.0, 1e30, 1e200):   # the squares of the Gram matrix would under/overflow
        sigma = sp.spectral_norm(w64 * scale)
        assert sigma.dtype == torch.float64
        assert torch.isclose(sigma, torch.linalg.matrix_norm(w64, ord=2) * scale, rtol=1e-10), scale
    assert sp.spectral_norm(torch.zeros(4, 3)) == 0


def test_spectral_norm_of_a_wide_weight_is_per_member():
    w = torch.randn(3 * 8, 4, 3, 3)                     # three members' (8, 4, 3, 3) kernels stacked
    per_member = sp.spectral_norm(w, members=3)
    assert per_member.shape == (3,)
    for j, chunk in enumerate(w.chunk(3)):
        assert torch.isclose(per_member[j], sp.spectral_norm(chunk))


@pytest.mark.parametrize('arch', ['mlp', 'airbench', 'resnet18'])
@pytest.mark.parametrize('width', [0.25, 0.5])
def test_spectral_init_puts_every_layer_on_its_target(arch, width):
    net = member(arch, width)
    frozen = {name: p.clone() for name, p in net.named_parameters() if not p.requires_grad}
    sp.spectral_init_(net)
    params = dict(net.named_parameters())
    covered = 0
    for name, fan_in, fan_out, _ in sp.layer_fans(net):
        if not params[name].requires_grad:
            assert torch.equal(params[name], frozen[name]), 'the frozen whitening conv must not move'
            continue
        ratio = sp.spectral_norm(params[name]).item() / math.sqrt(fan_out / fan_in)
        assert abs(ratio - 1) < 0.05, (name, ratio)
        covered += 1
    assert covered >= (3 if arch == 'mlp' else 7)


def test_fans_count_the_kernel_and_divide_out_the_members():
    net = te.build_model(spec_for('airbench', 0.25), members=3)
    fans = {name: (fan_in, fan_out, kind) for name, fan_in, fan_out, kind in sp.layer_fans(net, members=3)}
    assert fans['1.weight'] == (3 * 2 * 2, 24, 'input')            # the whitening conv, shared input
    assert fans['3.conv1.weight'] == (24 * 3 * 3, 16, 'hidden')      # grouped: fan_in is per member
    assert fans['4.conv2.weight'] == (64 * 3 * 3, 64, 'hidden')
    assert fans['8.weight'] == (64, 10, 'output')


def test_coordinate_check_spectral_is_flat_in_width_and_standard_drifts():
    # widths 64 and 1024; 10 SGD steps at lr 0.5 make the standard parametrization's logits grow ~4x
    result = sp.coord_check(widths=(0.25, 4))
    assert result['drift']['spectral'] < 2.0, result['spectral']
    assert result['drift']['standard'] > 3.0, result['standard']
    assert result['drift']['standard'] > 2 * result['drift']['spectral']


@pytest.mark.parametrize('arch', ['mlp', 'airbench'])
def test_param_groups_of_a_wide_ensemble_match_a_single_member(arch):
    spec = spec_for(arch, 0.25)
    wide, single = te.build_model(spec, members=3), member(arch, 0.25)
    if arch == 'airbench':
        wide[1].weight.requires_grad = False
    for optimizer in ('sgd', 'adam'):
        groups = sp.spectral_param_groups(wide, 3, lr=2.0, weight_decay=0.01, optimizer=optimizer)
        scales = {g['name']: g['spectral_scale'] for g in groups}
        assert scales == {g['name']: g['spectral_scale']
                          for g in sp.spectral_param_groups(single, 1, 2.0, 0.01, optimizer)}
        for g in groups:
            assert g['lr'] == pytest.approx(2.0 * g['spectral_scale']) and g['weight_decay'] == 0.01
        seen = [id(p) for g in groups for p in g['params']]
        assert sorted(seen) == sorted(id(p) for p in wide.parameters() if p.requires_grad)


def test_lr_scales_follow_fan_out_over_fan_in_for_sgd_and_one_over_fan_in_for_adam():
    def scales(width, optimizer):
        net = te.build_model(spec_for('resnet18', width))
        return {g['name']: g['spectral_scale'] for g in sp.spectral_param_groups(net, 1, 1.0, 0.0, optimizer)}
    sgd, sgd_wide, adam, adam_wide = scales(0.25, 'sgd'), scales(0.5, 'sgd'), scales(0.25, 'adam'), scales(0.5, 'adam')
    assert sgd['4.conv2.weight'] == pytest.approx(1.0)            # a square 3x3 conv is the reference
    assert sgd_wide['4.conv2.weight'] == pytest.approx(1.0)       # at every width
    assert sgd_wide['1.weight'] == pytest.approx(2 * sgd['1.weight'])      # input: fan_out doubles
    assert sgd_wide['14.weight'] == pytest.approx(sgd['14.weight'] / 2)    # output: fan_in doubles
    assert adam_wide['4.conv2.weight'] == pytest.approx(adam['4.conv2.weight'] / 2)
    assert adam_wide['1.weight'] == pytest.approx(adam['1.weight'])


def test_param_groups_keep_the_base_groups_settings():
    net = member('resnet18', 0.25)
    vectors = [p for p in net.parameters() if p.dim() < 2]
    matrices = [p for p in net.parameters() if p.dim() >= 2]
    base = [dict(params=vectors, lr=64.0, weight_decay=0.0, name='norm biases'),
            dict(params=matrices, lr=1.0, weight_decay=5e-4, name='weights', nesterov=True)]
    groups = sp.spectral_param_groups(net, 1, 1.0, 5e-4, base_groups=base)
    assert groups[0]['name'] == 'norm biases' and groups[0]['lr'] == 64.0
    assert all(g['nesterov'] and g['weight_decay'] == 5e-4 for g in groups[1:])
    torch.optim.SGD(groups, lr=1.0, momentum=0.9)                  # torch accepts the groups as they are


def test_report_reads_a_checkpoint_and_writes_json(tmp_path):
    from typer.testing import CliRunner
    x, _ = sp.synthetic_batch(256, 16)
    spec = spec_for('airbench', 0.25)
    net = sp.spectral_init_(te.init_member(spec, 0, x_train=x))
    te.save_member(tmp_path / 'member_0.safetensors', net.state_dict(), spec)
    out = tmp_path / 'report.json'
    result = CliRunner().invoke(sp.make_app(), ['report', str(tmp_path / 'member_0.safetensors'), '--json', str(out)])
    assert result.exit_code == 0, result.output
    assert 'ratio' in result.output and '3.conv1' in result.output    # the table
    layers = json.loads(out.read_text())['layers']
    assert [r['name'] for r in layers] == [name for name, *_ in sp.layer_fans(net)]
    # every layer but the whitening conv (fixed by the data, not rescaled) reads back the spectral init
    assert all(abs(r['ratio'] - 1) < 1e-3 for r in layers if r['name'] != '1.weight')
    missing = CliRunner().invoke(sp.make_app(), ['report', str(tmp_path / 'nope.safetensors')])
    assert missing.exit_code == 2 and 'does not exist' in missing.output


def test_coord_check_command_writes_a_plot(tmp_path):
    from typer.testing import CliRunner
    png, js = tmp_path / 'coord.png', tmp_path / 'coord.json'
    result = CliRunner().invoke(sp.make_app(), ['coord-check', '--widths', '0.25,0.5', '--steps', '2',
                                                '--plot', str(png), '--json', str(js)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert set(json.loads(js.read_text())['drift']) == {'standard', 'spectral'}


def test_learning_rates_transfer_across_widths_under_spectral_and_not_under_standard():
    """The paper's practical claim, on the default MLP (hidden 64 vs 1024, 20 SGD steps): the best lr
    halves twice from width x0.25 to x4 under standard, and stays put (inside the grid) under spectral."""
    sweep = sp.lr_sweep(widths=(0.25, 4), lrs=(0.1, 0.2, 0.4, 0.8, 1.6, 3.2), steps=20)
    narrow, wide = sweep['spectral']['best_lr']
    assert narrow == wide and 0.1 < wide < 3.2, sweep['spectral']
    narrow, wide = sweep['standard']['best_lr']
    assert wide <= narrow / 2, sweep['standard']


def test_lr_sweep_command_reports_a_best_lr_per_width(tmp_path):
    from typer.testing import CliRunner
    js = tmp_path / 'sweep.json'
    result = CliRunner().invoke(sp.make_app(), ['lr-sweep', '--widths', '0.25,0.5', '--lrs', '0.1,0.4',
                                                '--steps', '2', '--json', str(js)])
    assert result.exit_code == 0, result.output
    sweep = json.loads(js.read_text())
    assert len(sweep['spectral']['best_lr']) == 2 and len(sweep['standard']['loss'][0]) == 2


# ---- spectral updates (Muon) ----

def conditioned(members, rows, cols, condition, seed=0):
    """A stack of matrices with singular values spread evenly in log scale from 3 down to 3/condition."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(members, rows, rows, generator=g))
    v, _ = torch.linalg.qr(torch.randn(members, cols, cols, generator=g))
    k = min(rows, cols)
    s = torch.zeros(members, rows, cols)
    s[:, range(k), range(k)] = 3 * torch.logspace(0, -math.log10(condition), k)
    return u @ s @ v.mT


@pytest.mark.parametrize('rows, cols', [(64, 128), (128, 32), (96, 96)])
def test_orthogonalize_is_u_vt_of_the_svd_for_every_member_separately(rows, cols):
    g = conditioned(4, rows, cols, condition=10)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    o = sp.orthogonalize(g)
    error = (o - u @ vh).norm(dim=(-2, -1)) / (u @ vh).norm(dim=(-2, -1))
    assert error.max() < 3e-3, error            # 5 steps at condition number 10 (measured 2e-3 at most)
    assert torch.equal(sp.orthogonalize(g[2:3]), o[2:3])   # a member's slice alone: the same bits


def test_muon_steps_have_the_spectral_norm_the_condition_asks_for():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3 * 16, 64))   # 3 members of a 64 -> 16 layer
    opt = sp.Muon([dict(params=[w], lr=0.1, orthogonalize=True, members=3, fan_in=64, fan_out=16)], momentum=0.0)
    before = w.detach().clone()
    w.grad = conditioned(3, 16, 64, condition=5).reshape(48, 64)
    opt.step()
    norms = sp.spectral_norm((w.detach() - before), members=3)
    assert torch.allclose(norms, torch.full((3,), 0.1 * math.sqrt(16 / 64)), rtol=5e-3)
