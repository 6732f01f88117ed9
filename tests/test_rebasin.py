"""rebasin.py: a permuted network computes the same function; weight matching finds planted permutations
and never loses ground; MergeMany shrinks the distance to the mean; BatchNorm reset and REPAIR lower the
loss of an averaged network; the command line writes runs and refuses bad input in one line."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rebasin  # noqa: E402
import train_ensemble as te  # noqa: E402



def model_spec(arch, **overrides):
    spec = dict(arch=arch, in_channels=3, image_size=16, num_classes=10, width=0.25, kernel_size=3,
                hidden=[32, 16], mean=[0.5] * 3, std=[0.25] * 3)
    return {**spec, **overrides}


def member(spec, seed):
    x = torch.randint(0, 256, (64, spec['in_channels'], spec['image_size'], spec['image_size']),
                      dtype=torch.uint8, generator=torch.Generator().manual_seed(123))
    return te.init_member(spec, seed, x)


def images(spec, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, spec['in_channels'], spec['image_size'], spec['image_size'], generator=g)


def warm_up_batchnorm(net, x):
    """A few train-mode passes so that running statistics are far from their (0, 1) defaults."""
    net.train()
    with torch.no_grad():
        for i in range(3):
            net(x * (1 + i) + 0.1 * i)
    return net.eval()


class UserNet(nn.Module):
    """A user's own model: GroupNorm, a depthwise residual branch, a per-channel parameter, LayerNorm over
    (C, H, W), a flatten of a 4x4 map (Linear weights move in blocks of 16), functional activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, padding=2)
        self.gn = nn.GroupNorm(1, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.gate = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.ln = nn.LayerNorm([6, 4, 4])
        self.fc = nn.Linear(6 * 16, 12)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.gn(self.conv(x)))
        x = x + self.bn(self.dw(x))
        x = F.max_pool2d(F.gelu(self.conv2(x)) * self.gate, 2)
        x = torch.flatten(self.ln(x), 1)
        return self.out(torch.tanh(self.fc(x)))


