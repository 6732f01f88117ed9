"""spectral.py: spectral norms, the spectral parametrization, and coordinate checks.

    python spectral.py report runs/NAME/member_0.safetensors   # ‖W‖_* of every layer against its target
    python spectral.py coord-check --plot runs/coord.png      # activation size vs width, standard vs spectral
    python spectral.py lr-sweep --plot runs/lr.png            # best learning rate per width

Yang, Simon & Bernstein (2023, arXiv 2310.17813): features keep learning at every width when every
weight matrix W (fan_in → fan_out) and every update ΔW satisfy

    ‖W‖_* = Θ(√(fan_out / fan_in))    and    ‖ΔW‖_* = Θ(√(fan_out / fan_in))

with ‖·‖_* the spectral norm (largest singular value) and a conv kernel read as the matrix
(C_out, C_in·k·k), so fan_in counts C_in·k·k. The parametrization that `--param spectral` uses:

    init   W ← σ·√(fan_out/fan_in) · W₀/‖W₀‖_*       (W₀ PyTorch's default init, σ = 1)
    SGD    lr_W = lr · (fan_out/fan_in) / (fan_out/fan_in)_ref
    Adam   lr_W = lr · fan_in_ref / fan_in

The input layer (fan_in = the data's C·k·k or C·H·W) and the output layer (fan_out = classes) follow
the same rule, as in the paper. The reference layer, which trains at exactly --lr, is a square hidden
layer of REFERENCE_WIDTH = 256 channels with the network's kernel (fan_in = 256·k·k, fan_out = 256),
so airbench's and resnet18's square 3x3 convs keep the recipe's SGD lr. It must not be a layer of the
network itself: dividing by a width-dependent scale would undo the scaling that makes lrs transfer.
Not covered by the paper, chosen here: biases and BatchNorm keep their init and base lr (μP would
raise SGD bias lrs with fan_out); airbench's frozen whitening conv is neither rescaled nor optimized;
its DiracConv's identity part is rescaled with the rest of the kernel; its fixed logit scale 1/9
is a width-independent constant and stays.

Measured on CPU (coord-check defaults, mlp hidden 64..1024): after 10 SGD steps the worst layer's
mean |activation| varies 3.9x across widths under standard (the logits), 1.5x under spectral; the
lr-sweep's best lr moves 0.8 → 0.4 → 0.2 from width x0.25 to x4 under standard and stays at 1.6.
"""

#############################################
#              Hyperparameters              #
#############################################

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_WIDTH = 256       # channels of the reference layer that trains at exactly --lr (airbench's width)
COORD = dict(
    widths='0.25,0.5,1,2,4',  # multipliers of the hidden sizes (mlp) or of `width` (airbench, resnet18)
    hidden='256,256',         # mlp hidden sizes at width 1: two layers, so one is hidden-to-hidden
    steps=10,                 # SGD steps before the activations are measured
    lr=0.5,                   # plain SGD on the batch-mean loss; standard gives every layer this lr
    batch_size=64,
    examples=512,             # the synthetic training set the steps cycle through
)
# Side of the synthetic images per architecture (others: airbench's). The mlp's 4x4x3 = 48 inputs sit
# below every width checked: the rule describes widths large against the input dimension (see coord_check).
IMAGE_SIZE = dict(mlp=4, resnet18=8, airbench=16)
PARAMETRIZATIONS = ('standard', 'spectral')   # 'standard' = PyTorch's default init, one lr for every layer
SWEEP = dict(widths='0.25,1,4', lrs='0.05,0.1,0.2,0.4,0.8,1.6,3.2', steps=20)


#############################################
#              Spectral norms               #
#############################################

