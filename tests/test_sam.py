"""The claims of SAM and SharpBalance in train_ensemble.py (CPU, tiny networks, synthetic data)."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import train_ensemble as te
from test_train_ensemble import cli, member_states, quiet_console, run

TINY_AIRBENCH = dict(dataset='synthetic', arch='airbench', width=1 / 16, subset=128, batch_size=32, epochs=2, tta=False)
TINY_MLP = dict(dataset='synthetic', arch='mlp', hidden=[32], subset=256, batch_size=64, epochs=3)


def wide_airbench(members=3, seed=0):
    """A tiny wide airbench in train mode, a batch, and the closures sam_step takes (β = 0.5)."""
    torch.manual_seed(seed)
    data = te.load_data('synthetic', subset=64)
    spec = dict(arch='airbench', in_channels=3, image_size=32, num_classes=10, width=1 / 16, kernel_size=3,
                hidden=[], mean=[0.5] * 3, std=[0.25] * 3)
    net = te.build_model(spec, members=members).train()
    x, y = te.to_float_images(data.x_train[:32]), data.y_train[:32]
    return net, x, y, (lambda: te.member_logits(net, x, members)), \
        (lambda z: te.ensemble_objective(z, y, 0.5, 'prob', 0.2)[0])


def trainable(net):
    return [p for p in net.parameters() if p.requires_grad]


# ---- SAM ----

def test_sam_ascends_each_member_by_exactly_rho_and_steps_with_the_gradient_there():
    net, x, y, logits_at, objective_of = wide_airbench()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    logits_at()   # one plain forward pass: the BatchNorm statistics SAM must end with
    one_pass = {k: v.clone() for k, v in net.named_buffers()}
    net.load_state_dict(state)
    before = [p.detach().clone() for p in trainable(net)]
    seen = []

    def recording_logits_at():   # the second call happens at the perturbed weights w + ε
        seen.append([p.detach().clone() for p in trainable(net)])
        return logits_at()
    te.sam_step(net, 3, 0.05, recording_logits_at, objective_of)
    # Back at w exactly, with the first pass's BatchNorm statistics (not updated twice).
    assert all(torch.equal(p, b) for p, b in zip(trainable(net), before))
    assert all(torch.equal(b, one_pass[k]) for k, b in net.named_buffers())
    epsilon = [a - b for a, b in zip(seen[1], before)]
    assert torch.allclose(te.member_norms(epsilon, 3), torch.full((3,), 0.05), rtol=1e-4)
    # ε_j is member j's own normalized gradient: its direction is that of ∇_j L(w).
    net.load_state_dict(state)
    grads = torch.autograd.grad(objective_of(logits_at()), trainable(net))
    for e, g in zip(epsilon, grads):
        assert torch.allclose(e, g * te.per_member(0.05 / te.member_norms(grads, 3), g), atol=1e-7)
    # The step's gradient is the gradient at w + ε.
    net.load_state_dict(state)
    for p, e in zip(trainable(net), epsilon):
        p.data.add_(e)
    expected = torch.autograd.grad(objective_of(logits_at()), trainable(net))
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(trainable(net), expected))


def test_sam_with_rho_zero_reproduces_plain_training_exactly(tmp_path):
    """Two forward passes, restored BatchNorm statistics, bagging, β > 0, label smoothing, Lookahead (from
    epoch 3) and the whitening bias freezing at epoch 3: the same bits as plain training."""
    options = dict(TINY_AIRBENCH, members=2, beta=0.5, bagging=True, epochs=4, lookahead=True)
    run(tmp_path, 'plain', **options)
    run(tmp_path, 'sam0', sam_rho=0.0, **options)
    for a, b in zip(member_states(tmp_path / 'plain'), member_states(tmp_path / 'sam0')):
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ---- SharpBalance ----

def test_sharpbalance_sets_match_a_hand_computed_example():
    scores = torch.tensor([[0.1, 0.2, 5.0, 6.0, 7.0, 8.0],    # member 0: flattest {0, 1}, sharpest {4, 5}
                           [3.0, 0.1, 0.2, 4.0, 5.0, 6.0],    # member 1: flattest {1, 2}, sharpest {4, 5}
                           [1.0, 2.0, 3.0, 4.0, 0.1, 0.2]])   # member 2: flattest {4, 5}, sharpest {2, 3}
    sets = lambda mask: [set(row.nonzero().flatten().tolist()) for row in mask]   # noqa: E731
    # Each member selects ⌊6/3⌋ = 2 examples; member j's SAM set is the union of the others' selections.
    assert sets(te.sharpbalance_masks(scores, 1 / 3)) == [{1, 2, 4, 5}, {0, 1, 4, 5}, {0, 1, 2}]
    assert sets(te.sharpbalance_masks(scores, 1 / 3, sharpest=True)) == [{2, 3, 4, 5}, {2, 3, 4, 5}, {4, 5}]


def test_sharpbalance_sam_set_is_exactly_what_the_other_members_selected():
    scores = torch.rand(4, 100, generator=torch.Generator().manual_seed(0))
    sam = te.sharpbalance_masks(scores, 0.3)
    selected = torch.zeros_like(sam).scatter_(1, scores.argsort(1)[:, :30], True)
    for j in range(4):
        others = selected[[k for k in range(4) if k != j]].any(0)
        assert torch.equal(sam[j], others)                  # SAM set: chosen by another member
        assert torch.equal(~sam[j], ~others)                # SGD set: the rest, so every example is in one of them


def test_sharpbalance_step_adds_up_to_the_full_gradient_per_member_at_any_beta():
    """With ρ = 0 the SAM part and the plain part of every member add up to the plain gradient; with a
    member whose SAM set is empty, that member gets exactly its plain gradient even at ρ > 0."""
    net, x, y, logits_at, objective_of = wide_airbench()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    mask = torch.rand(3, 32, generator=torch.Generator().manual_seed(1)) < 0.5
    te.sam_step(net, 3, 0.0, logits_at, objective_of, mask)
    split = [p.grad.clone() for p in trainable(net)]
    net.load_state_dict(state)
    plain = torch.autograd.grad(objective_of(logits_at()), trainable(net))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(split, plain))   # float rounding only

    net.load_state_dict(state)
    mask[1] = False
    te.sam_step(net, 3, 0.5, logits_at, objective_of, mask)
    for p, g in zip(trainable(net), plain):
        assert torch.allclose(p.grad.chunk(3)[1], g.chunk(3)[1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(p.grad.chunk(3)[0], g.chunk(3)[0], rtol=1e-5, atol=1e-5)


def test_sharpness_score_is_the_squared_gradient_norm_of_each_members_own_loss():
    net, x, y, _, _ = wide_airbench()
    data = te.load_data('synthetic', subset=64)
    scores = te.sharpness_scores(net, data.x_train[:4], data.y_train[:4], 3)
    assert net.training   # left as it was found
    net.eval()            # official code: BatchNorm on running statistics, one example at a time
    for i in range(4):
        logits = te.member_logits(net, te.to_float_images(data.x_train[i:i + 1]), 3)
        for j in range(3):
            g = torch.autograd.grad(torch.nn.functional.cross_entropy(logits[j], data.y_train[i:i + 1]),
                                    trainable(net), retain_graph=True)
            assert scores[j, i].item() == pytest.approx(sum(t.pow(2).sum() for t in g).item(), rel=1e-4)


def test_sharpbalance_trains_resumes_exactly_and_records_its_options(tmp_path):
    options = dict(TINY_MLP, members=3, beta=0.5, sam_rho=0.2, flat_ratio=0.5, sam_start_epoch=1)
    summary = run(tmp_path, 'straight', **options)
    assert summary['test_acc'] > 0.2   # chance is 0.1
    config = json.loads((tmp_path / 'straight' / 'config.json').read_text())
    assert (config['sam_rho'], config['flat_ratio'], config['sam_start_epoch']) == (0.2, 0.5, 1)

    def interrupt(epoch):
        if epoch == 1:   # after the sets were drawn: the resumed run must reuse them
            mask = load_file(tmp_path / 'resumed' / 'state.safetensors')['sharpbalance/sam_mask']
            assert mask.shape == (3, 256) and 0 < mask.float().mean() < 1
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        te.train(te.Config(out=str(tmp_path / 'resumed'), device='cpu', **options), console=quiet_console(),
                 on_epoch_end=interrupt)
    result = CliRunner().invoke(cli(), ['--resume', str(tmp_path / 'resumed')])
    assert result.exit_code == 0, result.output
    for a, b in zip(member_states(tmp_path / 'straight'), member_states(tmp_path / 'resumed')):
        assert all(torch.equal(a[key], b[key]) for key in a)


# ---- the command line ----

@pytest.mark.parametrize('args, message', [
    (['--rho', '-0.1'], 'radius'),
    (['--sam-rho', '0.1', '--flat-ratio', '1.5'], 'strictly between 0 and 1'),
    (['--flat-ratio', '0.5', '--members', '3'], 'pass --rho'),
    (['--sam-rho', '0.1', '--flat-ratio', '0.5'], '--members 2 or more'),
    (['--sam-rho', '0.1', '--sam-start-epoch', '2'], 'pass --flat-ratio'),
    (['--sam-rho', '0.1', '--flat-ratio', '0.5', '--members', '3', '--epochs', '4', '--sam-start-epoch', '4'],
     'last epoch'),
])
def test_bad_sharpness_options_get_a_one_line_error(args, message, tmp_path):
    result = CliRunner().invoke(cli(), args + ['--out', str(tmp_path / 'x')])
    assert result.exit_code == 2 and message in result.output and 'Traceback' not in result.output
    assert not (tmp_path / 'x').exists()