class CatNet(nn.Module):
    """Concatenating channels is not supported: the layers around it must be left alone, with a reason."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        return self.head(torch.relu(self.mid(x)).mean((2, 3)))


NETWORKS = {
    'mlp': lambda: member(model_spec('mlp'), 0),
    'airbench-w0.25-k3': lambda: member(model_spec('airbench'), 0),
    'airbench-w0.25-k5': lambda: member(model_spec('airbench', kernel_size=5), 0),
    'airbench-w1-k3': lambda: member(model_spec('airbench', width=1.0), 0),
    'airbench-w1-k5': lambda: member(model_spec('airbench', width=1.0, kernel_size=5), 0),
    'resnet18-w0.125': lambda: member(model_spec('resnet18', width=0.125), 0),
    'user-net': lambda: UserNet(),
}


#############################################
#       A permuted network is the same      #
#############################################

@pytest.mark.parametrize('name', list(NETWORKS))
def test_a_permuted_network_computes_the_same_function(name):
    torch.manual_seed(0)
    net = NETWORKS[name]()
    x = images(dict(in_channels=3, image_size=8 if name == 'user-net' else 16))
    warm_up_batchnorm(net, x)
    spec = rebasin.permutation_spec(net, x[:1])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    permuted = rebasin.apply_permutation(spec, rebasin.random_permutation(spec, seed=1), net.state_dict())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items()), 'the input was mutated'
    moved = [k for k in state if not torch.equal(state[k], permuted[k])]
    assert any(k.endswith('running_var') for k in moved) or 'mlp' in name
    assert len(moved) >= len(spec.perms)
    twin = copy.deepcopy(net)
    twin.load_state_dict(permuted)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), net.eval()(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(twin.train()(x), net.train()(x), rtol=1e-4, atol=1e-5)


def test_the_spec_shares_one_permutation_along_a_residual_stream_and_never_touches_input_or_output():
    net = member(model_spec('resnet18', width=0.125), 0)
    spec = rebasin.permutation_spec(net, images(model_spec('resnet18'), 1))
    axes = spec.axes
    assert len(spec.perms) == 12           # 4 residual streams + 8 inner convolutions
    assert axes['1.weight'][0] == axes['2.running_var'][0] == axes['4.conv2.weight'][0] == axes['5.conv2.weight'][0]
    stage2 = {axes['6.shortcut.0.weight'][0], axes['6.conv2.weight'][0], axes['7.conv2.weight'][0],
              axes['8.conv1.weight'][1]}
    assert len(stage2) == 1 and None not in stage2
    assert axes['1.weight'][1] is None and axes['14.weight'][0] is None and axes['14.bias'] == (None,)
    assert 'network input' in spec.unpermuted['0.mean'] and 'network output' in spec.unpermuted['14.weight']
    json.dumps(rebasin.asdict(spec))   # JSON-printable


def test_airbench_has_seven_permutations_for_any_width_and_kernel():
    for width, k in ((0.25, 3), (1.0, 5)):
        net = member(model_spec('airbench', width=width, kernel_size=k), 0)
        spec = rebasin.permutation_spec(net, images(model_spec('airbench'), 1))
        assert list(spec.perms.values()) == [24] + [round(64 * width)] * 2 + [round(256 * width)] * 4


def test_an_unsupported_layer_is_left_alone_and_the_spec_says_why():
    net = CatNet()
    x = images(dict(in_channels=3, image_size=8))
    spec = rebasin.permutation_spec(net, x)
    assert spec.axes['a.weight'][0] is None and spec.axes['mid.weight'][1] is None
    assert 'cat' in spec.unpermuted['a.weight'] and 'cat' in spec.unpermuted['mid.weight']
    assert spec.axes['mid.weight'][0] is not None     # its output is still free
    twin = copy.deepcopy(net)
    twin.load_state_dict(rebasin.apply_permutation(spec, rebasin.random_permutation(spec, 3), net.state_dict()))
    torch.testing.assert_close(twin(x), net(x))


#############################################
#              Weight matching              #
#############################################

def mlp_pair(seed_a=0, seed_b=1, hidden=(64, 32)):
    spec = model_spec('mlp', hidden=list(hidden), image_size=8)
    a, b = member(spec, seed_a), member(spec, seed_b)
    return a, b, rebasin.permutation_spec(a, images(spec, 1))


def params(net):
    return dict(net.state_dict())


def load(net, state):
    """A copy of `net` holding `state`, in eval mode."""
    net = copy.deepcopy(net)
    net.load_state_dict(state)
    return net.eval()


def distance(spec, a, b):
    keys = [k for k in a if k not in spec.buffers and a[k].is_floating_point()]
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys))


def test_weight_matching_recovers_a_planted_permutation_exactly():
    a, _, spec = mlp_pair()
    planted = rebasin.random_permutation(spec, seed=5)
    b = rebasin.apply_permutation(spec, planted, params(a))
    perm = rebasin.weight_matching(spec, params(a), b)
    restored = rebasin.apply_permutation(spec, perm, b)
    assert all(torch.equal(restored[k], v) for k, v in params(a).items())
    assert all(torch.equal(perm[p][planted[p]], torch.arange(n)) for p, n in spec.perms.items())


def test_alignment_brings_b_closer_and_the_objective_never_decreases():
    for arch in ('mlp', 'airbench'):
        if arch == 'mlp':
            a, b, spec = mlp_pair()
        else:
            s = model_spec('airbench')
            a, b = member(s, 0), member(s, 1)
            for net in (a, b):   # break airbench's identity (Dirac) init, which both share
                with torch.no_grad():
                    for m in net.modules():
                        if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                            m.weight.normal_(0, 0.05)
            spec = rebasin.permutation_spec(a, images(s, 1))
        perm = rebasin.weight_matching(spec, params(a), params(b), seed=3)
        aligned = rebasin.apply_permutation(spec, perm, params(b))
        assert distance(spec, params(a), aligned) < distance(spec, params(a), params(b))
        assert len(perm.objective) >= 3 and all(y >= x for x, y in zip(perm.objective, perm.objective[1:]))
        assert perm.objective[-1] == perm.objective[-2]   # stopped after a sweep without improvement


def conv_pair(arch, width):
    s = model_spec(arch, width=width)
    a, b = member(s, 0), member(s, 1)
    return a, b, rebasin.permutation_spec(a, images(s, 1))


@pytest.mark.parametrize('pair', [lambda: mlp_pair(hidden=(48, 32, 24)), lambda: conv_pair('airbench', 0.25),
                                  lambda: conv_pair('resnet18', 0.125)], ids=['mlp', 'airbench', 'resnet18'])
def test_weight_matching_stops_where_no_single_permutation_can_gain(pair):
    """It ends at a coordinate-wise optimum, though it re-solves a permutation only when a neighbouring one
    has changed since, updates cost matrices by the columns that moved and warm-starts the assignments:
    solving any one permutation again, from scratch and in float64, gains nothing (convolutions, residual
    streams)."""
    from scipy.optimize import linear_sum_assignment
    a, b, spec = pair()
    g = torch.Generator().manual_seed(0)
    a, b = ({k: v.std() * torch.randn(v.shape, generator=g)
             if k in rebasin._matched_keys(spec, params(net)) and v.numel() > 1 else v
             for k, v in params(net).items()} for net in (a, b))   # Gaussian weights: the most sweeps
    perm = rebasin.weight_matching(spec, a, b, seed=2)
    assert len(perm.objective) >= 3   # a second sweep: the incremental updates and warm starts were used
    a64 = {k: v.double() for k, v in a.items()}
    b64 = {k: v.double() for k, v in b.items()}
    for p, n in spec.perms.items():
        cost = torch.zeros(n, n, dtype=torch.float64)
        for k in rebasin._matched_keys(spec, a64):
            for axis in [ax for ax, q in enumerate(spec.axes[k]) if q == p]:
                moved = rebasin._permute(spec, perm, k, b64[k], skip=(axis,))
                cost += rebasin._rows(a64[k], axis, n) @ rebasin._rows(moved, axis, n).T
        rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        best, current = cost[rows, cols].sum().item(), cost[torch.arange(n), perm[p]].sum().item()
        assert best <= current + 1e-6 * cost.abs().max().item(), p


def test_a_cost_matrix_reads_the_permuted_tensor_through_a_column_map():
    """The rows of a tensor with its other axes permuted are the unpermuted rows with their columns
    reordered by _column_map, which lets a cost update recompute only the columns that moved: convolution
    kernels, BatchNorm vectors, and a flatten whose Linear moves in blocks of 16, on either axis."""
    net = UserNet()
    spec = rebasin.permutation_spec(net, torch.rand(2, 3, 8, 8))
    state, perm = params(net), rebasin.random_permutation(spec, 0)
    checked = set()
    for key in rebasin._matched_keys(spec, state):
        for axis, p in enumerate(spec.axes[key]):
            if p is not None:
                n, t = spec.perms[p], state[key]
                cols = rebasin._column_map(spec, perm, key, axis, t.shape)
                moved = rebasin._rows(rebasin._permute(spec, perm, key, t, skip=(axis,)), axis, n)
                assert torch.equal(moved, rebasin._rows(t, axis, n)[:, cols]), (key, axis)
                checked.add(key)
    assert {'fc.weight', 'conv2.weight', 'bn.weight'} <= checked


def test_a_warm_started_assignment_is_the_assignment_and_its_prices_certify_it():
    """Column prices never change which assignment is best; _prices returns prices under which every row's
    best reduced entry is its own column (LP duality: a certificate of optimality)."""
    from scipy.optimize import linear_sum_assignment
    g = torch.Generator().manual_seed(0)
    cost = torch.randn(200, 200, dtype=torch.float64, generator=g)
    cols, prices = rebasin._assign(cost)
    reduced = cost.numpy() - prices
    assert (reduced.argmax(1) == cols).all() or \
        (reduced[range(200), cols] >= reduced.max(1) - 1e-9).all()
    for scale in (0.01, 0.1, 1.0):   # nearby and far problems, warm-started from the first one's prices
        nearby = cost + scale * torch.randn(200, 200, dtype=torch.float64, generator=g)
        warm, _ = rebasin._assign(nearby, prices)
        _, cold = linear_sum_assignment(nearby.numpy(), maximize=True)
        i = torch.arange(200)
        assert nearby[i, warm].sum().item() == pytest.approx(nearby[i, cold].sum().item(), rel=1e-12)


def test_aligning_a_network_with_itself_gives_the_identity():
    a, _, spec = mlp_pair()
    with torch.no_grad():
        a[2].weight[:5] = 0     # dead units tie with each other: ties must not count as progress
    perm = rebasin.weight_matching(spec, params(a), params(a))
    assert all(torch.equal(q, torch.arange(len(q))) for q in perm.values())
    assert len(perm.objective) == 2


#############################################
#                 MergeMany                 #
#############################################

def test_merge_many_never_moves_a_model_away_from_the_mean_of_the_others():
    spec_ = model_spec('mlp', hidden=[48, 24], image_size=8)
    nets = [params(member(spec_, seed)) for seed in range(4)]
    spec = rebasin.permutation_spec(member(spec_, 0), images(spec_, 1))
    records = []
    merged, perms = rebasin.merge_many(spec, nets, seed=1, progress=records.append)
    steps = [r for r in records if 'model' in r]
    passes = [r['distance'] for r in records if 'distance' in r]
    assert steps and all(r['after'] <= r['before'] * (1 + 1e-12) for r in steps)
    assert any(r['after'] < r['before'] for r in steps)
    assert all(y <= x for x, y in zip(passes, passes[1:])) and passes[-1] < passes[0]
    assert all(torch.equal(q, torch.arange(len(q))) for q in perms[0].values())   # in the first model's basin
    aligned = [rebasin.apply_permutation(spec, q, n) for q, n in zip(perms, nets)]
    torch.testing.assert_close(merged, rebasin.average(aligned))


@pytest.mark.parametrize('arch', ['mlp', 'airbench'])
def test_merging_permuted_copies_of_one_network_returns_that_network(arch):
    s = model_spec(arch)
    net = member(s, 0)
    warm_up_batchnorm(net, images(s))
    spec = rebasin.permutation_spec(net, images(s, 1))
    copies = [params(net)] + [rebasin.apply_permutation(spec, rebasin.random_permutation(spec, i), params(net))
                              for i in range(1, 4)]
    merged, _ = rebasin.merge_many(spec, copies, seed=0)
    for k, v in params(net).items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)


#############################################
#         BatchNorm after averaging         #
#############################################

def fashion_slice():
    """1000 Fashion-MNIST training and 1000 test images at 14x14 (2x2 average pooled), as uint8."""
    data = te.load_data('fashion-mnist', subset=1000)
    shrink = lambda x: F.avg_pool2d(x.float(), 2).round().to(torch.uint8)  # noqa: E731
    return shrink(data.x_train), data.y_train, shrink(data.x_test), data.y_test


def train(net, x, y, steps, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(net(te.to_float_images(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope='module')
def trained_pair():
    if not te.DEBIAN_FASHION_MNIST.exists():
        pytest.fail('Fashion-MNIST is missing: apt-get install dataset-fashion-mnist')
    x, y, x_test, y_test = fashion_slice()
    s = model_spec('airbench', in_channels=1, image_size=14, mean=[0.29], std=[0.35])
    nets = [train(member(s, seed), x, y, steps=150, seed=seed) for seed in (0, 1)]
    return s, nets, x, x_test, y_test


def test_reset_bn_and_repair_fix_the_midpoint_and_change_only_batchnorm_terms(trained_pair):
    s, (a, b), x, x_test, y_test = trained_pair
    spec = rebasin.permutation_spec(a, images(s, 1))
    b = load(b, rebasin.apply_permutation(spec, rebasin.weight_matching(spec, params(a), params(b)), params(b)))
    mid = load(a, rebasin.average([params(a), params(b)]))
    before = {k: v.clone() for k, v in params(mid).items()}
    batches = [te.to_float_images(x[i:i + 250]) for i in range(0, len(x), 250)]
    loss = lambda state: te.evaluate([load(mid, state)], x_test, y_test)['loss']  # noqa: E731
    norms = {name for name, m in mid.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for fixed in (rebasin.reset_bn(mid, batches), rebasin.repair(a, b, mid, 0.5, batches)):
        changed = {k for k in fixed if not torch.equal(fixed[k], before[k])}
        assert changed and all(k.rpartition('.')[0] in norms for k in changed), changed
        assert loss(fixed) < loss(before) - 0.05, (loss(fixed), loss(before))   # measured: 2.0 -> 1.1
    assert all(torch.equal(v, before[k]) for k, v in params(mid).items()), 'the averaged model was modified'


def test_repair_without_batchnorm_gives_hidden_layers_the_interpolated_statistics():
    s = model_spec('mlp', image_size=8, hidden=[32, 16])
    a, b = member(s, 0), member(s, 1)
    spec = rebasin.permutation_spec(a, images(s, 1))
    b = load(b, rebasin.apply_permutation(spec, rebasin.weight_matching(spec, params(a), params(b)), params(b)))
    mix = load(a, rebasin.average([params(a), params(b)], [0.7, 0.3]))
    batches = [images(s, 64, seed) for seed in range(4)]
    fixed = rebasin.repair(a, b, mix, 0.3, batches)
    changed = {k for k in fixed if not torch.equal(fixed[k], params(mix)[k])}
    assert changed == {'2.weight', '2.bias', '4.weight', '4.bias'}   # the hidden Linears, not the output
    hidden = ['2', '4']
    ends = [rebasin._channel_stats(net, hidden, batches) for net in (a, b)]
    got = rebasin._channel_stats(load(mix, fixed), hidden, batches)
    for name in hidden:
        for j in (0, 1):   # mean, std
            goal = 0.7 * ends[0][name][j] + 0.3 * ends[1][name][j]
            torch.testing.assert_close(got[name][j], goal, rtol=1e-4, atol=1e-6)


def test_auto_statistics_repair_an_mlp_reset_a_batchnorm_net_and_leave_a_transformer_s_tokens_alone():
    x = images(model_spec('mlp'), 1)
    assert rebasin.auto_statistics(member(model_spec('mlp'), 0), x)[0] == 'repair'
    assert rebasin.auto_statistics(member(model_spec('airbench'), 0), x)[0] == rebasin.AUTO_WITH_BN == 'reset-bn'
    vit = te.build_model(model_spec('vit', depth=1, heads=2, patch_size=4, width=0.5))
    choice, why = rebasin.auto_statistics(vit, x)   # its Linears act on each token: (batch, tokens, channels)
    assert choice is None and why.startswith('REPAIR rescales the channels of axis 1, but') and '(1, 16, ' in why
    with pytest.raises(rebasin.RebasinError, match='its channels are the last axis'):
        rebasin.repair(vit, vit, vit, 0.5, [images(model_spec('vit'), 4)])


#############################################
#               Command line                #
#############################################

def cli(*args):
    from typer.testing import CliRunner
    return CliRunner().invoke(rebasin.make_app(), [str(a) for a in args])


def write_run(path, nets, s, config=None):
    path.mkdir(parents=True)
    for i, net in enumerate(nets):
        te.save_member(path / f'member_{i}.safetensors', net.state_dict(), s)
    if config is not None:
        (path / 'config.json').write_text(json.dumps(config))
    return path


def test_cli_spec_align_and_merge_write_runs_that_load(tmp_path):
    s = model_spec('airbench', in_channels=1, image_size=28, mean=[0.29], std=[0.35])
    data = dict(dataset='fashion-mnist', subset=500)
    runs = [write_run(tmp_path / f'r{i}', [member(s, i)], s, data) for i in range(3)]
    result = cli('spec', runs[0] / 'member_0.safetensors', '--json', tmp_path / 'spec.json')
    assert result.exit_code == 0, result.output
    assert 'P_3.conv1' in result.output and 'network output' in result.output
    assert json.loads((tmp_path / 'spec.json').read_text())['perms']['P_1'] == 8
    result = cli('align', runs[0], runs[1], '--out', tmp_path / 'aligned')
    assert result.exit_code == 0, result.output
    aligned = te.load_member(tmp_path / 'aligned' / 'member_0.safetensors')
    x = images(s)
    torch.testing.assert_close(aligned(x), te.load_member(runs[1] / 'member_0.safetensors')(x))
    assert json.loads((tmp_path / 'aligned' / 'config.json').read_text())['alignments'][0]['sweeps'] >= 1
    result = cli('merge', *runs, '--out', tmp_path / 'merged', '--reset-bn', '--bn-examples', 200, '--batch-size', 100)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / 'merged' / 'config.json').read_text())
    assert config['sources'] == [str(r / 'member_0.safetensors') for r in runs] and config['passes'] >= 1
    assert config['reset_bn'] and config['dataset'] == 'fashion-mnist' and config['subset'] == 500
    te.load_member(tmp_path / 'merged' / 'member_0.safetensors')
    for out, stats in (('auto', 'auto'), ('plain', 'none')):   # by default, a BatchNorm network's statistics are reset
        result = cli('merge', *runs, '--out', tmp_path / out, '--stats', stats, '--bn-examples', 200, '--batch-size',
                     100, '--no-eval')
        assert result.exit_code == 0, result.output
    reset, auto, plain = (te.load_member_state(tmp_path / out / 'member_0.safetensors')[1]
                          for out in ('merged', 'auto', 'plain'))
    assert all(torch.equal(auto[k], reset[k]) for k in auto) and json.loads((tmp_path / 'auto' / 'config.json')
                                                                             .read_text())['reset_bn']
    assert not torch.equal(auto['3.norm1.running_var'], plain['3.norm1.running_var'])
    result = cli('align', runs[0], runs[1], '--out', tmp_path / 'by_activation', '--method', 'activation',
                 '--examples', 200)
    assert result.exit_code == 0, result.output
    by_activation = te.load_member(tmp_path / 'by_activation' / 'member_0.safetensors')
    torch.testing.assert_close(by_activation(x), te.load_member(runs[1] / 'member_0.safetensors')(x))
    assert json.loads((tmp_path / 'by_activation' / 'config.json').read_text())['method'] == 'activation'
    result = cli('merge', *runs, '--out', tmp_path / 'merged_by_activation', '--method', 'activation',
                 '--examples', 200)
    assert result.exit_code == 0 and 'by activation matching on 200 training images' in result.output, result.output
    assert one_line_error(cli('align', runs[0], runs[1], '--out', tmp_path / 'no',
                              '--method', 'magic')).count('--method')


def one_line_error(result):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error:'), result.output
    return lines[0]


def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path):
    s = model_spec('airbench')
    a = write_run(tmp_path / 'a', [member(s, 0)], s)
    s5 = model_spec('airbench', kernel_size=5)
    k5 = write_run(tmp_path / 'k5', [member(s5, 1)], s5)
    out = tmp_path / 'out'
    assert 'at least two' in one_line_error(cli('merge', a, '--out', out))
    assert "'3.conv1.weight'" in one_line_error(cli('merge', a, k5, '--out', out))
    assert "'3.conv1.weight'" in one_line_error(cli('align', a, k5, '--out', out))
    (tmp_path / 'junk.safetensors').write_bytes(b'not a checkpoint')
    assert 'junk' in one_line_error(cli('align', a, tmp_path / 'junk.safetensors', '--out', out))
    state = member(s, 2).state_dict()
    state['3.conv2.weight'][0, 0, 0, 0] = float('nan')
    te.save_member(tmp_path / 'nan.safetensors', state, s)
    assert 'non-finite' in one_line_error(cli('merge', a, tmp_path / 'nan.safetensors', '--out', out))
    assert not out.exists() and not list(tmp_path.glob('.out*'))


def test_force_replaces_only_a_directory_the_toolkit_wrote(tmp_path):
    s = model_spec('mlp')
    a, b = (write_run(tmp_path / name, [member(s, i)], s) for i, name in enumerate('ab'))
    out = tmp_path / 'aligned'
    assert cli('align', a, b, '--out', out).exit_code == 0
    assert 'already exists' in one_line_error(cli('align', a, b, '--out', out))
    assert cli('align', a, b, '--out', out, '--force').exit_code == 0   # its own output: replaced
    foreign = tmp_path / 'project'
    foreign.mkdir()
    (foreign / 'config.json').write_text('{"members": 2}')
    (foreign / 'code.py').write_text('print("my work")')
    assert 'refusing to replace' in one_line_error(cli('align', a, b, '--out', foreign, '--force'))
    assert (foreign / 'code.py').read_text() == 'print("my work")'


def test_every_command_documents_itself():
    for command in ('spec', 'align', 'merge'):
        result = cli(command, '--help')
        assert result.exit_code == 0 and 'Usage' in result.output
    assert '--reset-bn' in cli('merge', '--help').output and '--repair' in cli('merge', '--help').output


#############################################
#           Activation matching             #
#############################################

@pytest.mark.parametrize('arch', ['mlp', 'airbench', 'resnet18'])
def test_activation_matching_recovers_a_planted_permutation_exactly(arch):
    """B = π(A): the correlation of A's channel i with B's channel π⁻¹(i) is 1, and activation matching
    finds every permutation, residual streams included, from 64 images."""
    spec_ = model_spec(arch, hidden=[64, 32], image_size=8) if arch == 'mlp' else model_spec(arch)
    x = images(spec_, 64)
    a = warm_up_batchnorm(member(spec_, 0), x)
    spec = rebasin.permutation_spec(a, x[:1])
    planted = rebasin.random_permutation(spec, seed=3)
    b = load(a, rebasin.apply_permutation(spec, planted, params(a)))
    perm = rebasin.activation_matching(spec, a, b, [x[:32], x[32:]], device='cpu')
    assert all(torch.equal(perm[p][planted[p]], torch.arange(n)) for p, n in spec.perms.items())
    restored = rebasin.apply_permutation(spec, perm, params(b))
    assert all(torch.equal(restored[k], v) for k, v in params(a).items())


def test_activation_matching_finds_the_units_of_a_noisy_copy_and_needs_data():
    torch.manual_seed(0)
    a, _, spec = mlp_pair(hidden=(64, 32))
    x = images(model_spec('mlp', image_size=8), 256)
    planted = rebasin.random_permutation(spec, seed=4)
    noisy = {k: v + 0.01 * v.std() * torch.randn_like(v) if v.is_floating_point() else v for k, v in params(a).items()}
    b = load(a, rebasin.apply_permutation(spec, planted, noisy))
    perm = rebasin.activation_matching(spec, a, b, [x])
    assert all(torch.equal(perm[p][planted[p]], torch.arange(n)) for p, n in spec.perms.items())
    with pytest.raises(rebasin.RebasinError, match='at least one batch'):
        rebasin.activation_matching(spec, a, b, [])


def test_a_hand_written_spec_is_the_traced_one_and_bad_tables_are_refused():
    """The traced spec written as a table and read back gives the same spec and the same matching; a table
    that names a missing tensor, the wrong number of axes or a permutation of two sizes is refused."""
    a, b, spec = mlp_pair()
    table = {k: v for k, v in spec.axes.items() if any(name is not None for name in v)}
    by_hand = rebasin.spec_from_table(table, params(a), spec.buffers)
    assert by_hand.perms == spec.perms and by_hand.axes == spec.axes
    planted = rebasin.random_permutation(spec, seed=1)
    permuted = rebasin.apply_permutation(by_hand, planted, params(a))
    perm = rebasin.weight_matching(by_hand, params(a), permuted)
    assert all(torch.equal(perm[p][planted[p]], torch.arange(n)) for p, n in spec.perms.items())
    key = next(iter(table))
    for bad, message in [({'nope.weight': (None,)}, 'does not have'), ({key: table[key] + (None,)}, 'axes'),
                         ({key: ('P', 'P')}, 'channels')]:
        with pytest.raises(rebasin.RebasinError, match=message):
            rebasin.spec_from_table(bad, params(a))