def as_matrices(weight, members=1):
    """A weight as `members` matrices (M, fan_out, fan_in): a conv kernel (M·C_out, C_in, k, k) becomes
    (M, C_out, C_in·k·k), a linear weight (M·out, in) becomes (M, out, in)."""
    return weight.reshape(members, weight.shape[0] // members, -1)


def spectral_norm(weight, members=1):
    """Largest singular value of a weight (per member: shape () for members=1, else (M,)), in the weight's
    own floating dtype: √(largest eigenvalue) of the smaller Gram matrix, WWᵀ or WᵀW, in float64 (the seed
    log's own definition), after dividing W by its largest entry so that no square underflows or overflows
    at any scale. It equals torch.linalg.matrix_norm(W, ord=2) and is several times faster than that SVD
    on a CPU."""
    a = as_matrices(weight.detach(), members).double()
    scale = a.abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    a = a / scale
    gram = a @ a.transpose(1, 2) if a.shape[1] <= a.shape[2] else a.transpose(1, 2) @ a
    sigma = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt() * scale[:, 0, 0]
    sigma = sigma.to(weight.dtype if weight.is_floating_point() else torch.get_default_dtype())
    return sigma[0] if members == 1 else sigma


#############################################
#                  Fans                     #
#############################################

def layer_fans(net, members=1):
    """[(name, fan_in, fan_out, kind)] of every weight matrix (conv or linear) in module order.

    name is the parameter's name ('3.conv1.weight'); fan_in = C_in·k·k (conv) or in (linear);
    fan_out = rows / members (wide networks stack members along the first axis); kind is 'input'
    (the first weight), 'output' (the last) or 'hidden'. Frozen weights are listed too.
    """
    weights = [(name, p) for name, p in net.named_parameters(remove_duplicate=True) if p.dim() >= 2]
    fans = []
    for i, (name, p) in enumerate(weights):
        kind = 'input' if i == 0 else 'output' if i == len(weights) - 1 else 'hidden'
        fans.append((name, p[0].numel(), p.shape[0] // members, kind))
    return fans


def spectral_target(fan_in, fan_out, sigma=1.0):
    """The spectral norm the parametrization gives a weight at initialization."""
    return sigma * math.sqrt(fan_out / fan_in)


def reference_fans(net, members=1):
    """(fan_in, fan_out) of the reference layer: square, REFERENCE_WIDTH channels, the net's kernel.
    The kernel is the largest among trainable weights (k·k = 9 for airbench and resnet18, 1 for mlp),
    a property of the architecture that does not change with width."""
    params = dict(net.named_parameters())
    trainable = [params[name] for name, *_ in layer_fans(net, members) if params[name].requires_grad]
    kernel = max([w[0].numel() // w.shape[1] for w in trainable], default=1)   # k·k, or 1 for a linear
    return REFERENCE_WIDTH * kernel, REFERENCE_WIDTH


def lr_scale(fan_in, fan_out, optimizer='sgd', reference=(REFERENCE_WIDTH, REFERENCE_WIDTH)):
    """Learning-rate multiplier that makes ‖ΔW‖_* = Θ(√(fan_out/fan_in)).

    SGD: the gradient g·xᵀ is (per example) rank one with ‖x‖ = Θ(√fan_in) and, when the layers above
    obey the condition, ‖g‖ = Θ(1/√fan_out); so ‖ΔW‖_* = lr·Θ(√(fan_in/fan_out)) and lr ∝ fan_out/fan_in.
    Adam: the update's entries are ±Θ(lr) whatever the gradient's scale, a near rank-one sign pattern
    with ‖ΔW‖_* = Θ(lr·√(fan_in·fan_out)); so lr ∝ 1/fan_in. Normalized to 1 at `reference`.
    """
    ref_in, ref_out = reference
    if optimizer == 'sgd':
        return (fan_out / fan_in) / (ref_out / ref_in)
    if optimizer in ('adam', 'adamw'):
        return ref_in / fan_in
    raise ValueError(f"unknown optimizer '{optimizer}': use sgd or adam")


#############################################
#         Spectral parametrization          #
#############################################

@torch.no_grad()
def spectral_init_(net, sigma=1.0, members=1):
    """Rescale, in place, every trainable weight matrix of `net` to ‖W‖_* = σ·√(fan_out/fan_in).

    Meant for a single member as train_ensemble.init_member returns it (members=1); a wide network
    is rescaled member by member. Frozen weights (requires_grad False, e.g. airbench's whitening
    conv, which is fixed by the data) are left alone. Biases and BatchNorm are left alone. Returns net.
    """
    params = dict(net.named_parameters())
    for name, fan_in, fan_out, _ in layer_fans(net, members):
        w = params[name]
        if not w.requires_grad:
            continue
        norms = spectral_norm(w, members=members).reshape(-1, 1, 1)
        scale = spectral_target(fan_in, fan_out, sigma) / norms.clamp_min(1e-12)
        w.copy_((as_matrices(w, members) * scale.to(w.dtype)).reshape(w.shape))
    return net


def spectral_param_groups(net, members, lr, weight_decay, optimizer='sgd', base_groups=None):
    """Optimizer parameter groups of the spectral parametrization for a (wide) network.

    Every trainable weight matrix gets its own group at lr · lr_scale(fans) (see lr_scale and the
    reference layer above), named after the parameter and carrying its multiplier as 'spectral_scale'
    (so a schedule can multiply it back in). Everything else (biases, BatchNorm) keeps its base lr.
    base_groups: the groups the standard parametrization would use (dicts with 'params', 'lr',
    'weight_decay', optionally 'name' and other keys, e.g. BatchNorm biases at a higher lr); default
    one group of every trainable parameter at (lr, weight_decay). Weight decay is never rescaled.
    Only parameters with requires_grad=True appear, each exactly once.
    """
    if base_groups is None:
        base_groups = [dict(params=list(net.parameters()), lr=lr, weight_decay=weight_decay,
                            name='biases and norms')]
    reference = reference_fans(net, members)
    params = dict(net.named_parameters())
    fans = {id(params[name]): (name, fan_in, fan_out) for name, fan_in, fan_out, _ in layer_fans(net, members)}
    groups = []
    for base in base_groups:
        trainable = [p for p in base['params'] if p.requires_grad]
        rest = [p for p in trainable if id(p) not in fans]
        if rest:
            groups.append(dict(base, params=rest, name=base.get('name', 'biases and norms'), spectral_scale=1.0))
        for p in trainable:
            if id(p) in fans:
                name, fan_in, fan_out = fans[id(p)]
                scale = lr_scale(fan_in, fan_out, optimizer, reference)
                groups.append(dict(base, params=[p], lr=base['lr'] * scale, name=name, spectral_scale=scale))
    return groups


#############################################
#     Spectral updates (Muon-style)         #
#############################################
# The update half of the spectral condition: steepest descent under the spectral norm replaces a
# weight matrix's update G = U·S·Vᵀ by U·Vᵀ (every singular value 1), scaled to √(fan_out/fan_in).
# U·Vᵀ comes from a Newton-Schulz iteration (matmuls only, so it runs in bf16 on a GPU): first Muon's
# quintic, whose coefficients lift small singular values fast but leave them in about [0.7, 1.2],
# then NS_POLISH steps of the quintic that converges to 1, (15σ − 10σ³ + 3σ⁵)/8. Measured (fp32, CPU,
# M = 4 stacks of 64x128, 256x256, 128x32, 2026-11-23): 5 steps are U·Vᵀ to 2e-3 relative Frobenius
# error at condition number 10 (to 3e-1 at 100); 8 steps to 2e-6 at condition number 100.

NS_FAST = (3.4445, -4.7750, 2.0315)      # Muon's coefficients (Jordan et al. 2024)
NS_EXACT = (15 / 8, -10 / 8, 3 / 8)      # the Newton-Schulz quintic that converges to the sign
NS_POLISH = 2                            # the last steps use NS_EXACT
# default --muon-lr (best of 0.02, 0.05, 0.1, 0.2: Fashion-MNIST 10k, MLP 256-256, 3 epochs, 2026-11-23)
MUON_LR = 0.1


def orthogonalize(G, steps=5):
    """U·Vᵀ of every matrix in a stack G (..., out, in) by Newton-Schulz, in bf16 on a GPU and fp32
    elsewhere; returned in G's dtype. A conv kernel should be passed as (C_out, C_in·k·k)."""
    dtype = torch.bfloat16 if G.is_cuda else torch.promote_types(G.dtype, torch.float32)
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)   # every singular value in (0, 1]
    wide = X.size(-2) <= X.size(-1)
    X = X if wide else X.mT                                  # iterate on the smaller Gram matrix
    for i in range(steps):
        a, b, c = NS_FAST if i < steps - NS_POLISH else NS_EXACT
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X if wide else X.mT).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then, for the groups with orthogonalize=True, each member's update replaced by
    its orthogonalized form times lr·√(fan_out/fan_in); the other groups take torch's SGD step (same
    momentum, Nesterov and weight-decay arithmetic as torch.optim.SGD). A wide parameter of M members
    (stacked on its first axis) is orthogonalized as M matrices in one batched call, so a member's step
    never depends on another member's gradient. Group keys: lr, momentum, weight_decay (torch's: added
    to the gradient; orthogonalized groups instead shrink the weights by lr·weight_decay, decoupled),
    orthogonalize, members, and for orthogonalized groups fan_in and fan_out."""

    def __init__(self, params, lr=MUON_LR, momentum=0.9, weight_decay=0.0, steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, orthogonalize=False,
                                      members=1, fan_in=1, fan_out=1, steps=steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum, decay = group['lr'], group['momentum'], group['weight_decay']
            for p in (p for p in group['params'] if p.grad is not None):
                g = p.grad if group['orthogonalize'] or not decay else p.grad.add(p, alpha=decay)
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = g.clone()
                else:
                    state['momentum_buffer'].mul_(momentum).add_(g)
                g = g.add(state['momentum_buffer'], alpha=momentum)   # Nesterov
                if not group['orthogonalize']:
                    p.add_(g, alpha=-lr)
                    continue
                m = group['members']
                update = orthogonalize(g.reshape(m, g.size(0) // m, -1), group['steps']).reshape(p.shape)
                p.mul_(1 - lr * decay)
                p.add_(update, alpha=-lr * math.sqrt(group['fan_out'] / group['fan_in']))


def muon_param_groups(net, members, base_groups, muon_lr=MUON_LR):
    """Optimizer groups for Muon: every trainable hidden weight matrix (layer_fans' kind 'hidden') its own
    orthogonalized group at muon_lr; the input and output layers, biases and norms keep their base group
    (plain SGD). base_groups: dicts with 'params', 'lr' and other keys (weight_decay, name...)."""
    params = dict(net.named_parameters())
    hidden = {id(params[name]): (name, fan_in, fan_out) for name, fan_in, fan_out, kind in layer_fans(net, members)
              if kind == 'hidden' and params[name].requires_grad}
    groups = []
    for base in base_groups:
        rest = [p for p in base['params'] if id(p) not in hidden]
        if rest:
            groups.append(dict(base, params=rest))
        for p in (p for p in base['params'] if id(p) in hidden):
            name, fan_in, fan_out = hidden[id(p)]
            groups.append(dict(base, params=[p], name=name, lr=muon_lr, orthogonalize=True, members=members,
                               fan_in=fan_in, fan_out=fan_out))
    return groups


#############################################
#     Coordinate check and lr transfer      #
#############################################
# The check of Yang et al. (Tensor Programs V): train a few steps at several widths and measure the
# typical size of every layer's output. A parametrization that is right in width gives flat lines; the
# standard one lets the logits grow with width, because an SGD step moves W·h by lr·‖h‖² ∝ lr·width.
# One finite-size effect remains under spectral: a layer with fan_out < fan_in (the input layer while
# the width is below the input dimension d) starts at mean |W·x| ∝ √n/(√n + √d), not yet flat in n.
# Hence the mlp check's 48-dimensional inputs.
# A network enters the checks as a builder: build(width, x) returns a freshly initialized network at
# that width multiplier (x: the uint8 training images, for data-dependent inits such as airbench's
# whitening), taking float images in [0, 1]. The default is a plain MLP; the command line also
# builds train_ensemble's networks.

class Standardize(nn.Module):
    """(x − 0.5)/0.25: the synthetic images' pixels, centred and scaled."""

    def forward(self, x):
        return (x - 0.5) / 0.25


def mlp(hidden=(256, 256), image_size=IMAGE_SIZE['mlp'], num_classes=10):
    """The default builder: a plain MLP on (3, image_size, image_size) images, its hidden sizes scaled by
    the width multiplier (the same network as train_ensemble's mlp with input statistics 0.5, 0.25)."""
    def build(width, x=None):
        sizes = [3 * image_size ** 2] + [max(1, round(h * width)) for h in hidden]
        layers = [Standardize(), nn.Flatten()]
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))
    return build


