"""The ViT: M members side by side exactly as if alone, and its permutation symmetries (residual stream,
heads, query/key and value dimensions, MLP units) named for rebasin.py."""
import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import analyze
import rebasin
import train_ensemble as te

SPEC = dict(arch='vit', in_channels=1, image_size=28, num_classes=10, width=0.5, kernel_size=3, hidden=[], depth=2,
            heads=4, patch_size=7, mean=[0.3], std=[0.35])
TINY = dict(dataset='synthetic', arch='vit', width=0.25, depth=1, heads=2, patch_size=8, subset=256, batch_size=64,
            epochs=2)


def member(seed, spec=SPEC):
    torch.manual_seed(seed)
    return te.build_model(spec).eval()


def images(n=6, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_the_wide_vit_computes_every_member_exactly_as_if_alone():
    states = [member(j).state_dict() for j in range(3)]
    wide = te.build_model(SPEC, members=3).eval()
    wide.load_state_dict(te.stack_members(states, wide.state_dict()))
    x = images()
    with torch.no_grad():
        logits = te.member_logits(wide, x, 3)
        for j, state in enumerate(states):
            alone = te.build_model(SPEC).eval()
            alone.load_state_dict(state)
            torch.testing.assert_close(logits[j], alone(x), rtol=1e-5, atol=1e-6)
    assert [s.keys() for s in te.split_members(wide.state_dict(), states[0])] == [s.keys() for s in states]


def test_a_permuted_vit_computes_the_same_function_and_weight_matching_finds_the_permutation():
    net = member(0)
    spec = rebasin.permutation_spec(net, images(1))
    assert spec.perms == {'R': 32, 'H2': 4, 'QK2': 8, 'V2': 8, 'M2': 128, 'H3': 4, 'QK3': 8, 'V3': 8, 'M3': 128}
    assert spec.axes['2.attn.q_weight'] == ('H2', 'QK2', 'R') and spec.axes['2.attn.out_weight'] == ('R', 'H2', 'V2')
    assert spec.axes['5.weight'] == ('R',) and spec.axes['6.weight'] == (None, 'R')   # the classes stay put
    assert spec.buffers == ['1.pos'] and spec.within == {'QK2': 'H2', 'V2': 'H2', 'QK3': 'H3', 'V3': 'H3'}
    planted = rebasin.random_permutation(spec, seed=1)
    assert planted['QK2'].shape == (4, 8) and len({tuple(row.tolist()) for row in planted['QK2']}) > 1   # per head
    permuted = rebasin.apply_permutation(spec, planted, net.state_dict())
    random_init = [k for k in spec.axes if k.endswith('weight') and 'norm' not in k and k != '5.weight']   # not ones
    assert all(not torch.equal(permuted[k], net.state_dict()[k]) for k in random_init)
    twin = copy.deepcopy(net)
    twin.load_state_dict(permuted)
    with torch.no_grad():
        torch.testing.assert_close(twin(images()), net(images()), rtol=1e-4, atol=1e-5)
    found = rebasin.weight_matching(spec, net.state_dict(), permuted)
    with pytest.raises(rebasin.RebasinError, match='use weight matching'):
        rebasin.activation_matching(spec, net, twin, [images()])
    identity, recovered = rebasin.identity_permutation(spec), rebasin.compose(spec, planted, found)
    assert all(torch.equal(recovered[p], identity[p]) for p in spec.perms)
    assert torch.equal(rebasin.compose(spec, planted, rebasin.inverse(spec, planted))['QK2'], identity['QK2'])


def quiet():
    from rich.console import Console
    return Console(quiet=True)


def test_at_beta0_a_vit_ensemble_trains_each_member_exactly_as_if_alone(tmp_path, float64):
    te.train(te.Config(out=str(tmp_path / 'ensemble'), members=2, seed=10, device='cpu', **TINY), console=quiet())
    ensemble = [te.load_member_state(p)[1] for p in te.member_paths(tmp_path / 'ensemble')]
    for j in range(2):
        te.train(te.Config(out=str(tmp_path / f'solo{j}'), members=1, seed=10 + j, data_seed=10, device='cpu', **TINY),
                 console=quiet())
        solo = te.load_member_state(te.member_paths(tmp_path / f'solo{j}')[0])[1]
        for key in solo:
            assert torch.allclose(ensemble[j][key], solo[key], atol=1e-12, rtol=0), (j, key)


def test_vits_learn_and_align_and_merge_from_the_command_line(tmp_path, fashion_mnist):
    options = dict(dataset=fashion_mnist, arch='vit', width=0.5, depth=2, heads=4, patch_size=7, subset=2000, epochs=3,
                   batch_size=64, device='cpu')
    summary = te.train(te.Config(out=str(tmp_path / 'vit'), members=2, **options), console=quiet())
    assert min(summary['member_test_acc']) > 0.6   # chance is 0.1
    result = CliRunner().invoke(analyze.app, ['interpolate', str(tmp_path / 'vit'), str(tmp_path / 'vit'),
                                              '--member', '0,1', '--align', '--steps', '5', '--examples', '500',
                                              '--json', str(tmp_path / 'i.json')])
    assert result.exit_code == 0, result.output
    curves = json.loads((tmp_path / 'i.json').read_text())['curves']
    assert curves['aligned']['barrier']['test_loss'] < curves['naive']['barrier']['test_loss']
    result = CliRunner().invoke(rebasin.make_app(), ['merge', str(tmp_path / 'vit'), '--out', str(tmp_path / 'merged')])
    assert result.exit_code == 0, result.output
    assert len(te.member_paths(tmp_path / 'merged')) == 1
    result = CliRunner().invoke(rebasin.make_app(), ['align', str(tmp_path / 'vit'), str(tmp_path / 'vit'),
                                                     '--out', str(tmp_path / 'aligned')])
    # 32 + 2 x (4 + 2 x 4 x 8 + 128)
    assert result.exit_code == 0 and 'of 424 channels moved' in result.output, result.output
    result = CliRunner().invoke(rebasin.make_app(), ['spec', str(tmp_path / 'vit' / 'member_0.safetensors'),
                                                     '--json', str(tmp_path / 'spec.json')])
    assert result.exit_code == 0 and 'QK2 (in each block of H2)' in result.output, result.output
    assert json.loads((tmp_path / 'spec.json').read_text())['within']['V3'] == 'H3'


@pytest.mark.parametrize('args, message', [
    (['--heads', '3'], 'must divide the ViT'), (['--patch-size', '5'], 'must divide the image size'),
    (['--param', 'spectral'], 'attention weights are per head'), (['--depth', '0'], '--depth must be'),
    (['--optimizer', 'sgd'], "recipe is adam's: --optimizer sgd needs --lr too"),
])
def test_bad_vit_options_get_a_one_line_error(args, message, tmp_path):
    import typer
    app = typer.Typer()
    app.command()(te.command())
    result = CliRunner().invoke(app, ['--arch', 'vit', '--dataset', 'synthetic', '--subset', '64', '--device', 'cpu',
                                      '--out', str(tmp_path / 'x'), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / 'x').exists()


def test_members_whose_shared_tensors_differ_are_refused_side_by_side():
    """rebasin.py permutes an aligned ViT's positions (a buffer the wide network holds once): stacking it with
    an unaligned member would silently give it the other's positions."""
    a, b = member(0), member(1)
    spec = rebasin.permutation_spec(b, images(1))
    aligned = rebasin.apply_permutation(spec, rebasin.weight_matching(spec, a.state_dict(), b.state_dict()),
                                        b.state_dict())
    wide = te.build_model(SPEC, members=2)
    with pytest.raises(te.EnsembleError, match="differ in '1.pos'"):
        te.stack_members([a.state_dict(), aligned], wide.state_dict())


def test_merging_permuted_copies_of_one_vit_returns_that_vit():
    """MergeMany composes per-head permutations (rebasin.compose, rebasin.inverse) to express every model
    in the first one's basin."""
    net = member(0)
    spec = rebasin.permutation_spec(net, images(1))
    copies = [net.state_dict()] + [rebasin.apply_permutation(spec, rebasin.random_permutation(spec, i),
                                                             net.state_dict())
                                   for i in range(1, 4)]
    merged, perms = rebasin.merge_many(spec, copies, seed=0)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)
    assert torch.equal(perms[0]['QK2'], rebasin.identity_permutation(spec)['QK2'])


def test_the_heads_and_their_dimensions_are_solved_jointly_and_exactly():
    """With everything else fixed, weight matching's choice of a block's heads and of each head's own query/key
    and value orders is the best of all 2! x (2!)^2 x (2!)^2 = 32 (two heads of two dimensions: brute force)."""
    import itertools
    spec_ = dict(SPEC, width=4 / te.VIT_DIM, heads=2, depth=1)
    a, b = member(0, spec_).state_dict(), member(1, spec_).state_dict()
    spec = rebasin.permutation_spec(member(0, spec_), images(1))
    found = rebasin.weight_matching(spec, a, b)
    keys = rebasin._matched_keys(spec, a)

    def objective(perm):
        moved = rebasin.apply_permutation(spec, perm, b)
        return sum(float((a[k].double() * moved[k].double()).sum()) for k in keys)

    orders = [torch.tensor(o) for o in itertools.permutations(range(2))]
    best = max(objective({**found, 'H2': heads, 'QK2': torch.stack(qk), 'V2': torch.stack(v)})
               for heads in orders for qk in itertools.product(orders, repeat=2)
               for v in itertools.product(orders, repeat=2))
    assert objective(found) == pytest.approx(best, rel=1e-6)


def test_a_hand_written_spec_within_blocks_is_checked():
    state = member(0).state_dict()
    table, buffers, within = member(0).permutation_table()
    with pytest.raises(rebasin.RebasinError, match="without its blocks 'H2'"):
        rebasin.spec_from_table({**table, '2.attn.q_bias': (None, 'QK2')}, state, buffers, within)
    with pytest.raises(rebasin.RebasinError, match="must act within the blocks"):
        rebasin.spec_from_table(table, state, buffers, {**within, 'QK2': 'X'})