def synthetic_batch(n, image_size, num_classes=10, seed=0, noise=4.0):
    """Learnable uint8 images at any size: a smooth class pattern under heavy noise, so that a few dozen
    steps do not solve the task and the training loss still tells learning rates apart."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=image_size, mode='bilinear')
    y = torch.randint(num_classes, (n,), generator=g)
    x = patterns[y] + noise * torch.randn(n, 3, image_size, image_size, generator=g)
    return (128 + 40 * x).clamp(0, 255).to(torch.uint8), y


def as_float(x_uint8):
    return x_uint8.to(torch.get_default_dtype()) / 255


def make_optimizer(net, parametrization, lr, optimizer='sgd'):
    """Plain SGD or Adam for one member: one lr for every parameter ('standard'), or spectral groups."""
    if parametrization == 'spectral':
        groups = spectral_param_groups(net, 1, lr, 0.0, optimizer)
    else:
        groups = [dict(params=[p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)]
    return torch.optim.SGD(groups, lr=lr) if optimizer == 'sgd' else torch.optim.Adam(groups, lr=lr)


def train_member(build, width, parametrization, lr, steps, optimizer, x, y, batch_size=64, seed=0):
    """build(width, x) from seed (PyTorch's default init, or spectral_init_) after `steps` steps on (x, y)."""
    torch.manual_seed(seed)
    net = build(width, x)
    if parametrization == 'spectral':
        spectral_init_(net)
    opt = make_optimizer(net, parametrization, lr, optimizer)
    net.train()
    for step in range(steps):
        i = (step * batch_size) % len(x)
        loss = F.cross_entropy(net(as_float(x[i:i + batch_size])), y[i:i + batch_size])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


@torch.no_grad()
def activation_scales(net, x_float):
    """{layer: mean |output|} of every conv/linear layer on a batch (forward hooks; train-mode BatchNorm)."""
    modules = dict(net.named_modules())
    scales, hooks = {}, []
    for name, *_ in layer_fans(net):
        layer = name.rsplit('.', 1)[0]
        record = lambda m, i, out, layer=layer: scales.__setitem__(layer, out.abs().mean().item())  # noqa: E731
        hooks.append(modules[layer].register_forward_hook(record))
    net(x_float)
    for h in hooks:
        h.remove()
    return scales


def coord_check(build=None, widths=(0.25, 0.5, 1, 2, 4), steps=10, lr=0.5, optimizer='sgd', batch_size=64,
                examples=COORD['examples'], image_size=IMAGE_SIZE['mlp'], seed=0, progress=None):
    """Mean |activation| of every layer of build(width, x) (default: mlp()) after `steps` steps on
    synthetic images of side image_size, per parametrization and width.

    Returns {'layers', 'kinds', 'standard': {layer: [per width]}, 'spectral': {...}, 'drift': {parametrization:
    the worst layer's largest / smallest value across widths}} (1 = flat) with the settings.
    """
    build = build or mlp(image_size=image_size)
    x, y = synthetic_batch(examples, image_size, seed=seed)
    probe = as_float(x[:batch_size])
    out = dict(widths=list(widths), steps=steps, lr=lr, optimizer=optimizer, image_size=image_size)
    for p in PARAMETRIZATIONS:
        per_width = []
        for width in widths:
            net = train_member(build, width, p, lr, steps, optimizer, x, y, batch_size, seed)
            per_width.append(activation_scales(net, probe))
            if progress:
                progress()
        out['layers'] = list(per_width[0])
        out['kinds'] = {name.rsplit('.', 1)[0]: kind for name, _, _, kind in layer_fans(net)}
        out[p] = {layer: [s[layer] for s in per_width] for layer in out['layers']}
    out['drift'] = {p: max(max(v) / max(min(v), 1e-12) for v in out[p].values()) for p in PARAMETRIZATIONS}
    return out


@torch.no_grad()
def train_loss(net, x, y, batch_size=256):
    """Mean cross-entropy on the whole training set; None when training diverged."""
    total = sum(F.cross_entropy(net(as_float(x[i:i + batch_size])), y[i:i + batch_size],
                                reduction='sum').item() for i in range(0, len(x), batch_size))
    loss = total / len(x)
    return loss if math.isfinite(loss) else None


def lr_sweep(build=None, widths=(0.25, 1, 4), lrs=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2), steps=20, optimizer='sgd',
             batch_size=64, examples=COORD['examples'], image_size=IMAGE_SIZE['mlp'], seed=0, progress=None):
    """Training loss of build(width, x) (default: mlp()) after `steps` steps for every (parametrization,
    width, lr), and the best lr per width.

    Returns {'standard': {'loss': [[per lr] per width], 'best_lr': [per width]}, 'spectral': ...} with the
    settings. A parametrization that transfers keeps the best lr in place as the width grows.
    """
    build = build or mlp(image_size=image_size)
    x, y = synthetic_batch(examples, image_size, seed=seed)
    out = dict(widths=list(widths), lrs=list(lrs), steps=steps, optimizer=optimizer, image_size=image_size)
    for p in PARAMETRIZATIONS:
        losses = []
        for width in widths:
            row = []
            for lr in lrs:
                net = train_member(build, width, p, lr, steps, optimizer, x, y, batch_size, seed)
                row.append(train_loss(net, x, y))
                if progress:
                    progress()
            losses.append(row)
        best = [min(range(len(lrs)), key=lambda i: math.inf if row[i] is None else row[i]) for row in losses]
        out[p] = dict(loss=losses, best_lr=[lrs[i] for i in best])
    return out


def plot_panels(path, x, series, x_label, y_label, title, y_log=True):
    """Two panels, standard | spectral, log-x; series[p] is [(label, ys)] for each p (None: no point)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2), sharey=True)
    for ax, p in zip(axes, PARAMETRIZATIONS):
        for label, ys in series[p]:
            ax.plot(x, [math.nan if v is None else v for v in ys], marker='o', label=label)
        ax.set_xscale('log')
        ax.set_yscale('log' if y_log else 'linear')
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(x, [f'{v:g}' for v in x])
        ax.set_title(f'{p} parametrization')
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3, which='both')
    axes[0].set_ylabel(y_label)
    # beside the panels, where it covers no point (the curves start and end in any corner)
    axes[1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(title)
    fig.tight_layout()
    import train_ensemble as te   # the command line's side: the toolkit's one atomic write
    te.save_figure(fig, path)
    plt.close(fig)


#############################################
#               Command line                #
#############################################

def numbers(text, kind=float):
    return [kind(t) for t in str(text).split(',') if t.strip()]


def train_ensemble_network(arch, hidden, image_size, seed):
    """A builder of one of train_ensemble's networks (an ARCHS entry whose weights are matrices) for the
    checks, at a width multiplier: its --width, or an mlp's hidden sizes scaled here; for the command line,
    which may import train_ensemble."""
    import train_ensemble as te
    entry = te.ARCHS[arch]

    def build(width, x):
        spec = dict(arch=arch, in_channels=3, image_size=image_size, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3,
                    **{**entry.tiny, **{k: v for k, v in entry.settings.items() if v is not te.REQUIRED}})
        if 'width' in entry.settings:
            spec['width'] = width
        if 'hidden' in entry.settings:
            spec['hidden'] = [max(1, round(h * width)) for h in hidden]
        return te.init_member(spec, seed, x_train=x)
    return build


def checked_archs():
    """train_ensemble's architectures the checks can take: those whose weights read as matrices."""
    import train_ensemble as te
    return [name for name, entry in te.ARCHS.items() if not entry.not_matrices]


def make_app():
    """The typer application, built on demand so that importing this file needs only torch."""
    import typer
    from rich.console import Console

    app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                      context_settings=dict(help_option_names=['-h', '--help']),
                      help='Spectral norms, the spectral parametrization, and coordinate checks.')
    console = Console()

    def print_version(asked):
        if asked:
            import train_ensemble as te
            print(te.version_line('spectral.py'))
            raise typer.Exit()

    @app.callback()
    def options(version: bool = typer.Option(False, '--version', is_eager=True, callback=print_version,
                                             help='Print the versions (checkpoint format, torch) and exit.')):
        pass
    for add_command in (_add_report, _add_coord_check, _add_lr_sweep):
        add_command(app, typer, console)
    return app


def _write_json(console, path, obj):
    import train_ensemble as te
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    te.write_json(path, obj)   # atomic
    console.print(f'wrote {path}')


def _with_progress(console, description, total, work):
    from rich.progress import Progress
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        return work(lambda: bar.advance(task))


def _check_options(arch, optimizer, widths, hidden):
    """The parsed widths and hidden sizes; a one-line error (train_ensemble.cli_error) for bad options."""
    import train_ensemble as te
    if arch not in checked_archs():
        te.cli_error(f"unknown --arch '{arch}': use {', '.join(checked_archs())}")
    if optimizer not in ('sgd', 'adam'):
        te.cli_error(f"unknown --optimizer '{optimizer}': use sgd or adam")
    try:
        return numbers(widths), numbers(hidden, int)
    except ValueError:
        te.cli_error('--widths and --hidden take comma-separated numbers, e.g. 0.25,0.5,1 and 256,256')


def _shared_options(typer):
    """The options coord-check and lr-sweep share."""
    return dict(
        arch=typer.Option('mlp', '--arch', help=f"train_ensemble's network: {', '.join(checked_archs())}."),
        hidden=typer.Option(COORD['hidden'], '--hidden', help='mlp hidden sizes at width 1, comma-separated'),
        optimizer=typer.Option('sgd', '--optimizer', help='sgd or adam'),
        batch=typer.Option(COORD['batch_size'], '--batch-size', help='examples per step'),
        image=typer.Option(None, '--image-size', help='side of the synthetic images (default: mlp 4, resnet18 8, '
                                                      'airbench 16)'),
        seed=typer.Option(0, '--seed', help='seed of the data and of every network'),
        json=typer.Option(None, '--json', help='write the numbers to this JSON file'),
    )


def _add_report(app, typer, console):
    import train_ensemble as te
    from rich.table import Table

    @app.command()
    def report(model: Path = typer.Argument(..., help='a member_<i>.safetensors checkpoint'),
               sigma: float = typer.Option(1.0, help='σ in the target σ·√(fan_out/fan_in)'),
               json_path: Path = typer.Option(None, '--json', help='write the numbers to this JSON file')):
        """Spectral norm of every weight against its spectral target √(fan_out/fan_in)."""
        try:
            net = te.load_member(model)
        except te.EnsembleError as e:
            te.cli_error(str(e))
        params = dict(net.named_parameters())
        rows = []
        for name, fan_in, fan_out, kind in layer_fans(net):
            w = params[name]
            norm, target = spectral_norm(w).item(), spectral_target(fan_in, fan_out, sigma)
            rows.append(dict(name=name, kind=kind, trainable=w.requires_grad, shape=list(w.shape), fan_in=fan_in,
                             fan_out=fan_out, spectral_norm=norm, target=target, ratio=norm / target))
        from rich import box
        frozen = not all(r['trainable'] for r in rows)   # the footnote only where a row carries its mark
        table = Table(title=f'spectral norms of {model}', box=box.SIMPLE_HEAD, pad_edge=False,
                      caption='kind*: frozen (not trained, not rescaled)' if frozen else None)
        for col in ('layer', 'kind', 'shape', 'fan_in', 'fan_out', '‖W‖_*', 'target', 'ratio'):
            table.add_column(col, justify='left' if col in ('layer', 'kind') else 'right', no_wrap=True)
        for r in rows:
            table.add_row(r['name'].removesuffix('.weight'), r['kind'] + ('' if r['trainable'] else '*'),
                          '×'.join(map(str, r['shape'])), str(r['fan_in']), str(r['fan_out']),
                          f"{r['spectral_norm']:.4g}", f"{r['target']:.4g}", f"{r['ratio']:.3f}")
        console.print(table)
        if json_path:
            _write_json(console, json_path, dict(model=str(model), sigma=sigma, layers=rows))


def _add_coord_check(app, typer, console):
    from rich.table import Table
    shared = _shared_options(typer)

    @app.command('coord-check')
    def coord_check_command(
            arch: str = shared['arch'], hidden: str = shared['hidden'], optimizer: str = shared['optimizer'],
            batch_size: int = shared['batch'], image_size: int = shared['image'], seed: int = shared['seed'],
            widths: str = typer.Option(COORD['widths'], help='comma-separated width multipliers'),
            steps: int = typer.Option(COORD['steps'], help='training steps before measuring'),
            lr: float = typer.Option(COORD['lr'], help="base learning rate (the reference layer's under spectral)"),
            plot: Path = typer.Option(None, help='write the activation-vs-width PNG here'),
            json_path: Path = shared['json']):
        """Mean |activation| of every layer after a few steps, against width: flat under spectral."""
        ws, hs = _check_options(arch, optimizer, widths, hidden)
        image_size = image_size or IMAGE_SIZE.get(arch, IMAGE_SIZE['airbench'])
        build = train_ensemble_network(arch, hs, image_size, seed)
        result = _with_progress(console, 'coord-check', 2 * len(ws), lambda tick: coord_check(
            build, ws, steps, lr, optimizer, batch_size, image_size=image_size, seed=seed, progress=tick))
        result.update(arch=arch, hidden=hs)
        table = Table(title=f'mean |activation| after {steps} {optimizer} steps at lr {lr:g} ({arch})')
        for col in ['layer'] + [f'×{w:g}' for w in ws] + ['drift']:
            table.add_column(col, justify='left' if col == 'layer' else 'right', no_wrap=col == 'layer')
        series = {}
        for p in PARAMETRIZATIONS:
            series[p] = [(f"{layer} ({result['kinds'][layer]})", v) for layer, v in result[p].items()]
            for label, v in series[p]:
                table.add_row(f'{p} {label}', *[f'{x:.3g}' for x in v], f'{max(v) / max(min(v), 1e-12):.2f}x')
        console.print(table)
        console.print('worst drift across widths: ' + ', '.join(f'{p} {d:.2f}x' for p, d in result['drift'].items()))
        if plot:
            plot_panels(plot, ws, series, 'width multiplier', 'mean |activation|',
                        f'coordinate check: {arch}, {steps} {optimizer} steps at lr {lr:g}')
            console.print(f'wrote {plot}')
        if json_path:
            _write_json(console, json_path, result)


def _add_lr_sweep(app, typer, console):
    import train_ensemble as te
    from rich.table import Table
    shared = _shared_options(typer)

    @app.command('lr-sweep')
    def lr_sweep_command(
            arch: str = shared['arch'], hidden: str = shared['hidden'], optimizer: str = shared['optimizer'],
            batch_size: int = shared['batch'], image_size: int = shared['image'], seed: int = shared['seed'],
            widths: str = typer.Option(SWEEP['widths'], help='comma-separated width multipliers'),
            lrs: str = typer.Option(SWEEP['lrs'], help='comma-separated base learning rates'),
            steps: int = typer.Option(SWEEP['steps'], help='training steps per run'),
            plot: Path = typer.Option(None, help='write the loss-vs-lr PNG here'),
            json_path: Path = shared['json']):
        """Training loss against learning rate at several widths: the best lr stays put under spectral."""
        ws, hs = _check_options(arch, optimizer, widths, hidden)
        try:
            rates = numbers(lrs)
        except ValueError:
            te.cli_error('--lrs takes comma-separated numbers, e.g. 0.1,0.2,0.4')
        image_size = image_size or IMAGE_SIZE.get(arch, IMAGE_SIZE['airbench'])
        build = train_ensemble_network(arch, hs, image_size, seed)
        result = _with_progress(console, 'lr-sweep', 2 * len(ws) * len(rates), lambda tick: lr_sweep(
            build, ws, rates, steps, optimizer, batch_size, image_size=image_size, seed=seed, progress=tick))
        result.update(arch=arch, hidden=hs)
        table = Table(title=f'training loss after {steps} {optimizer} steps ({arch}); - = diverged')
        table.add_column('base lr', justify='right')
        for p in PARAMETRIZATIONS:
            for w in ws:
                table.add_column(f'{p} ×{w:g}', justify='right')
        columns = [row for p in PARAMETRIZATIONS for row in result[p]['loss']]
        for i, r in enumerate(rates):
            table.add_row(f'{r:g}', *['-' if col[i] is None else f'{col[i]:.3f}' for col in columns])
        table.add_row('best lr', *[f'{b:g}' for p in PARAMETRIZATIONS for b in result[p]['best_lr']], style='bold')
        series = {p: [(f'width ×{w:g}', row) for w, row in zip(ws, result[p]['loss'])] for p in PARAMETRIZATIONS}
        console.print(table)
        if plot:
            plot_panels(plot, rates, series, 'base learning rate', 'training loss',
                        f'learning-rate transfer: {arch}, {steps} {optimizer} steps', y_log=False)
            console.print(f'wrote {plot}')
        if json_path:
            _write_json(console, json_path, result)


def main():
    """The command line; copied alone (no train_ensemble.py beside it, or no typer or rich), one line
    saying what it needs instead of a traceback. The Python API needs neither."""
    try:
        import train_ensemble  # noqa: F401 - the checks build its networks and report errors its way
        app = make_app()
    except ImportError as e:
        need = ('train_ensemble.py beside it' if e.name == 'train_ensemble'
                else f'the package {e.name} (pip install {e.name})')
        sys.stderr.write(f"error: spectral.py's command line needs {need}; its Python API needs only torch\n")
        raise SystemExit(2) from None
    app()


if __name__ == '__main__':
    main()
