"""rebasin.py: git re-basin for PyTorch networks: permutation specs, weight matching, MergeMany and
BatchNorm repair after averaging.

    python rebasin.py spec runs/a/member_0.safetensors   # which permutation acts where
    python rebasin.py align runs/a runs/b                  # B's members, moved into A's basin: aligned/b_aligned
    python rebasin.py merge runs/*                         # every finished run in one model: merges/<name>_merge<N>
    python rebasin.py merge A B --stats none               # the plain average: no REPAIR, no BatchNorm reset
    python rebasin.py merge A B --method zip               # ZipIt: features merged within and across models
    python rebasin.py merge A B --method zip --partial 2   # zip the first 2 groups; the rest stay branches
    python rebasin.py merge runs/* --method ste            # permutations learned for the merged model's loss

Outputs go to aligned/ and merges/, outside a glob over runs/; merge skips (and names) what is not a
finished training run, restores the merged model's statistics where the training data can be loaded
(REPAIR without BatchNorm, a BatchNorm reset with it: --stats), and prints the result's test accuracy
beside its sources'.

Renaming the hidden channels of a network (permuting a layer's outputs and the matching inputs of every
layer that reads them) gives the same function with different weights. Weight matching (Ainsworth,
Hayase, Srinivasa 2022, arXiv 2209.04836) picks the renaming of B that brings its weights closest to
A's, so the two can be interpolated or averaged; MergeMany does it for N models at once. Averaged
weights shrink activation variance, which resetting BatchNorm statistics or REPAIR (Jordan et al.
2022, arXiv 2211.08403) undoes. Beyond permutations of weights: learned matching (--method ste) trains the
permutations for the loss of the merged model itself, and zipping (--method zip, ZipIt, Stoica et al. 2023)
merges features within and across models, fully or (--partial K) up to a layer, the rest kept as branches.

The core functions take and return dicts of tensors and need only torch and scipy: copy this file into
another project. Only the command line at the bottom imports train_ensemble. The ways of matching channels
are entries of MERGE_METHODS (align_pair and merge_models call them by name). Measured figures: README.md.
"""

#############################################
#                 Settings                  #
#############################################

import copy
import importlib
import itertools
import json
import math
import operator
import os
import random
import re
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

MAX_SWEEPS = 100    # weight matching stops after this many sweeps over all permutations (it needs ~3-10)
MAX_PASSES = 100    # MergeMany stops after this many passes over all models (it needs ~3-6)
TOL = 1e-9          # a step must gain more than this fraction of the cost scale to count: ties are no progress
PASS_TOL = 1e-4     # a MergeMany pass must shrink the distance by this fraction (later passes shuffle few channels)
PRICE_ROUNDS = 100  # Bellman-Ford rounds for an assignment's warm-start prices (from warm prices: ~5)
BN_EXAMPLES = 5000  # training images for recomputing BatchNorm statistics (and REPAIR's channel statistics)
BN_BATCH = 500      # batch size of those passes; statistics are a plain average over the batches


class RebasinError(ValueError):
    """A user-facing error (mismatched models, bad weights): the command line prints it on one line."""


#############################################
#             Permutation spec              #
#############################################
# The forward pass is traced with torch.fx and every tensor's channel axis (axis 1) gets a channel group.
# Conv/Linear start a new group; anything that treats channels separately (activations, pooling,
# BatchNorm, flatten) passes its input's group on; an elementwise op joins its operands' groups, so a
# residual stream shares one permutation. A group that reaches the network's input or output, or any
# operation not known to commute with a channel permutation, is fixed: never permuted.

@dataclass
class PermutationSpec:
    perms: dict        # permutation name -> number of channels it reorders, in the order the network computes them
    axes: dict         # tensor key -> for each axis, the name of the permutation acting on it, or None
    unpermuted: dict   # tensor key -> why (some of) its channel axes are left alone
    buffers: list = field(default_factory=list)  # buffer keys (BatchNorm statistics): permuted, never matched
    # permutation -> the permutation of the blocks it reorders within (attention heads' dimensions): a
    # different reordering for each block. Its index is a (blocks, size) tensor; see Permutation.
    within: dict = field(default_factory=dict)


LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)
_POOL = nn.modules.pooling
PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.Identity, nn.Upsample,
    nn.modules.dropout._DropoutNd, _POOL._MaxPoolNd, _POOL._AvgPoolNd, _POOL._AdaptiveAvgPoolNd,
    _POOL._AdaptiveMaxPoolNd)
PER_CHANNEL_OPS = {  # functions and method names that act on each channel separately
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.mish, F.leaky_relu, F.elu, F.selu, F.softplus, F.hardswish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.abs, operator.neg, torch.clamp, F.dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate,
    F.softmax, F.log_softmax, 'relu', 'relu_', 'sigmoid', 'tanh', 'exp', 'abs', 'neg', 'clamp', 'contiguous',
    'clone', 'detach', 'float', 'double', 'half', 'to', 'softmax', 'log_softmax'}
ELEMENTWISE_OPS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
    'add', 'add_', 'sub', 'sub_', 'mul', 'mul_', 'div', 'div_', 'pow', 'maximum', 'minimum'}
RESHAPE_OPS = {torch.flatten, 'flatten', 'view', 'reshape'}
REDUCE_OPS = {torch.mean, torch.sum, torch.amax, 'mean', 'sum', 'amax', 'amin'}
SHAPE_QUERIES = {'size', 'dim', 'numel', getattr, len}


class _Tracer(fx.Tracer):
    # Subclasses of the built-in layers (this project's Conv, Linear, BatchNorm) must stay single nodes.
    def is_leaf_module(self, m, qualified_name):
        return isinstance(m, LAYERS) or super().is_leaf_module(m, qualified_name)


class _Groups:
    """Union-find over channel groups. A union with a fixed group is fixed (the first reason is kept)."""

    def __init__(self):
        self.parent, self.size, self.name, self.fixed = [], [], [], []

    def new(self, size, name, fixed=None):
        self.parent.append(len(self.parent))
        self.size.append(size), self.name.append(name), self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, g):
        while self.parent[g] != g:
            g = self.parent[g]
        return g

    def union(self, g, h):
        g, h = sorted((self.find(g), self.find(h)))   # the older group names the union
        if g != h:
            if self.size[g] != self.size[h]:
                self.fix(g, f'joins groups of {self.size[g]} and {self.size[h]} channels')
            self.parent[h] = g
            self.fixed[g] = self.fixed[g] or self.fixed[h]
        return g

    def fix(self, g, reason):
        g = self.find(g)
        self.fixed[g] = self.fixed[g] or reason


def _shape(node):
    meta = node.meta.get('tensor_meta')
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


@contextmanager
def _eval_mode(model):
    """Eval mode for the duration, then every submodule's own mode back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def _merges_channels(s_in, s_out):
    """A view that keeps the batch axis and merges the channel axis with the axes after it (a flatten)."""
    return len(s_out) >= 2 and s_in[0] == s_out[0] and any(
        math.prod(s_in[1:k]) == s_out[1] and s_in[k:] == s_out[2:] for k in range(2, len(s_in) + 1))


def permutation_spec(model, example_input):
    """Which permutation acts on which axis of which tensor of `model` (an nn.Module), found by tracing it
    on `example_input` (a batch of inputs; one is enough). The model runs once in eval mode, unchanged.
    A model with a permutation_table() method names its permutations itself ((table, buffers, within) as
    spec_from_table takes them): attention, whose heads and head dimensions tracing cannot see."""
    if hasattr(model, 'permutation_table'):
        table, buffers, within = model.permutation_table()
        return spec_from_table(table, model.state_dict(), buffers, within)
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types for data-dependent control flow
        raise RebasinError(f'torch.fx cannot trace {type(model).__name__}: {e}') from e
    with _eval_mode(model), torch.no_grad():   # one forward pass records every node's output shape
        ShapeProp(fx.GraphModule(model, graph)).propagate(example_input)
    builder = _SpecBuilder(model)
    for node in graph.nodes:
        builder.visit(node)
    return builder.spec()


class _SpecBuilder:
    """Walks the traced graph once, in order: gives every node's output its channel group, ties each
    tensor axis to the group it runs along, and fixes what must not move (with the reason)."""

    def __init__(self, model):
        self.model, self.state, self.modules = model, model.state_dict(), dict(model.named_modules())
        self.groups = _Groups()
        self.group, self.slots, self.notes = {}, {}, {}   # node -> group; (key, axis) -> group; key -> why left alone

    def tie(self, key, axis, g):
        if key in self.state:
            self.slots[key, axis] = self.groups.union(self.slots[key, axis], g) if (key, axis) in self.slots else g

    def opaque(self, node, what):
        """Not known to commute with permutations: fix what goes in and comes out."""
        for arg in node.all_input_nodes:
            if self.group.get(arg) is not None:
                self.groups.fix(self.group[arg], f'read by {what}')
            if arg.op == 'get_attr':
                self.notes.setdefault(arg.target, f'used directly by {what}')
        if node.op == 'call_module':
            for name in self.modules[node.target].state_dict():
                self.notes.setdefault(f'{node.target}.{name}', f'inside {what}')
        shape = _shape(node)
        self.group[node] = self.groups.new(shape[1], node.name, f'made by {what}') if shape and len(shape) > 1 else None

    def visit(self, node):
        shape = _shape(node)
        target = self.modules[node.target] if node.op == 'call_module' else node.target
        what = (f'{node.target} ({type(target).__name__})' if node.op == 'call_module' else
                f'.{target}()' if node.op == 'call_method' else getattr(target, '__name__', str(target)))
        inputs = [a for a in node.all_input_nodes if _shape(a) is not None]   # tensors, not sizes
        x, s_in = (self.group.get(inputs[0]), _shape(inputs[0])) if inputs else (None, None)
        function = node.op != 'call_module'
        if node.op == 'placeholder':
            self.group[node] = self.groups.new(shape[1], 'input', 'network input') if shape and len(shape) > 1 else None
        elif node.op == 'output':
            for arg in node.all_input_nodes:
                if self.group.get(arg) is not None:
                    self.groups.fix(self.group[arg], 'network output')
        elif node.op == 'get_attr':
            self.group[node] = None
        elif shape is None or len(shape) < 2:
            if target not in SHAPE_QUERIES:
                self.opaque(node, what)
        elif function and target in ELEMENTWISE_OPS:
            self.elementwise(node, shape, what)
        elif x is None or len(inputs) > 1:
            self.opaque(node, what)
        elif isinstance(target, LAYERS):
            self.layer(node, target, x, s_in)
        elif isinstance(target, PER_CHANNEL_MODULES) or (function and target in PER_CHANNEL_OPS):
            self.group[node] = x
        elif (isinstance(target, nn.Flatten) or (function and target in RESHAPE_OPS)) and _merges_channels(s_in, shape):
            self.group[node] = x   # a flattened channel is a block of positions: Linear weights move in blocks
        elif function and target in REDUCE_OPS and _reduces_positions(node, len(s_in)):
            self.group[node] = x
        else:
            self.opaque(node, what)

    def layer(self, node, m, x, s_in):
        key = lambda name: f'{node.target}.{name}'  # noqa: E731
        if isinstance(m, nn.modules.conv._ConvNd):
            out_axis, in_axis = (1, 0) if m.transposed else (0, 1)
            if m.groups == 1:
                y = self.groups.new(m.out_channels, node.target)
                self.tie(key('weight'), out_axis, y)
                self.tie(key('weight'), in_axis, x)
            elif m.groups == m.in_channels == m.out_channels:   # depthwise: channel c reads channel c only
                y = x
                self.tie(key('weight'), 0, y)
            else:
                return self.opaque(node, f'{node.target} (convolution with groups={m.groups})')
            self.tie(key('bias'), 0, y)
        elif isinstance(m, nn.Linear):
            if len(s_in) != 2:
                return self.opaque(node, f'{node.target} (Linear on a {len(s_in)}-d input)')
            y = self.groups.new(m.out_features, node.target)
            self.tie(key('weight'), 0, y)
            self.tie(key('weight'), 1, x)
            self.tie(key('bias'), 0, y)
        elif isinstance(m, nn.GroupNorm) and m.num_groups not in (1, m.num_channels):
            return self.opaque(node, f'{node.target} (GroupNorm normalizes fixed groups of channels)')
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) < len(s_in) - 1:
            y = x   # normalizes each channel on its own; its weights run along the other axes
            for name in m.state_dict():
                self.notes[key(name)] = 'LayerNorm over trailing axes: no channel axis to permute'
        else:       # BatchNorm, InstanceNorm, GroupNorm over 1 or C groups, LayerNorm over channels, PReLU
            y = x
            for name in ('weight', 'bias', 'running_mean', 'running_var'):
                if getattr(m, name, None) is not None and getattr(m, name).numel() > 1:
                    self.tie(key(name), 0, y)
                elif getattr(m, name, None) is not None:
                    self.notes[key(name)] = 'one value shared by every channel'
        self.group[node] = y

    def elementwise(self, node, shape, what):
        joined, constants = None, []
        for arg in node.all_input_nodes:
            s = _shape(arg)
            axis = 1 - (len(shape) - len(s)) if s is not None else -1   # arg's axis that lines up with channels
            if axis < 0 or s[axis] == 1:
                if arg.op == 'get_attr':
                    self.notes.setdefault(arg.target, f'operand of {what}, the same for every channel')
                continue
            if arg.op == 'get_attr':
                constants.append((arg.target, axis))
            elif len(s) != len(shape) or self.group.get(arg) is None:
                return self.opaque(node, f'{what} (broadcasting between tensors of different rank)')
            else:
                joined = self.group[arg] if joined is None else self.groups.union(joined, self.group[arg])
        joined = self.groups.new(shape[1], node.name) if joined is None else joined
        for key, axis in constants:
            if key in self.state:
                self.tie(key, axis, joined)
            else:
                self.groups.fix(joined, f'{what} with {key}, which is not in the state dict')
        self.group[node] = joined

    def spec(self):
        """The PermutationSpec: a named permutation per free group of more than one channel."""
        groups, names, perms, axes, unpermuted = self.groups, {}, {}, {}, {}
        for root in sorted({groups.find(g) for g in self.slots.values()}):   # in the order the network makes them
            if not groups.fixed[root] and groups.size[root] > 1:
                name = f'P_{groups.name[root]}'
                names[root] = name if name not in perms else f'{name}#{root}'
                perms[names[root]] = groups.size[root]
        for key, t in self.state.items():
            per_axis, why = [], []
            for axis in range(t.dim()):
                root = groups.find(self.slots[key, axis]) if (key, axis) in self.slots else None
                per_axis.append(names.get(root))
                if root is not None and groups.fixed[root] and groups.size[root] > 1:
                    why.append(f'axis {axis}: {groups.fixed[root]}')
            if t.dim() and not any((key, axis) in self.slots for axis in range(t.dim())):
                why = [self.notes.get(key, 'not read by any layer the tracer understands')]
            axes[key] = tuple(per_axis)
            if why:
                unpermuted[key] = '; '.join(why)
        buffers = [k for k, _ in self.model.named_buffers() if k in self.state]
        return PermutationSpec(perms, axes, unpermuted, buffers)


def spec_from_table(table, params, buffers=(), within=None):
    """A PermutationSpec written by hand, for a model tracing cannot handle, the way the reference
    implementation writes its specs: table maps a tensor's key to the permutation acting on each of its
    axes (a name, or None), e.g. {'fc1.weight': ('P1', None), 'fc1.bias': ('P1',), 'fc2.weight': (None, 'P1')}.
    Tensors of `params` not in the table are left unpermuted; each permutation's size is read from the
    tensors and must agree on every axis it names. buffers: keys permuted but never matched (BatchNorm
    statistics). within: {permutation: the permutation of blocks it acts within}, for a reordering that may
    differ from block to block (the dimensions of each attention head, given the heads' own permutation);
    every tensor it acts on has its blocks on another axis. `rebasin.py spec --json` writes a traced spec's
    table to start from."""
    perms, axes, unpermuted = {}, {}, {}
    for key, names in table.items():
        if key not in params:
            raise RebasinError(f"the spec names tensor '{key}', which the model does not have")
        names = tuple(names)
        if len(names) != params[key].dim():
            raise RebasinError(f"the spec gives {len(names)} axes for '{key}', which has {params[key].dim()}")
        for axis, name in enumerate(names):
            if name is None:
                continue
            n = params[key].shape[axis]
            if perms.setdefault(name, n) != n:
                raise RebasinError(f"permutation '{name}' is {perms[name]} channels, but '{key}' axis {axis} has {n}")
        axes[key] = names
    within = dict(within or {})
    for inner, blocks in within.items():
        if inner not in perms or blocks not in perms or blocks in within:
            raise RebasinError(f"within: '{inner}' must act within the blocks of another permutation of the "
                               f"table, not '{blocks}'")
        for key, names in axes.items():
            if inner in names and (blocks not in names or names.count(inner) > 1):
                raise RebasinError(f"'{key}' has permutation '{inner}' without its blocks '{blocks}' on another axis")
    for key, t in params.items():
        if key not in axes:
            axes[key], unpermuted[key] = (None,) * t.dim(), 'not in the hand-written spec'
    return PermutationSpec(perms, axes, unpermuted, [k for k in buffers if k in params], within)


def _reduces_positions(node, ndim):
    """A mean/sum/max over axes that are neither the batch nor the channel axis (global pooling)."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim')
    dims = (dims,) if isinstance(dims, int) else dims
    return isinstance(dims, (tuple, list)) and all(isinstance(d, int) and d % ndim > 1 for d in dims)


#############################################
#          Applying a permutation           #
#############################################
# A permutation is a dict {name: index}: channel i of the permuted model is channel index[i] of the
# original. Applying it reorders every axis the spec names, so the new tensors compute the same function.

class Permutation(dict):
    """{permutation name: LongTensor index}: channel i of the permuted model is channel index[i] of the
    original. A permutation within blocks (spec.within) has a (blocks, size) index: after the blocks are
    reordered, row h reorders the channels of the block now at position h. `objective` is weight
    matching's Σ⟨A, π(B)⟩ at the start and after each sweep (empty when the permutation did not come
    from weight matching); `prices` are the column prices of weight matching's last assignments, which
    warm-start a later weight_matching(init=it)."""

    def __init__(self, perm, objective=(), prices=None):
        super().__init__(perm)
        self.objective = list(objective)
        self.prices = dict(prices or {})


def identity_permutation(spec):
    return Permutation({p: torch.arange(n).repeat(spec.perms[spec.within[p]], 1) if p in spec.within
                        else torch.arange(n) for p, n in spec.perms.items()})


def random_permutation(spec, seed=0, generator=None):
    """A uniformly random Permutation for every permutation of the spec, from `generator` (else a new one
    seeded with `seed`): plant it with apply_permutation to test a matching method on a known answer."""
    g = generator or torch.Generator().manual_seed(seed)
    return Permutation({p: torch.stack([torch.randperm(n, generator=g) for _ in range(spec.perms[spec.within[p]])])
                        if p in spec.within else torch.randperm(n, generator=g) for p, n in spec.perms.items()})


def _channels(spec):
    """How many channels the spec's permutations reorder (a permutation within blocks: in every block)."""
    return sum(q.numel() for q in identity_permutation(spec).values())


def _channels_moved(spec, perm):
    identity = identity_permutation(spec)
    return sum(int((q != identity[p]).sum()) for p, q in perm.items())


def compose(spec, first, then):
    """The permutation that applies `first`, then `then`: compose(spec, planted, found) is the identity
    when weight matching of A and B = planted(A) found the planted permutation."""
    return {p: first[p][then[spec.within[p]]].gather(1, then[p]) if p in spec.within else q[then[p]]
            for p, q in first.items()}


def inverse(spec, perm):
    """The permutation that undoes `perm`: compose(spec, perm, inverse(spec, perm)) is the identity."""
    out = {p: torch.argsort(q) for p, q in perm.items() if p not in spec.within}
    out.update({p: torch.argsort(perm[p][out[spec.within[p]]], dim=1) for p in perm if p in spec.within})
    return out


def _take(t, axis, index):
    """t reordered along `axis`. A flattened axis holds n channels of k positions each and moves in blocks."""
    k = t.shape[axis] // len(index)
    index = index.to(t.device)
    if k > 1:
        index = (index[:, None] * k + torch.arange(k, device=t.device)).flatten()
    return t.index_select(axis, index)


def _permute(spec, perm, key, t, skip=()):
    """t (the tensor `key`, or a tensor of its shape) with every axis the spec names permuted by `perm`,
    except the axes in `skip`. A permutation within blocks goes after its blocks' own: block by block."""
    names = spec.axes[key]
    for axis, name in enumerate(names):
        if name is not None and axis not in skip and name not in spec.within:
            t = _take(t, axis, perm[name])
    for axis, name in enumerate(names):
        if name in spec.within and axis not in skip:
            blocks = names.index(spec.within[name])
            index = perm[name].to(t.device)               # (blocks, size)
            shape = [1] * t.dim()
            shape[blocks], shape[axis] = index.shape
            index = (index if blocks < axis else index.T).reshape(shape)
            t = t.gather(axis, index.expand(t.shape))
    return t


def apply_permutation(spec, perm, params):
    """New tensors: every tensor of `params` (parameters and buffers) with its axes permuted by `perm`."""
    out = {}
    for key, t in params.items():
        if key not in spec.axes:
            raise RebasinError(f"tensor '{key}' is not in the permutation spec (a different architecture?)")
        permuted = _permute(spec, perm, key, t)
        out[key] = permuted if permuted is not t else t.clone()
    return out


def check_compatible(spec, params_list, names=None):
    """Raise RebasinError naming the first tensor in which a model differs from the first one (or from the
    spec), or the first tensor with non-finite values."""
    names = names or [f'model {i + 1}' for i in range(len(params_list))]
    first = params_list[0]
    unknown = next((k for k in first if k not in spec.axes), None)
    if unknown is not None:
        raise RebasinError(f"{names[0]}: tensor '{unknown}' is not in the permutation spec (a different architecture?)")
    for name, params in zip(names, params_list):
        for key, t in first.items():
            if key not in params:
                raise RebasinError(f"{name} does not match {names[0]}: it has no tensor '{key}'")
            if params[key].shape != t.shape:
                raise RebasinError(f"{name} does not match {names[0]}: tensor '{key}' has shape "
                                   f"{list(params[key].shape)}, not {list(t.shape)}")
        extra = next((k for k in params if k not in first), None)
        if extra is not None:
            raise RebasinError(f"{name} does not match {names[0]}: it has an extra tensor '{extra}'")
        bad = next((k for k, t in params.items() if t.is_floating_point() and not math.isfinite(t.sum())), None)
        if bad is not None:
            raise RebasinError(f"{name}: tensor '{bad}' has non-finite values (NaN or inf)")


#############################################
#              Weight matching              #
#############################################
# Permutation coordinate descent: with every other permutation held fixed, Σ⟨A, π(B)⟩ is linear in one
# permutation P, so the best P is a linear assignment on the cost A_rows · B_rows^T, where the rows of a
# matrix gather everything of one channel across all tensors P touches. Sweep until nothing improves.

def _device(device):
    return torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))


def _matched_keys(spec, params):
    """Parameters some permutation touches. BatchNorm statistics are permuted but not matched: they
    describe the data, not the function's weights, and their scale would swamp the cost."""
    buffers = set(spec.buffers)
    return [k for k, t in params.items() if t.is_floating_point() and k not in buffers and any(spec.axes[k])]


def _rows(t, axis, n):
    return t.movedim(axis, 0).reshape(n, -1)   # row i: everything of channel i (its block, if flattened)


def _column_map(spec, perm, key, axis, shape):
    """Column c of _rows(π(tensor), axis), its other axes permuted by `perm`, is column map[c] of
    _rows(tensor, axis): the same reordering applied to the column indices."""
    block = shape[axis] // len(perm[spec.axes[key][axis]])   # a row holds a block of positions, if flattened
    index = torch.arange(math.prod(shape) // shape[axis] * block, device=perm[spec.axes[key][axis]].device)
    index = index.view([block] + [s for ax, s in enumerate(shape) if ax != axis]).movedim(0, axis)
    return _permute(spec, perm, key, index, skip=(axis,)).movedim(axis, 0).flatten()


def _inner(a, b):
    return sum(float((a[k] * b[k]).sum(dtype=torch.float64)) for k in a)


def _assign(cost, prices=None):
    """(cols, prices): the assignment row i -> cols[i] maximizing Σ cost[i, cols[i]] (scipy's solver), and
    column prices for warm-starting the next solve of a nearby cost matrix. Subtracting a price from every
    entry of a column changes every assignment's total by the same amount, so the answer never depends on
    the prices; but with the prices that certify a nearby problem's solution most rows find their column
    at once (a 512 x 512 matrix of trained MLPs: 2-4 ms instead of 15)."""
    c = cost.cpu().numpy()
    _, cols = linear_sum_assignment(-c if prices is None else prices - c)   # minimizes: one copy, not two
    return cols, _prices(c, cols, prices)


def _prices(c, cols, start=None, rounds=PRICE_ROUNDS):
    """Column prices v certifying that cols is an optimal assignment of c (u_i + v_j >= c_ij, with equality
    on the assignment, for u_i = c_i,cols[i] - v_cols[i]): the least solution above `start` of the
    difference constraints v_j >= v_cols[i] + c_ij - c_i,cols[i], by Bellman-Ford rounds (each over the rows
    whose column's price rose in the last), which converge because an optimal assignment has no improving
    cycle. Only speed depends on the prices, so the rounds are capped."""
    v = np.zeros(len(cols)) if start is None else start.copy()
    own = c[np.arange(len(cols)), cols]   # each row's entry in its own column
    row_of, active = np.argsort(cols), slice(None)
    tol = 1e-12 * max(c.max(), -c.min())
    for _ in range(rounds):
        best = (c[active] - (own - v[cols])[active, None]).max(0)
        raised = best > v + tol
        if not raised.any():
            break
        v[raised] = best[raised]
        active = row_of[raised]
    return v


class _CoordinateDescent:
    """One weight matching's state: B's current permutation, and what makes a step cheap. Each permutation's
    cost matrix is kept and updated by the columns that moved; its column prices warm-start the next
    assignment; and a permutation none of whose neighbours changed since it was last solved is skipped.
    Products in float32, summed in float64 (the cost matrices, the objective): twice as fast as float64
    products with the same permutations (the MLP pair of the README), and no float64 copies of a large
    network (a ViT-B/16-sized pair: 5.3 GiB peak with them)."""

    def __init__(self, spec, params_a, params_b, device, prices):
        self.spec, self.device = spec, device
        keys = _matched_keys(spec, params_a)
        self.a = {k: params_a[k].to(device, torch.float32) for k in keys}
        self.b32 = {k: params_b[k].to(device, torch.float32) for k in keys}
        touched = {p: [(k, axis) for k in keys for axis, q in enumerate(spec.axes[k]) if q == p] for p in spec.perms}
        # A permutation within blocks is solved together with its blocks' permutation (solve_blocks), never alone.
        inner = {p: [c for c, blocks in spec.within.items() if blocks == p] for p in spec.perms}
        self.touched, self.inner, self.plain = touched, inner, [p for p in spec.perms if p not in spec.within]
        self.a_rows = {(k, axis): _rows(self.a[k], axis, spec.perms[p]) for p in self.plain for k, axis in touched[p]}
        self.perm = {p: q.to(device) for p, q in identity_permutation(spec).items()}
        # p's cost matrix depends only on the permutations of the other axes of the tensors p touches (its
        # neighbours): while none of them has changed since p was last solved, solving p again gives p again.
        self.neighbours = {p: {q for k, axis in touched[p] for ax, q in enumerate(spec.axes[k])
                               if ax != axis and q is not None and q not in inner[p]} for p in spec.perms}
        self.changes = dict.fromkeys(spec.perms, 0)   # how often each permutation has changed
        self.solved_at = {}                           # p -> its neighbours' change counts when p was last solved
        self.prices = prices                          # p -> the column prices of its last solve (a warm start)
        self.b_rows = {(k, axis): _rows(self.b32[k], axis, spec.perms[p]) for p in self.plain
                       for k, axis in touched[p]}
        self.costs, self.used = {}, {}   # p -> its last full cost matrix; (tensor, axis) -> its column map then

    def objective(self):
        return _inner(self.a, apply_permutation(self.spec, self.perm, self.b32))

    def cost_of(self, p, entries):
        """p's cost matrix from entries, or (None) from every tensor p touches: then kept, and updated by
        the next call from the columns that moved since."""
        n, update = self.spec.perms[p], entries is None and p in self.costs
        cost = self.costs[p] if update else torch.zeros(n, n, dtype=torch.float64, device=self.device)
        a_rows, b_rows, used = self.a_rows, self.b_rows, self.used
        for k, axis in self.touched[p] if entries is None else entries:
            cols = _column_map(self.spec, self.perm, k, axis, self.b32[k].shape)
            if update:
                # Only the columns that moved since the last solve change the cost: the neighbours' late
                # changes are a few units, so a thin product updates it (exact up to rounding).
                moved = (cols != used[k, axis]).nonzero().flatten()
                if len(moved):
                    old, new = b_rows[k, axis][:, used[k, axis][moved]], b_rows[k, axis][:, cols[moved]]
                    cost += a_rows[k, axis][:, moved] @ (new - old).T
            else:
                cost += a_rows[k, axis] @ b_rows[k, axis][:, cols].T
            if entries is None:
                used[k, axis] = cols
        if entries is None:
            self.costs[p] = cost
        return cost

    def solve(self, p, entries):
        """(gain, the cost scale, {p: the best p given the others})."""
        cost = self.cost_of(p, entries)
        cols, self.prices[p] = _assign(cost, self.prices.get(p))
        new, i = torch.as_tensor(cols, device=self.device), torch.arange(self.spec.perms[p], device=self.device)
        return (float(cost[i, new].sum() - cost[i, self.perm[p]].sum()), max(float(cost.max()), -float(cost.min())),
                {p: new})

    def solve_blocks(self, p, entries):
        """solve() for p and the reorderings within its blocks, jointly and exactly: for each block h of A and
        g of B the best reordering within (one assignment per pair), then p's assignment of blocks on those
        values."""
        spec, device, perm, inner = self.spec, self.device, self.perm, self.inner[p]
        n, i = spec.perms[p], torch.arange(spec.perms[p], device=device)
        between = torch.zeros(n, n, dtype=torch.float64, device=device)   # tensors without a within-axis
        within = {c: torch.zeros(n, n, spec.perms[c], spec.perms[c], dtype=torch.float64, device=device)
                  for c in inner}
        for k, axis in self.touched[p] if entries is None else entries:
            c = next((c for c in inner if c in spec.axes[k]), None)
            if c is None:
                between += self.a_rows[k, axis] @ _rows(_permute(spec, perm, k, self.b32[k], skip=(axis,)), axis, n).T
                continue
            ax = spec.axes[k].index(c)
            blocks = lambda t: t.movedim((axis, ax), (0, 1)).reshape(n, spec.perms[c], -1)  # noqa: E731
            moved = _permute(spec, perm, k, self.b32[k], skip=(axis, ax))
            within[c] += torch.einsum('hir,gjr->hgij', blocks(self.a[k]), blocks(moved))
        value, best = between.clone(), {}
        for c, cost in within.items():
            best[c] = torch.stack([torch.as_tensor(linear_sum_assignment(pair.cpu().numpy(), maximize=True)[1])
                                   for pair in cost.flatten(0, 1)]).view(n, n, -1).to(device)
            value += cost.gather(3, best[c][..., None]).sum((2, 3))
        new = {p: torch.as_tensor(linear_sum_assignment(value.cpu().numpy(), maximize=True)[1], device=device)}
        new.update({c: best[c][i, new[p]] for c in inner})

        def total(q):   # the cost of q's blocks and reorderings within them
            inside = sum(within[c][i, q[p]].gather(2, q[c][..., None]).sum() for c in inner)
            return float(between[i, q[p]].sum() + inside)
        return total(new) - total(perm), float(value.abs().max()), new

    def improve(self, p, entries=None):
        """Set p to the best p given the others, from entries (default all); returns the gain."""
        if entries is not None and len(entries) == len(self.touched[p]):
            entries = None   # all of them: a full solve, which a later sweep need not repeat
        seen = {q: self.changes[q] for q in self.neighbours[p]}
        if entries is None and self.solved_at.get(p) == seen:
            return 0.0
        gain, scale, new = (self.solve_blocks if self.inner[p] else self.solve)(p, entries)
        if entries is None:
            self.solved_at[p] = seen
        if gain > TOL * scale:
            self.perm.update(new)   # a different permutation of equal cost is no progress
            for q in new:
                self.changes[q] += 1
            return gain
        return 0.0

    def start(self, init):
        """Start from `init`, or else from the better of the identity and a layer-by-layer start; returns the
        objective there. Layer by layer, each permutation is solved from the tensors whose other axes are
        already solved (a layer's weights given its input's permutation). Coordinate descent from the
        identity stalls when layers are strongly coupled (airbench's identity-initialized convolutions);
        this start does not."""
        if init is not None:
            self.perm.update({p: q.to(self.device) for p, q in init.items()})
            return self.objective()
        identity, at_identity, solved = dict(self.perm), self.objective(), set()
        for p in self.plain:
            self.improve(p, [(k, axis) for k, axis in self.touched[p] if all(
                q is None or q in solved or q in self.inner[p]
                for ax, q in enumerate(self.spec.axes[k]) if ax != axis)])
            solved.update([p, *self.inner[p]])
        start = self.objective()
        if start < at_identity:
            self.perm.update(identity)
            start = at_identity
            self.solved_at.clear()   # what was solved was solved for other neighbours
        return start


def weight_matching(spec, params_a, params_b, max_iter=MAX_SWEEPS, seed=0, init=None, device=None):
    """The Permutation of B's channels that maximizes Σ⟨A, π(B)⟩ over every parameter it touches
    (weights, biases and norm affine terms), i.e. minimizes ‖A − π(B)‖: coordinate descent over the
    permutations in a seeded random order, from `init` or else from the better of the identity and a
    layer-by-layer start; stops after a sweep without improvement or after max_iter sweeps. The
    result's .objective lists Σ⟨A, π(B)⟩ at the start (float64) and after each sweep (the start plus the
    sweeps' gains, as the cost matrices measured them: float32 products summed in float64)."""
    check_compatible(spec, [params_a, params_b])
    descent = _CoordinateDescent(spec, params_a, params_b, _device(device), dict(getattr(init, 'prices', {})))
    history, order = [descent.start(init)], [p for p in descent.plain if descent.touched[p]]
    rng = random.Random(seed)
    for _ in range(max_iter):
        # A step changes only the tensors p touches, by the gain its cost matrix measured: the objective
        # is tracked from those gains instead of recomputed over every tensor after each sweep.
        gain = sum(descent.improve(p) for p in rng.sample(order, len(order)))
        history.append(history[-1] + gain)
        if not gain:
            break
    return Permutation({p: q.cpu() for p, q in descent.perm.items()}, history, descent.prices)


def _output_permutations(spec, model):
    """{module name: the permutation of its output channels} for every Conv, Linear and norm layer whose
    outputs some permutation reorders: the tensors activation matching correlates."""
    found = {}
    for name, m in model.named_modules():
        if not isinstance(m, LAYERS) or f'{name}.weight' not in spec.axes and f'{name}.bias' not in spec.axes:
            continue
        key, axis = (f'{name}.weight', 1 if getattr(m, 'transposed', False) else 0) if f'{name}.weight' in spec.axes \
            else (f'{name}.bias', 0)
        p = spec.axes[key][axis] if len(spec.axes[key]) > axis else None
        if p is not None:
            found[name] = p
    return found


@torch.no_grad()
def activation_matching(spec, model_a, model_b, batches, device=None):
    """The Permutation of B's channels that maximizes, for each permutation on its own, the summed
    correlation of A's and B's activations channel by channel (Ainsworth et al. 2022, activation
    matching): both models run in eval mode on the same batches (an iterable of input tensors), the
    outputs of every Conv, Linear and norm layer a permutation acts on are correlated channel with
    channel (Pearson, over examples and positions, accumulated in float64: feature_correlations of the
    two, A's channels against B's), and a residual stream averages the correlations of every layer that
    writes into it (the assignment of their sum). Memory: the (2n x 2n) statistics of each layer, never
    the activations. The outputs are pre-activations (before the nonlinearity that follows)."""
    device = _device(device)
    if hasattr(model_a, 'permutation_table') or spec.within:   # permutations inside modules (attention heads)
        raise RebasinError(f'{type(model_a).__name__} names its own permutations, some inside a module (attention '
                           'heads), where activation matching cannot see: use weight matching')
    if not _output_permutations(spec, model_a):
        raise RebasinError('activation matching found no layer whose outputs a permutation reorders')
    corr = feature_correlations(spec, [model_a, model_b], batches, device)   # A's channels, then B's
    perm = {}
    for p, n in spec.perms.items():   # the cross block: A's channel i against B's channel j
        cost = corr[p][:n, n:] if p in corr else torch.zeros(n, n, dtype=torch.float64)
        perm[p] = torch.as_tensor(linear_sum_assignment(cost.cpu().numpy(), maximize=True)[1])
    return Permutation(perm)


#############################################
#                 MergeMany                 #
#############################################
# Align each model in turn to the mean of the others (weight matching, warm-started from its current
# permutation, so its distance to that mean can only shrink), until a full pass no longer reduces the
# total distance Σ_i ‖π_i(θ_i) − mean of the others‖² (by more than a fraction `tol`). Only a real
# reduction counts as progress: a pass that merely swaps tied channels ends the loop.

def _sq_distance(a, b):
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)


def _spread(models):
    """Σ_i ‖θ_i − mean of the others‖²."""
    n, total = len(models), {k: sum(m[k] for m in models) for k in models[0]}
    return sum(_sq_distance(m, {k: (total[k] - m[k]) / (n - 1) for k in m}) for m in models)


def average(params_list, weights=None):
    """The (weighted) mean of several state dicts, buffers included; integer tensors come from the first.
    average([a, b], [1 - lam, lam]) is the interpolation between a and b."""
    weights = weights or [1 / len(params_list)] * len(params_list)
    return {k: sum(w * p[k].double() for w, p in zip(weights, params_list)).to(t.dtype) if t.is_floating_point()
            else t.clone() for k, t in params_list[0].items()}


def merge_many(spec, params_list, max_iter=MAX_SWEEPS, seed=0, device=None, max_passes=MAX_PASSES, tol=PASS_TOL,
               progress=None):
    """MergeMany: (merged state dict, one Permutation per model). The merged model lives in the first
    model's basin (its permutation is the identity), so merging permuted copies of one network returns
    it. max_iter bounds the sweeps of the initial alignments to the first model; each later step is one
    sweep. progress(record) is called after each step with {'pass', 'model', 'before', 'after'} (squared
    distances to the mean of the others) and after each pass with {'pass', 'distance'}."""
    if len(params_list) < 2:
        raise RebasinError(f'MergeMany needs at least two models, got {len(params_list)}')
    check_compatible(spec, params_list)
    device, n, rng = _device(device), len(params_list), random.Random(seed)
    keys = _matched_keys(spec, params_list[0])
    base = [{k: p[k].to(device, torch.float64) for k in keys} for p in params_list]
    perms, aligned = [identity_permutation(spec) for _ in base], list(base)
    # Start from every model aligned to the first one, then refine. Started from the identity, as in the
    # paper, the passes can settle on a mixed assignment: permuted copies of one network never reunite.
    for i in range(1, n):
        perms[i] = weight_matching(spec, base[0], base[i], max_iter, rng.randrange(2 ** 31), device=device)
        aligned[i] = apply_permutation(spec, perms[i], base[i])
    distance = [_spread(aligned)]
    report = progress or (lambda record: None)
    report({'pass': 0, 'distance': distance[0]})
    for pass_ in range(1, max_passes + 1):
        total = {k: sum(m[k] for m in aligned) for k in keys}
        for i in rng.sample(range(n), n):
            others = {k: (total[k] - aligned[i][k]) / (n - 1) for k in keys}
            before = _sq_distance(aligned[i], others)
            # One sweep per step: the mean of the others moves with every step, so sweeping to convergence
            # against it is wasted work (four Fashion-MNIST MLPs 784-512-512-512-10: 5.4 s instead of 10.9 s,
            # final distance 537.15 instead of 537.54, the same merged accuracy).
            perms[i] = weight_matching(spec, others, base[i], 1, rng.randrange(2 ** 31), perms[i], device)
            new = apply_permutation(spec, perms[i], base[i])
            total = {k: total[k] + new[k] - aligned[i][k] for k in keys}
            aligned[i] = new
            report({'pass': pass_, 'model': i, 'before': before, 'after': _sq_distance(new, others)})
        distance.append(_spread(aligned))
        report({'pass': pass_, 'distance': distance[-1]})
        if not distance[-1] < distance[-2] * (1 - tol):
            break
    # Re-express everything in the first model's basin: compose each permutation with π_0's inverse.
    undo = inverse(spec, perms[0])
    perms = [Permutation(compose(spec, q, undo), q.objective) for q in perms]
    merged = average([apply_permutation(spec, q, params) for q, params in zip(perms, params_list)])
    return merged, perms


#############################################
#        Zipping (ZipIt, Stoica 2023)       #
#############################################
# Weight matching pairs each channel of B with one of A. ZipIt (Stoica et al. 2023, arXiv 2305.03053)
# instead pools the N·n channels of a permutation group over all N models and greedily joins the most
# correlated pair of clusters, either model's, until n clusters are left: features the models share are
# averaged, and a feature only one model has may join a redundant one of its own model instead of a
# stranger. A merge matrix M (n × N·n) averages each cluster, an unmerge matrix U (N·n × n) copies the
# merged feature back to each member; layer W of model m contributes M_out^(m) W_m U_in^(m), folded into
# weights of the original shape. The groups the spec leaves fixed are shared: the first layer reads the
# same images, and the last layer's outputs (the logits) are averaged.

# ZipIt's own α and β (Stoica et al. 2023, Sec. 4.3; gstoica27/ZipIt matching_functions.py match_tensors_zipit):
# α multiplies a cluster's correlations each time it merges (fewer features merged many times; α = 0: a merged
# feature never merges again with a feature of its models), β is each model's budget of within-model merges as a
# fraction of (merges / N), after which that model's features merge only across models. Their defaults are
# α = 0.3, β = 0.125; these keep this toolkit's earlier zip (no decay, no budget) and its own within-model weight
# (the authors' zip: within 1). Their code lets one within-model merge through at a budget of 0; here β = 0 allows none.
ZIP_WITHIN = 0.5    # a pair within one model counts this fraction of its correlation (1: no preference, ZipIt's)
ZIP_ALPHA = 1.0     # ZipIt's α: a cluster's correlations times α after each merge (1: no decay)
ZIP_BETA = None     # ZipIt's β: within-model merges per model, a fraction of merges / N (None: no budget)
# The authors' grid (ZipIt evaluation_scripts/hyperparameter_testing.py); within 1: their zip exactly.
ZIP_GRID = dict(within=(1.0,), alpha=(1e-4, 0.01, 0.1, 0.3, 0.5, 1.0), beta=(0.0, 0.0375, 0.075, 0.125, 0.25, 1.0))
ZIP_CHUNK = 100     # images per forward pass while correlating: every model's activations are held at once
TUNE_EXAMPLES = 2000   # merge --tune: held-out images per grid point (its models' validation splits, interleaved)


def _input_axes(model):
    """{weight key: its input axis}: axis 1 of a Conv/Linear weight (0 for a transposed convolution)."""
    return {f'{name}.weight': 0 if getattr(m, 'transposed', False) else 1 for name, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def _refuse_unzippable(spec, model):
    if hasattr(model, 'permutation_table') or spec.within:
        raise RebasinError(f'{type(model).__name__} names its own permutations inside a module (attention heads), '
                           'which zipping cannot follow: merge it with --method weight')


@torch.no_grad()
def feature_correlations(spec, models, batches, device=None, chunk=ZIP_CHUNK):
    """{permutation: (N·n × N·n) Pearson correlation of the N models' channels}, model m's at rows m·n to
    (m+1)·n: the outputs of every Conv, Linear and norm layer the permutation reorders, on the same training
    inputs, in eval mode (a residual stream: the mean over the layers that write it)."""
    device = _device(device)
    layers = _output_permutations(spec, models[0])
    seen, stats = {}, {}

    def hook(i, name):
        def record(module, inputs, out):
            seen[i, name] = out.detach().transpose(0, 1).reshape(out.size(1), -1).double()
        return record

    handles = [m.get_submodule(name).register_forward_hook(hook(i, name))
               for i, m in enumerate(models) for name in layers]
    try:
        with ExitStack() as modes:
            for m in models:
                modes.enter_context(_eval_mode(m))
            for x in batches:
                for part in x.to(device).split(chunk):
                    for m in models:
                        m(part)
                    for name in layers:   # sums of f and f·fᵀ over all models' channels at once, and the count
                        f = torch.cat([seen.pop((i, name)) for i in range(len(models))])
                        terms = (f.sum(1), f @ f.T, f.size(1))
                        stats[name] = terms if name not in stats else tuple(s + t for s, t in zip(stats[name], terms))
    finally:
        for h in handles:
            h.remove()
    if not stats:
        raise RebasinError('correlating activations needs at least one batch of training inputs')
    corr, count = {}, {}
    for name, (s, ss, n) in stats.items():
        mean = s / n
        cov = ss / n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        p = layers[name]
        corr[p] = corr.get(p, 0) + cov / (torch.outer(std, std) + 1e-12)   # a constant channel correlates 0
        count[p] = count.get(p, 0) + 1
    return {p: c / count[p] for p, c in corr.items()}


def zip_clusters(corr, models, alpha=ZIP_ALPHA, beta=ZIP_BETA, within=ZIP_WITHIN):
    """ZipIt's greedy matching of one group: the N·n channels (corr's rows, model by model) joined into n
    clusters, each time the two most correlated clusters (complete linkage: a cluster is as correlated with
    another as its least correlated pair of channels). A pair within one model starts weighted by `within`;
    a merged cluster's correlations are multiplied by alpha (ZipIt's α; at 0 it is barred from its models'
    features); each model may merge within itself floor(beta · merges / N) times (ZipIt's β; None: no
    budget; β = 1 still caps a model at merges / N), a cluster belonging to the model of its first
    channel. Where the budgets and α's bars leave no pair (three models or more), the remaining clusters
    join by complete linkage alone. The clusters (lists of channel indices) come ordered by their first
    channel: model 0's order where it can."""
    total = corr.shape[0]
    n = total // models
    c, owner = corr.double().clone(), torch.arange(total) // n
    c[owner[:, None] == owner[None, :]] *= within
    c.fill_diagonal_(-math.inf)
    plain = c.clone()   # complete linkage without decay or bars
    budget = [math.inf if beta is None else int((total - n) // models * beta + 1e-4)] * models   # the authors' rounding
    live = torch.ones(total, dtype=torch.bool)

    def bar(rows, cols):
        c[rows[:, None] & cols[None, :]] = -math.inf
        c[cols[:, None] & rows[None, :]] = -math.inf

    for m in range(models):
        if budget[m] <= 0:
            bar(owner == m, owner == m)
    members = {i: [i] for i in range(total)}
    for _ in range(total - n):
        i, j = sorted(divmod(int(torch.argmax(c if c.max() > -math.inf else plain)), total))
        members[i] += members.pop(j)
        plain[i] = plain[:, i] = torch.minimum(plain[i], plain[j])
        plain[j], plain[:, j], plain[i, i] = -math.inf, -math.inf, -math.inf
        joined = torch.minimum(c[i], c[j])
        c[i] = c[:, i] = joined * alpha if alpha > 0 else joined
        live[j], c[j], c[:, j] = False, -math.inf, -math.inf
        c[i, i] = -math.inf
        here = torch.zeros(total, dtype=torch.bool)
        here[i] = True
        if alpha <= 0:
            bar(here, live & ((owner == owner[i]) | (owner == owner[j])))
        if owner[i] == owner[j]:
            budget[int(owner[i])] -= 1
            if budget[int(owner[i])] <= 0:
                bar(live & (owner == owner[i]), live & (owner == owner[i]))
    return sorted((sorted(m) for m in members.values()), key=lambda m: m[0])


def greedy_pairs(corr, models):
    """{model m: the index that pairs model m's channels with model 0's} from an (N·n × N·n) correlation:
    the most correlated pair across the two models first, as ZipIt matches, but across models only."""
    n = corr.shape[0] // models
    pairs = {}
    for m in range(1, models):
        c, index = corr[:n, m * n:(m + 1) * n].double().clone(), torch.empty(n, dtype=torch.long)
        for _ in range(n):
            i, j = divmod(int(torch.argmax(c)), n)
            index[i] = j
            c[i], c[:, j] = -math.inf, -math.inf
        pairs[m] = index
    return pairs


def zip_matrices(clusters):
    """(M, U) of one group: M (n × N·n) averages each cluster's channels, U (N·n × n) copies each merged
    channel back to every member of its cluster."""
    merge = torch.zeros(len(clusters), sum(map(len, clusters)), dtype=torch.float64)
    unmerge = torch.zeros_like(merge.T)
    for k, cluster in enumerate(clusters):
        merge[k, cluster], unmerge[cluster, k] = 1 / len(cluster), 1
    return merge, unmerge


def _contract(t, axis, matrix):
    """t with `axis` mapped by matrix (new × old); a flattened axis (old·k entries) moves in blocks of k."""
    k = t.shape[axis] // matrix.shape[1]
    if k > 1:
        matrix = torch.kron(matrix, torch.eye(k, dtype=matrix.dtype))
    return torch.tensordot(matrix.to(t), t, dims=([1], [axis])).movedim(0, axis)


def _fold(spec, key, t, m, models, mats, input_axes, shared=True):
    """Model m's share of tensor `key` in the zipped model: its output channels merged by m's block of M,
    its input channels (a weight's input axis) unmerged by m's block of U, for the permutations in `mats`.
    A tensor whose outputs are a fixed group (the logits) is divided by the N models when shared, so that
    the shares add up to the average; a branch's own (shared=False) is kept whole."""
    t, names = t.double(), spec.axes[key]
    inp = input_axes.get(key) if t.dim() >= 2 else None
    outputs = [axis for axis, p in enumerate(names) if p is not None and axis != inp]
    for axis in outputs:
        if names[axis] in mats:
            merge = mats[names[axis]][0]
            n = merge.shape[0]
            t = _contract(t, axis, merge[:, m * n:(m + 1) * n])
    if inp is not None and names[inp] in mats:
        unmerge = mats[names[inp]][1]
        n = unmerge.shape[1]
        t = _contract(t, inp, unmerge[m * n:(m + 1) * n].T)
    return t if outputs or not shared else t / models


def _zip_setup(spec, params_list, module, batches, groups, device, corr=None, **zipping):
    """The models as modules, (M, U) of each of the named groups (zip_clusters with zipping's alpha, beta and
    within), and the feature correlations (corr: those measured before on the same models and batches)."""
    check_compatible(spec, params_list)
    nets = [module(p) for p in params_list]
    _refuse_unzippable(spec, nets[0])
    if corr is None:
        corr = feature_correlations(spec, nets, batches, device) if groups else {}
    unseen = [p for p in groups if p not in corr]
    if unseen:
        raise RebasinError(f'zipping sees no layer output of {unseen[0]}: no Conv, Linear or norm layer writes it')
    return nets, {p: zip_matrices(zip_clusters(corr[p], len(params_list), **zipping)) for p in groups}, corr


def _reset_statistics(module, states, batches):
    """Each state's BatchNorm statistics measured on the batches (merged statistics describe no network)."""
    out = []
    for state in states:
        net = module(state)
        _recompute_bn(net, batches)
        out.append(_state(net))
    return out


def zip_models(spec, params_list, module, batches, alpha=ZIP_ALPHA, device=None, bn=True, *, beta=ZIP_BETA,
               within=ZIP_WITHIN, corr=None):
    """ZipIt: the N models zipped into one state dict of their architecture (in model 0's order where it
    can be), the (M, U) matrices of each permutation, and the feature correlations they came from.
    module: state dict -> nn.Module on the device; batches: training inputs, whose activations are
    correlated and on which (bn) the zipped model's BatchNorm statistics are recomputed or, without
    BatchNorm, its hidden channels given their clusters' mean and std (REPAIR). alpha, beta, within:
    zip_clusters'; corr: feature_correlations of these models on these batches, when measured already."""
    nets, mats, corr = _zip_setup(spec, params_list, module, batches, list(spec.perms), device, corr,
                                  alpha=alpha, beta=beta, within=within)
    input_axes, n = _input_axes(nets[0]), len(params_list)
    merged = {k: sum(_fold(spec, k, p[k].cpu(), m, n, mats, input_axes) for m, p in enumerate(params_list)).to(t.dtype)
              if t.is_floating_point() else t.clone() for k, t in params_list[0].items()}
    if bn and _batchnorms(nets[0]):
        merged = _reset_statistics(module, [merged], batches)[0]
    elif bn:
        merged = _zip_repair(spec, nets, module(merged), mats, batches)
    return merged, mats, corr


@torch.no_grad()
def _zip_repair(spec, nets, zipped, mats, batches):
    """REPAIR for a zipped network without BatchNorm: each merged channel of a hidden Conv/Linear gets the
    mean of its cluster's channel means and stds (the channels it averages), layer by layer."""
    layers = {name: p for name, p in _output_permutations(spec, zipped).items()
              if isinstance(zipped.get_submodule(name), (nn.Linear, nn.modules.conv._ConvNd))}
    if not layers:
        return _state(zipped)
    stats = [_channel_stats(net, list(layers), batches) for net in nets]
    goal = {name: [mats[p][0].to(stats[0][name][j]) @ torch.cat([s[name][j] for s in stats]) for j in (0, 1)]
            for name, p in layers.items()}
    return _match_statistics(zipped, goal, batches)


def _trunk(spec, key, t, input_axes, zipped):
    """Whether tensor `key` belongs to a partial zip's trunk (it writes a zipped group), and the group its
    input axis reads (None: none, or a fixed one)."""
    names = spec.axes[key]
    inp = input_axes.get(key) if t.dim() >= 2 else None
    trunk = t.is_floating_point() and any(p in zipped for axis, p in enumerate(names) if axis != inp)
    return trunk, names[inp] if inp is not None else None


def partial_cuts(spec, params, input_axes):
    """The K at which a partial zip may stop: every K whose trunk reads no branch (a residual stream is
    zipped whole: for a ResNet, the ends of its stages)."""
    order = list(spec.perms)
    return [k for k in range(len(order) + 1) if not any(
        trunk and reads is not None and reads not in order[:k]
        for trunk, reads in (_trunk(spec, key, t, input_axes, order[:k]) for key, t in params.items()))]


def partial_zip(spec, params_list, k, module, batches, alpha=ZIP_ALPHA, device=None, bn=True, *, beta=ZIP_BETA,
                within=ZIP_WITHIN, corr=None):
    """Zip only the first k permutation groups (the spec's forward order) and keep the rest of each model as
    its own branch: (branch state dicts, the keys every branch shares). Branch m has the models'
    architecture: the zipped trunk (the same tensors in every branch), then model m's own layers, which
    read the trunk's merged channels through m's block of U. The partially zipped model is the branches'
    ensemble (probabilities averaged): k = 0 is the models' ensemble, k = all groups zips all but the last
    layer. A k that cuts a residual stream (the trunk would read a branch) is refused, naming those that
    do not (partial_cuts). alpha, beta, within, corr: as zip_models'."""
    input_axes, n = _input_axes(module(params_list[0])), len(params_list)
    cuts = partial_cuts(spec, params_list[0], input_axes)
    if k not in cuts:
        inside = 0 <= k <= len(spec.perms)
        raise RebasinError(f'--partial {k} ' + ('cuts a residual stream (the zipped trunk would read a branch)'
                           if inside else f'is not one of the {len(spec.perms) + 1} ends of permutation groups')
                           + f"; use one of {', '.join(map(str, cuts))}")
    nets, mats, _ = _zip_setup(spec, params_list, module, batches, list(spec.perms)[:k], device, corr,
                               alpha=alpha, beta=beta, within=within)
    shared, branches = [], [{} for _ in params_list]
    for key, t in params_list[0].items():
        trunk, _ = _trunk(spec, key, t, input_axes, mats)
        if trunk:
            shared.append(key)
            value = sum(_fold(spec, key, p[key].cpu(), m, n, mats, input_axes) for m, p in enumerate(params_list))
        for m, p in enumerate(params_list):
            own = _fold(spec, key, p[key].cpu(), m, n, mats, input_axes, shared=False) if t.is_floating_point() \
                else p[key]
            branches[m][key] = (value if trunk else own).to(t.dtype).clone()
    if bn and _batchnorms(nets[0]):
        branches = _reset_statistics(module, branches, batches)
    return branches, shared


@torch.no_grad()
def held_out_accuracy(module, states, x, y, chunk=ZIP_CHUNK * 10):
    """Accuracy of the states' ensemble (probabilities averaged; one state: that model) on inputs x (as the
    batches are: float images) and labels y."""
    nets = [module(s) for s in states]
    device = next(nets[0].parameters()).device
    right = 0
    for part, labels in zip(x.split(chunk), y.split(chunk)):
        part = part.to(device)
        probs = sum(net(part).softmax(-1) for net in nets)
        right += int((probs.argmax(-1).cpu() == labels.cpu()).sum())
    return right / len(y)


def tune_zip(spec, params_list, module, batches, x_held, y_held, grid=ZIP_GRID, k=None, device=None, progress=None):
    """ZipIt's settings chosen as its authors choose them: every point of grid ({'within', 'alpha', 'beta': values})
    zipped (k: partial_zip's first k groups, None: zip_models) and scored by held-out accuracy on x_held, y_held:
    training images that neither the models' training nor the correlation batches used, never the test set.
    Returns (the best point, its accuracy, [(point, accuracy)] in grid order); a tie goes to the earlier point.
    The feature correlations are measured once: they do not depend on the settings. progress: called after
    each point with {'point': how many are done, 'points': of how many, 'accuracy': its score}."""
    nets = [module(p) for p in params_list]
    _refuse_unzippable(spec, nets[0])
    corr = feature_correlations(spec, nets, batches, device)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    scores = []
    for point in points:
        if k is None:
            states = [zip_models(spec, params_list, module, batches, device=device, corr=corr, **point)[0]]
        else:
            states = partial_zip(spec, params_list, k, module, batches, device=device, corr=corr, **point)[0]
        scores.append((point, held_out_accuracy(module, states, x_held, y_held)))
        if progress:
            progress(dict(point=len(scores), points=len(points), accuracy=scores[-1][1]))
    best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))
    return scores[best][0], scores[best][1], scores


#############################################
#     Learned matching (straight-through)   #
#############################################
# Weight matching minimizes a distance between weights, a proxy for what we want: a low loss of the
# averaged network. Ainsworth et al. (2022, sec. 3.3) learn the permutation for that loss itself: soft
# weights θ̃ (one copy per model but the reference), whose nearest permutation of the real weights
# (weight matching of θ̃ against them) is used in the forward pass, with the gradient passed straight
# through to θ̃. For N models (STE-MergeMany) the averaged network is the mean of all N.

STE_STEPS = 200     # optimizer steps, each on one training batch
STE_LR = 1e-3       # Adam's learning rate for the soft weights (weights of trained nets are ~1e-2 to 1e-1)
STE_CHECKS = 10     # times the projection's loss on all the training examples is measured; the best is kept


def _bn_train_mode(net):
    """Eval mode except BatchNorm, which normalizes by batch statistics: the loss an averaged network has once
    its statistics are recomputed, as they are after every merge."""
    net.eval()
    for m in _batchnorms(net).values():
        m.train()
    return net


def ste_matching(spec, params_list, module, batches, targets=None, steps=STE_STEPS, lr=STE_LR, seed=0, device=None,
                 max_iter=MAX_SWEEPS, progress=None, init=None):
    """Learned matching: one Permutation per model (model 0's the identity) that lowers the training loss of
    the average of the permuted models, starting from weight matching (two models) or MergeMany. batches:
    training inputs; targets: their labels, or None for the models' own mean probabilities (no labels
    needed). The projection's loss on all the batches is measured STE_CHECKS times and the best
    permutations are kept, so the result never has a higher loss there than its start. Deterministic
    for a seed. progress(record) after each step: {'step', 'steps', 'loss', 'best'}. init: the Permutations
    to start from (default: weight matching of two models, MergeMany of more)."""
    check_compatible(spec, params_list)
    device, n, rng = _device(device), len(params_list), random.Random(seed)
    batches = [x.to(device) for x in batches]
    if not batches:
        raise RebasinError('learned matching needs at least one batch of training inputs')
    net = _bn_train_mode(copy.deepcopy(module(params_list[0])).to(device))
    if targets is None:
        with torch.no_grad():
            nets = [module(p).eval() for p in params_list]
            targets = [torch.stack([F.softmax(m(x).float(), -1) for m in nets]).mean(0) for x in batches]
    targets = [y.to(device) for y in targets]
    if init is not None:
        perms = list(init)
    elif n == 2:
        perms = [identity_permutation(spec), weight_matching(spec, params_list[0], params_list[1], max_iter, seed,
                                                             device=device)]
    else:
        perms = merge_many(spec, params_list, max_iter, seed, device)[1]
    keys = _matched_keys(spec, params_list[0])
    models = [{k: v.to(device, torch.float32) if v.is_floating_point() else v.to(device) for k, v in p.items()}
              for p in params_list]
    # The soft weights start at the merged model, not at each permuted model: their nearest permutation is
    # the same, but between the models a small step can change it (the MLP pair of experiments/merging.py,
    # 300 steps: test barrier 0.047 against 0.050 from the permuted model and 0.050 for weight matching).
    start = average([apply_permutation(spec, q, {k: m[k] for k in keys}) for q, m in zip(perms, models)])
    soft = [{k: v.detach().clone().requires_grad_() for k, v in start.items()} for _ in models[1:]]
    optimizer = torch.optim.Adam([t for s in soft for t in s.values()], lr=lr)

    def averaged(perms, soft=None):
        permuted = [apply_permutation(spec, q, m) for q, m in zip(perms, models)]
        for p, s in zip(permuted[1:], soft or []):   # straight through: the projection forward, θ̃'s gradient back
            p.update({k: s[k] + (p[k] - s[k]).detach() for k in keys})
        return {k: sum(p[k] for p in permuted) / n if t.is_floating_point() else t for k, t in permuted[0].items()}

    def loss(params, x, y):
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)).float(), y)

    @torch.no_grad()
    def full_loss(perms):
        params = averaged(perms)
        return sum(float(loss(params, x, y)) * len(x) for x, y in zip(batches, targets)) / sum(map(len, batches))

    best, best_loss = list(perms), full_loss(perms)
    checks = {max(1, round(steps * (i + 1) / STE_CHECKS)) for i in range(STE_CHECKS)}
    for step in range(1, steps + 1):
        i = rng.randrange(len(batches))
        value = loss(averaged(perms, soft), batches[i], targets[i])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        # the nearest permutation of each model's weights to its soft weights (warm-started: a few swaps)
        perms = [perms[0]] + [weight_matching(spec, {k: s[k].detach() for k in keys}, {k: m[k] for k in keys},
                                              max_iter, seed, init=q, device=device)
                              for s, m, q in zip(soft, models[1:], perms[1:])]
        if step in checks:
            now = full_loss(perms)
            if now < best_loss * (1 - 1e-7):   # a real gain: a tie keeps the weight-matching start
                best, best_loss = list(perms), now
        if progress is not None:
            progress({'step': step, 'steps': steps, 'loss': float(value), 'best': best_loss})
    return [Permutation({p: q.cpu() for p, q in perm.items()}) for perm in best]


#############################################
#              Merge methods                #
#############################################
# One entry per way of matching channels; `align`, `merge`, their --method help and validation, and
# other scripts read this registry. Every caller passes the same keyword options and each method takes
# what it uses: max_iter, seed, device, max_passes, tol, progress (weight matching); module (a function
# from a state dict to an nn.Module on the device) and batches (a list of training inputs) for a method
# with needs_data, and targets (the batches' labels), steps, lr (ste) and alpha, beta, within (zip). A new method is
# one entry and its align function: without a merge function of its own, merge aligns every model to the
# first and averages.

@dataclass(frozen=True)
class MergeMethod:
    help: str                          # one clause for --method's help
    align: Callable                    # (spec, params_a, params_b, **options) -> Permutation of B into A's basin
    merge: Optional[Callable] = None   # (spec, params_list, **options) -> (merged state dict, Permutations)
    needs_data: bool = False           # align needs module= and batches=: the command line loads training images


def _align_weights(spec, params_a, params_b, max_iter=MAX_SWEEPS, seed=0, device=None, **_):
    return weight_matching(spec, params_a, params_b, max_iter, seed, device=device)


def _merge_weights(spec, params_list, max_iter=MAX_SWEEPS, seed=0, device=None, max_passes=MAX_PASSES, tol=PASS_TOL,
                   progress=None, **_):
    return merge_many(spec, params_list, max_iter, seed, device, max_passes, tol, progress)


def _align_activations(spec, params_a, params_b, module=None, batches=None, device=None, **_):
    if module is None or batches is None:
        raise RebasinError('activation matching needs module= (state dict -> nn.Module) and batches= (inputs)')
    return activation_matching(spec, module(params_a), module(params_b), batches, device)


def _needs(what, module, batches):
    if module is None or batches is None:
        raise RebasinError(f'{what} needs module= (state dict -> nn.Module) and batches= (training inputs)')


def _zip_permutations(spec, corr, models):
    """Each model's greedy pairing with model 0, group by group: what REPAIR needs of a zip (the endpoints'
    channel statistics in the merged model's order), and zip's alignment of a pair."""
    pairs = {p: greedy_pairs(c, models) for p, c in corr.items()}
    return [identity_permutation(spec)] + [Permutation({p: pairs[p][m] for p in spec.perms}) for m in range(1, models)]


def _align_zip(spec, params_a, params_b, module=None, batches=None, device=None, **_):
    _needs('zipping', module, batches)
    check_compatible(spec, [params_a, params_b])
    nets = [module(params_a), module(params_b)]
    _refuse_unzippable(spec, nets[0])
    corr = feature_correlations(spec, nets, batches, device)
    unseen = next((p for p in spec.perms if p not in corr), None)
    if unseen:
        raise RebasinError(f'zipping sees no layer output of {unseen}: no Conv, Linear or norm layer writes it')
    return _zip_permutations(spec, corr, 2)[1]


def _merge_zip(spec, params_list, module=None, batches=None, alpha=ZIP_ALPHA, device=None, beta=ZIP_BETA,
               within=ZIP_WITHIN, **_):
    _needs('zipping', module, batches)
    if len(params_list) < 2:
        raise RebasinError(f'zipping needs at least two models, got {len(params_list)}')
    merged, _, corr = zip_models(spec, params_list, module, batches, alpha, device, beta=beta, within=within)
    return merged, _zip_permutations(spec, corr, len(params_list))


def _align_ste(spec, params_a, params_b, module=None, batches=None, targets=None, steps=STE_STEPS, lr=STE_LR, seed=0,
               device=None, max_iter=MAX_SWEEPS, progress=None, **_):
    _needs('learned matching', module, batches)
    return ste_matching(spec, [params_a, params_b], module, batches, targets, steps, lr, seed, device, max_iter,
                        progress)[1]


def _merge_ste(spec, params_list, module=None, batches=None, targets=None, steps=STE_STEPS, lr=STE_LR, seed=0,
               device=None, max_iter=MAX_SWEEPS, progress=None, **_):
    _needs('learned matching', module, batches)
    if len(params_list) < 2:
        raise RebasinError(f'merging needs at least two models, got {len(params_list)}')
    start = merge_many(spec, params_list, max_iter, seed, device)[1]   # as --method weight merges: STE improves it
    perms = ste_matching(spec, params_list, module, batches, targets, steps, lr, seed, device, max_iter, progress,
                         start)
    return average([apply_permutation(spec, q, p) for q, p in zip(perms, params_list)]), perms


MERGE_METHODS = {
    'weight': MergeMethod('weight matching: channels paired to bring the weights closest, MergeMany to merge',
                          _align_weights, _merge_weights),
    'activation': MergeMethod('activation matching: channels paired by how their activations on training images '
                              'correlate', _align_activations, needs_data=True),
    'ste': MergeMethod('learned matching: permutations trained by a straight-through estimator to lower the '
                       "averaged model's training loss, from weight matching", _align_ste, _merge_ste, needs_data=True),
    'zip': MergeMethod('ZipIt: features merged within and across models by activation correlation, not a '
                       'permutation; --partial K keeps branches', _align_zip, _merge_zip, needs_data=True),
}


def merge_method(name, what='method'):
    """The registry entry of a method name; RebasinError listing the names for an unknown one."""
    if name not in MERGE_METHODS:
        raise RebasinError(f"unknown {what} '{name}': use one of {', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def align_pair(method, spec, params_a, params_b, **options):
    """The Permutation that moves B into A's basin by the named method (options: see MergeMethod)."""
    return merge_method(method).align(spec, params_a, params_b, **options)


def merge_models(method, spec, params_list, **options):
    """(merged state dict, one Permutation per model) by the named method, in the first model's basin."""
    entry = merge_method(method)
    if entry.merge is not None:
        return entry.merge(spec, params_list, **options)
    if len(params_list) < 2:
        raise RebasinError(f'merging needs at least two models, got {len(params_list)}')
    check_compatible(spec, params_list)
    perms = [identity_permutation(spec)] + [entry.align(spec, params_list[0], p, **options) for p in params_list[1:]]
    return average([apply_permutation(spec, q, p) for q, p in zip(perms, params_list)]), perms


#############################################
#        BatchNorm after averaging          #
#############################################
# Averaging aligned networks shrinks the variance of every channel ("variance collapse"), and the
# averaged running statistics no longer describe the averaged network. reset_bn recomputes them;
# repair (REPAIR) also moves each channel's mean and std to the interpolation of the endpoints'.
# What `merge` applies by default (--stats auto), measured on Fashion-MNIST: the merged model's test accuracy
# without / with a BatchNorm reset / with REPAIR, MergeMany of networks trained 2 epochs on 5,000 images.
# MLPs 128-128-128: 2 models 66.0 / - / 67.5%, 3 models 58.4 / - / 64.8% (6 trained 4 epochs on all images:
# 84.9 / - / 85.3%). airbench at width 0.125: 2 models 48.8 / 58.3 / 54.3%, 4 models 36.6 / 48.4 / 46.9% (8
# trained 3 epochs: 22.9 / 54.1 / 54.4%). So REPAIR without BatchNorm; with it a reset, as good or better
# and one pass over the images instead of one per model.

STATISTICS = {   # merge --stats: how the merged model's channel statistics are restored after averaging
    'auto': 'what was measured to help, REPAIR without BatchNorm and a BatchNorm reset with it (zip restores its '
            'own); skipped, in one line, where the training data cannot be loaded',
    'repair': "REPAIR, each channel given the mean of the models' channel means and stds",
    'reset-bn': 'the BatchNorm statistics recomputed on training images',
    'none': 'the plain average (zip still restores its own)',
}
STATISTICS_DONE = {'repair': 'REPAIR', 'reset-bn': 'BatchNorm reset'}   # what the merge prints it did
AUTO_WITH_BN = 'reset-bn'   # --stats auto for a network with BatchNorm; without it, REPAIR
AUTO_WHY = {'repair': 'measured best for networks without BatchNorm',
            'reset-bn': 'measured best for networks with BatchNorm'}


def _batchnorms(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def _recompute_bn(model, batches):
    norms = _batchnorms(model).values()
    if not norms:
        raise RebasinError('the model has no BatchNorm layers with running statistics')
    model.eval()   # dropout and friends off; only BatchNorm sees train mode
    for m in norms:
        m.reset_running_stats()
        m.momentum = None   # a cumulative average over all batches, not an exponential one
        m.train()
    seen = 0
    for x in batches:
        model(x)
        seen += 1
    if not seen:
        raise RebasinError('no batches to compute BatchNorm statistics on')
    model.eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def reset_bn(model, batches):
    """New state dict of `model` (unchanged itself) whose BatchNorm running statistics are the plain
    average over `batches` (an iterable of input tensors on the model's device); nothing else changes."""
    model = copy.deepcopy(model)
    _recompute_bn(model, batches)
    return _state(model)


def _channel_stats(model, names, batches):
    """{name: (mean, std)} per channel of the named modules' outputs over all batches, in eval mode."""
    sums = {}

    def hook(name):
        def record(module, inputs, out):
            y = out.detach().transpose(0, 1).reshape(out.size(1), -1).double()
            s = sums.get(name, (0, 0, 0))
            sums[name] = (s[0] + y.sum(1), s[1] + (y * y).sum(1), s[2] + y.size(1))
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with _eval_mode(model):
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {name: (s / n, (s2 / n - (s / n) ** 2).clamp_min(0).sqrt()) for name, (s, s2, n) in sums.items()}


@torch.no_grad()
def repair_layers(model, example_input=None):
    """The layers whose output channels REPAIR gives new statistics: every BatchNorm with running statistics
    or, without BatchNorm, every Conv/Linear but the last. RebasinError where there are none, or where (seen
    on example_input) a Linear's output is not (batch, channels): a transformer's Linear acts on each token,
    and its channel statistics are not those of axis 1."""
    norms = list(_batchnorms(model))
    if norms:
        return norms
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if len(layers) < 2:
        raise RebasinError('REPAIR needs BatchNorm layers or hidden Conv/Linear layers to rescale')
    shapes = {}

    def record(name):
        def hook(module, inputs, out):
            shapes.setdefault(name, tuple(out.shape))
        return hook

    if example_input is not None:
        handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in layers[:-1]]
        try:
            with _eval_mode(model):
                model(example_input)
        finally:
            for h in handles:
                h.remove()
    tokens = next((name for name, shape in shapes.items()
                   if isinstance(model.get_submodule(name), nn.Linear) and len(shape) != 2), None)
    if tokens:
        raise RebasinError(f'REPAIR rescales the channels of axis 1, but {tokens} (a Linear) outputs shape '
                           f'{shapes[tokens]}: its channels are the last axis')
    return layers[:-1]


def auto_statistics(model, example_input):
    """What --stats auto restores the statistics of this network's average with: ('reset-bn', 'repair' or
    None, why), as measured above: REPAIR for networks without BatchNorm, a BatchNorm reset for those with
    it; neither for a network REPAIR cannot rescale (a transformer's Linears over tokens)."""
    if _batchnorms(model):
        return AUTO_WITH_BN, AUTO_WHY[AUTO_WITH_BN]
    try:
        repair_layers(model, example_input)
    except RebasinError as e:
        return None, str(e)
    return 'repair', AUTO_WHY['repair']


@torch.no_grad()
def repair_many(models, weights, model_mix, batches):
    """REPAIR for a weighted mix of aligned models: new state dict of `model_mix` whose channels have the
    weighted mean of the endpoints' channel means and stds. With BatchNorm, only BatchNorm's affine terms
    and statistics change; without, every Conv/Linear but the last is rescaled in forward order."""
    batches, mix = list(batches), copy.deepcopy(model_mix)
    layers = repair_layers(mix, batches[0] if batches else None)
    stats = [_channel_stats(m, layers, batches) for m in models]
    goal = {name: [sum(w * s[name][j] for w, s in zip(weights, stats)) for j in (0, 1)] for name in layers}
    return _match_statistics(mix, goal, batches)


def _match_statistics(mix, goal, batches):
    """The new state dict of `mix` (changed in place) whose named layers' channels have the goal's
    {name: (mean, std)}: BatchNorm's affine terms set and its statistics recomputed, or without BatchNorm
    each Conv/Linear rescaled in forward order."""
    norms = _batchnorms(mix)
    for name in goal:
        m, (mean, std) = mix.get_submodule(name), goal[name]
        if norms:   # in train mode BatchNorm's output has mean = bias and std = |weight|: set them, then
            if m.affine:   # recompute the statistics that make it so (all layers at once)
                m.weight.copy_(std.to(m.weight) * torch.where(m.weight < 0, -1.0, 1.0))
                m.bias.copy_(mean.to(m.bias))
        else:       # y' = (y − μ)·σ_goal/σ + μ_goal folded into the layer, after the layers before it
            now_mean, now_std = _channel_stats(mix, [name], batches)[name]
            scale = (std / now_std.clamp_min(1e-12)).to(m.weight)
            m.weight.mul_(scale.view(-1, *[1] * (m.weight.dim() - 1)))
            if m.bias is not None:
                m.bias.copy_((m.bias - now_mean.to(m.bias)) * scale + mean.to(m.bias))
    if norms:
        _recompute_bn(mix, batches)
    return _state(mix)


def repair(model_a, model_b, model_mix, lam, batches):
    """REPAIR (Jordan et al. 2022) of model_mix = (1 − lam)·A + lam·B (B aligned to A): its new state
    dict. batches: a list of input tensors (read several times)."""
    return repair_many([model_a, model_b], [1 - lam, lam], model_mix, batches)


#############################################
#               Command line                #
#############################################
# The only part that needs train_ensemble.py (it rebuilds networks from checkpoints and loads data),
# typer and rich: all imported when the command line runs, so that a copied rebasin.py needs only
# torch and scipy.


def _te():
    import train_ensemble
    return train_ensemble


@contextmanager
def _user_errors():
    """A user-facing error becomes one line on stderr and exit status 2, never a traceback."""
    te = _te()
    try:
        yield
    except (RebasinError, te.EnsembleError, OSError) as e:
        te.cli_error(' '.join(str(e).split()))


def _load_models(paths):
    """Every member file the paths stand for, as (path, model spec, state dict)."""
    te, found = _te(), []
    for path in (p for arg in paths for p in te.member_paths(arg)):
        model_spec, state, _ = te.load_member_state(path)
        found.append(SimpleNamespace(path=path, model_spec=model_spec, state=state))
    return found


def _permutation_spec_of(model_spec):
    """The network a model spec describes, and its permutation spec."""
    net = _te().build_model(model_spec)
    return net, permutation_spec(net, torch.zeros(1, *_te().input_shape(model_spec)))


def _module(model_spec, state, device):
    net = _te().build_model(model_spec)
    net.load_state_dict(state)
    return net.to(device).eval()


def _data_options(sources, dataset, data_dir):
    """The data options of the run the first model came from (its config.json), with the command line's
    overrides; the classes are all the sources' runs': the union of their --classes (None: every class)."""
    runs = list(dict.fromkeys(source if source.is_dir() else source.parent for source in sources))
    config_path = runs[0] / 'config.json'
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except json.JSONDecodeError as e:
        raise RebasinError(f'{config_path} is not valid JSON ({e})') from None
    own = [_raw_config(run).get('classes') for run in runs]
    return dict(dataset=dataset or config.get('dataset'), data_dir=str(data_dir or config.get('data_dir', 'data')),
                data_seed=config.get('seed', 0) if config.get('data_seed') is None else config['data_seed'],
                val_size=config.get('val_size') or 0,
                shard=config.get('shard'), subset=config.get('subset'), task=config.get('task'),
                target=config.get('target'), classes=None if None in own else sorted(set().union(*own)))


def _known(options):
    """The options that have a value: a run's config.json never says 'dataset': null (read_config refuses it)."""
    return {k: v for k, v in options.items() if v is not None}


def _training_batches(data, model_spec, examples, batch_size, device, labels=False):
    """The first `examples` training inputs in batches (labels: and their labels, batched alike)."""
    te = _te()
    loaded = te.load_run_data(data, download=False)
    x = loaded.x_train
    expected = te.input_shape(model_spec)
    if tuple(x.shape[1:]) != expected:
        raise RebasinError(f"dataset {data['dataset']} has inputs of shape {tuple(x.shape[1:])}; "
                           f"the models expect {expected}")
    batches = te.float_batches(x[:examples], batch_size, device)
    return (batches, list(loaded.y_train[:examples].to(device).split(batch_size))) if labels else batches


def _data_needs(o, entry, data, model_spec, device, console):
    """The options a method with needs_data takes from the command line: training inputs and labels, and
    ste's and zip's settings; a progress bar for ste's steps."""
    if not entry.needs_data:
        return {}
    batches, targets = _training_batches(data, model_spec, o.examples, o.batch_size, device, labels=True)
    return dict(module=lambda state: _module(model_spec, state, device), batches=batches, targets=targets,
                steps=o.steps, lr=o.lr, progress=_step_bar(console), **_zip_options(o))


def _zip_options(o):
    """zip_clusters' settings from the command line (align has only --alpha: its alignment ignores them)."""
    return dict(alpha=o.alpha, beta=getattr(o, 'beta', ZIP_BETA), within=getattr(o, 'within', ZIP_WITHIN))


def _step_bar(console):
    """progress(record) for learned matching: a rich progress bar over its steps, with the running loss."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    state = {}

    def progress(record):
        if 'step' not in record:
            return
        if 'bar' not in state:
            state['bar'] = Progress(TextColumn('learned matching'), BarColumn(), TextColumn('{task.completed}/'
                                    '{task.total} steps, loss {task.fields[loss]:.4f}, best {task.fields[best]:.4f}'),
                                    TimeRemainingColumn(), console=console, transient=True)
            state['bar'].start()
            state['task'] = state['bar'].add_task('ste', total=record['steps'], loss=record['loss'],
                                                  best=record['best'])
        state['bar'].update(state['task'], completed=record['step'], loss=record['loss'], best=record['best'])
        if record['step'] == record['steps']:
            state.pop('bar').stop()
    return progress


def _check_out(out, force):
    """The output directory, if it may be written: new, empty, or (with --force) a run this toolkit wrote
    that no process is writing (train_ensemble.check_replaceable). Checked before the work starts, and
    again just before writing."""
    te, out = _te(), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force and te.run_dir_writer(out) is None:
            raise RebasinError(f'{out} already exists; pass --force to replace it')
        te.check_replaceable(out)
    return out


def _write_run(out, states, sources, model_spec, config, force):
    """member_<i>.safetensors and config.json, written into a temporary directory that is then renamed to
    `out`: a failure never leaves a half-written run."""
    te, out = _te(), _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', suffix='.tmp', dir=out.parent))   # new: nobody else's
    try:
        for i, (state, source) in enumerate(zip(states, sources)):
            te.save_member(tmp / f'member_{i}.safetensors', state, model_spec, source=source)
        # the task is the members' own (a source run's config.json may predate the option, or be missing)
        te.write_json(tmp / 'config.json',
                      {**config, 'task': model_spec.get('task', 'classification'), 'format': te.FORMAT})
        if out.exists():   # held while replaced: a trainer that starts meanwhile is refused
            lock = te.lock_run_dir(out)   # refuses if one started since _check_out
            try:
                if any(p.name != '.lock' for p in out.iterdir()) and not te.is_our_run_dir(out):
                    raise RebasinError(f'refusing to replace {out}: something else was written into it meanwhile')
                shutil.rmtree(out)
            finally:
                if lock is not None:
                    lock.close()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_spec(spec, state, title):
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    perms, left = Table(title=escape(title), title_justify='left'), Table(title='Left unpermuted', title_justify='left')
    for table, columns in ((perms, ('permutation', 'size', 'tensors \\[axis]')), (left, ('tensor', 'shape', 'why'))):
        for name in columns:
            table.add_column(name, justify='right' if name == 'size' else 'left')
    for p, n in spec.perms.items():
        touched = {}   # (module, axis) -> its tensors: '3.norm1.{weight,bias}[0]'
        for key, names in spec.axes.items():
            for axis in (ax for ax, q in enumerate(names) if q == p):
                module, _, attr = key.rpartition('.')
                k = state[key].shape[axis] // n
                touched.setdefault((module, f'[{axis}]' + (f' (blocks of {k})' if k > 1 else '')), []).append(attr)
        name = f'{p} (in each block of {spec.within[p]})' if p in spec.within else p
        perms.add_row(escape(name), str(n), escape(', '.join(
            f'{m}.{a[0]}{ax}' if len(a) == 1 else f'{m}.{{{",".join(a)}}}{ax}' for (m, ax), a in touched.items())))
    for key, why in spec.unpermuted.items():
        left.add_row(escape(key), str(list(state[key].shape)), escape(why))
    console = Console()
    console.print(perms)
    console.print(f'{len(spec.perms)} permutations over {_channels(spec):,} channels')
    console.print(left)


def _console():
    from rich.console import Console
    return Console(soft_wrap=True, highlight=False)   # paths never split at the terminal's edge, nor coloured


def _why_skipped(path):
    """Why `merge` leaves out a path it was given (None: it is a model to merge). A glob over runs/ also
    picks up plots, unfinished runs and this script's own outputs; a path that does not exist, or a
    .safetensors file, is left to the loader, whose error is fatal (a typo, a corrupt member)."""
    te = _te()
    if path.is_file():
        return None if path.suffix == '.safetensors' else f'not a member checkpoint (a {path.suffix or "plain"} file)'
    if not path.is_dir():
        return None
    writer = te.run_dir_writer(path)
    if writer is not None:
        return f'still being written by {writer}'
    config = _raw_config(path)
    if config.get('command'):
        return f"the output of rebasin.py {config['command']}, not a training run (name its member files to merge it)"
    if isinstance(config.get('model'), dict) and config['model'].get('arch') == te.OWN:
        return f"a run of your own module {config['model'].get('module')}, which only its factory rebuilds"
    try:
        te.member_paths(path)   # refuses a directory without members and an unfinished training run
    except te.EnsembleError as e:
        return re.sub(rf'^{re.escape(str(path))} (is )?', '', ' '.join(str(e).split()))
    return None


def _raw_config(run_dir):
    """A run directory's config.json as it is ({} when missing or unreadable): read_config checks a training
    run's options and refuses this script's outputs, whose config.json is not a training run's."""
    try:
        config = json.loads((Path(run_dir) / 'config.json').read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _merge_sources(paths, console):
    """The models `merge` merges: every member of each finished run and each member file given. What is
    skipped is named in one line each, so that `merge runs/*` run twice merges the same models."""
    keep = []
    for path in map(Path, paths):
        why = _why_skipped(path)
        if why:
            console.print(f'skipped {path}: {why}', markup=False)
        else:
            keep.append(path)
    return _load_models(keep)


def _free_out(folder, name, force):
    """The default output folder/name; unless --force replaces it, the first free one of name, name_2,
    name_3, ...: running a command again writes beside its earlier output instead of failing."""
    out, i = Path(folder) / name, 1
    while out.exists() and not force:
        i += 1
        out = Path(folder) / f'{name}_{i}'
    return out


def _common_stem(names):
    """What the names share, cut at a separator: the seeds ..._s0, ..._s1 of one setting give its name."""
    stem = os.path.commonprefix(names)
    if any(n != stem for n in names):
        cut = max(stem.rfind(c) for c in '_-.')
        stem = stem[:cut] if cut > 0 else ''
    return stem.strip('_-.')


def _merge_name(found, o):
    """merge's default output name: what the source runs share, how many models, and how they were merged."""
    stem = _common_stem([m.path.parent.name for m in found])
    name = f'{stem}_merge{len(found)}' if stem else f'merge{len(found)}'
    extras = [o.method] * (o.method != next(iter(MERGE_METHODS))) + [f'partial{o.partial}'] * (o.partial is not None)
    if o.stats != 'auto':   # the default is left unnamed, as merges before --stats were
        extras.append({'reset-bn': 'resetbn', 'repair': 'repair', 'none': 'plain'}[o.stats])
    return '_'.join([name, *extras])


def _test_data(options, model_spec):
    """The source runs' test split (te.Data), or why it cannot be had offline (a string)."""
    te = _te()
    try:
        data = te.load_run_data(options, download=False)
    except (te.EnsembleError, OSError) as e:
        return ' '.join(str(e).split())
    if tuple(data.x_test.shape[1:]) != te.input_shape(model_spec):
        return (f'{data.name} has inputs of shape {tuple(data.x_test.shape[1:])}; '
                f'the models expect {te.input_shape(model_spec)}')
    return data


@torch.no_grad()
def _test_scores(data, sources, outputs, examples, device, tta=False):
    """Test accuracy (RMSE for regression) of each source model, of their mean, of their ensemble (probability
    averaging; regression: the mean output), and of each output model and the output run as an ensemble.
    sources: loaded models; outputs: state dicts of the first source's model spec; tta as the runs measured."""
    te, spec = _te(), sources[0].model_spec
    x, y = data.x_test[:examples], data.y_test[:examples]
    combiner, score = ('mean', 'rmse') if data.task == 'regression' else ('prob', 'acc')

    def metrics(states):
        logits = te.predict_logits([_module(spec, state, device) for state in states], x, tta=tta)
        return te.ensemble_metrics(logits, y.to(logits.device), combiner)

    src, out = metrics([m.state for m in sources]), metrics(outputs)
    return {'dataset': data.name, 'examples': len(y), 'combiner': combiner, 'tta': tta,
            f'source_test_{score}': src[f'member_{score}'],
            f'source_mean_test_{score}': sum(src[f'member_{score}']) / len(sources),
            f'source_ensemble_test_{score}': src[score],
            f'member_test_{score}': out[f'member_{score}'], f'test_{score}': out[score], 'test_loss': out['loss']}


def _print_scores(console, r, source_labels, output_labels):
    regression, n = 'test_rmse' in r, len(source_labels)
    key = 'rmse' if regression else 'acc'
    rows = [*zip(map(str, source_labels), r[f'source_test_{key}']),
            (f'mean of the {n} source models', r[f'source_mean_test_{key}']),
            (f'ensemble of the {n} ({"mean output" if regression else "probability averaging"})',
             r[f'source_ensemble_test_{key}']),
            *zip(output_labels, r[f'member_test_{key}'])]
    width = max(len(label) for label, _ in rows)
    of = f" of classes {_te().ints_text(r['classes'])}" if r.get('classes') else ''
    console.print(f"test {'RMSE' if regression else 'accuracy'} on {r['dataset']} ({r['examples']:,} test examples{of}"
                  f"{', test-time augmentation' if r['tta'] else ''}):", markup=False)
    for label, value in rows:
        shown = f'{value:.4g}' if regression else f'{100 * value:.2f}%'
        console.print(f'  {label.ljust(width)}  {shown}', markup=False)


def _data_differences(data, sources):
    """The data options in which the sources' runs differ from the test set's (synthetic data is made from
    its seed): each run is scored on one test set, which may not be the one it was trained for."""
    keys = ['dataset', 'subset', 'task'] + ['data_seed'] * (data['dataset'] in ('synthetic', 'synthetic-regression'))
    runs = [_raw_config(p) for p in dict.fromkeys(m.path.parent for m in sources)]
    seeds = [r.get('seed', 0) if r.get('data_seed') is None else r['data_seed'] for r in runs]
    runs = [{**r, 'data_seed': seed} for r, seed in zip(runs, seeds)]
    return [k for k in keys if any(r.get(k) != runs[0].get(k) for r in runs)]


def _evaluation(console, o, data, sources, outputs, device):
    """What config.json records under 'evaluation': the test scores of the sources and of the outputs
    ((label, state dict) pairs), printed beside each other; or why they were left out, in one line.
    A dataset that cannot be had offline never fails the command: its result is worth keeping."""
    if o.no_eval:
        return None
    differ = _data_differences(data, sources)
    if differ:
        console.print(f"note: the source runs differ in {', '.join(differ)}; the test set is "
                      f"{sources[0].path.parent}'s", markup=False)
    test = _test_data(data, sources[0].model_spec)
    if isinstance(test, str):
        console.print(f'test accuracy: skipped ({test})', markup=False)
        return {'skipped': test}
    tta = bool(_raw_config(sources[0].path.parent).get('tta'))   # as the source run measured its own
    scores = _test_scores(test, sources, [s for _, s in outputs], o.test_examples, device, tta)
    scores['classes'] = data.get('classes')
    _print_scores(console, scores, [m.path for m in sources], [label for label, _ in outputs])
    return scores


def _check_counts(o):
    for name in ('examples', 'bn_examples', 'batch_size', 'test_examples', 'max_iter', 'max_passes', 'steps'):
        value = getattr(o, name, None)
        if value is not None and value < 1:
            raise RebasinError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise RebasinError(f'--lr must be a positive number, got {o.lr}')
    for name, value in _zip_options(o).items():
        if value is not None and not 0 <= value <= 1:
            raise RebasinError(f'--{name} must be between 0 and 1, got {value}')
    if getattr(o, 'partial', None) is not None and o.partial < 0:
        raise RebasinError(f'--partial must be at least 0, got {o.partial}')


def _align(o):
    """rebasin.py align, given its options: validate, align, evaluate, then write."""
    te, start, console = _te(), time.perf_counter(), _console()
    entry = merge_method(o.method, '--method')
    _check_counts(o)
    name = o.b.name if o.b.is_dir() else f'{o.b.parent.name}_{o.b.stem}'
    out = _check_out(o.out or _free_out('aligned', f'{name}_aligned', o.force), o.force)
    ref, models, dev = _load_models([o.a])[0], _load_models([o.b]), te.resolve_device(o.device)
    _, spec = _permutation_spec_of(ref.model_spec)
    check_compatible(spec, [ref.state] + [m.state for m in models], [str(m.path) for m in [ref] + models])
    data, options = _data_options([o.b, o.a], o.dataset, o.data_dir), dict(max_iter=o.max_iter, seed=o.seed, device=dev)
    options.update(_data_needs(o, entry, data, ref.model_spec, dev, console))
    keys, states, records = _matched_keys(spec, ref.state), [], []
    for m in models:
        perm = entry.align(spec, ref.state, m.state, **options)
        states.append(apply_permutation(spec, perm, m.state))
        dist = [math.sqrt(_sq_distance({k: ref.state[k] for k in keys}, s)) for s in (m.state, states[-1])]
        records.append(dict(source=str(m.path), sweeps=len(perm.objective) - 1 if perm.objective else None,
                            objective=perm.objective, distance_before=dist[0], distance_after=dist[1],
                            channels_moved=_channels_moved(spec, perm)))
        how = (f'after {records[-1]["sweeps"]} sweep(s)' if perm.objective else f'by {o.method} matching'
               + (f' on {o.examples} training images' if entry.needs_data else ''))
        console.print(f'{m.path}: ‖A − B‖ {dist[0]:.4g} -> {dist[1]:.4g} {how}, '
                      f'{records[-1]["channels_moved"]} of {_channels(spec)} channels moved', markup=False)
    evaluation = _evaluation(console, o, data, [ref] + [m for m in models if m.path != ref.path],   # each once
                             [(f'{m.path} aligned', s) for m, s in zip(models, states)], dev)
    # 'alignments', not 'members': in a run's config.json 'members' is the ensemble size, and read_config checks it
    config = dict(command='align', method=o.method, reference=str(ref.path), sources=[str(m.path) for m in models],
                  model=ref.model_spec, seed=o.seed, max_iter=o.max_iter, alignments=records, **_known(data),
                  examples=o.examples if entry.needs_data else None, **_method_settings(o), evaluation=evaluation,
                  time_s=time.perf_counter() - start, **te.environment(dev))
    _write_run(out, states, config['sources'], ref.model_spec, config, o.force)
    console.print(f'wrote {out}', markup=False)


def _merge(o):
    """rebasin.py merge, given its options: validate, merge, repair the statistics, evaluate, then write."""
    te, start, console = _te(), time.perf_counter(), _console()
    entry = merge_method(o.method, '--method')
    _check_counts(o)
    _check_tune(o)
    o.stats = _requested_statistics(o)
    if o.partial is not None and (o.method != 'zip' or o.stats == 'repair'):
        raise RebasinError('--partial K zips the first K permutation groups: it needs --method zip, without --repair')
    found = _merge_sources(o.models, console)
    if len(found) < 2:
        raise RebasinError(f'merge needs at least two models; the paths given hold {len(found)}')
    out = _check_out(o.out or _free_out('merges', _merge_name(found, o), o.force), o.force)
    net, spec = _permutation_spec_of(found[0].model_spec)
    check_compatible(spec, [m.state for m in found], [str(m.path) for m in found])
    dev, data, distance = te.resolve_device(o.device), _data_options([m.path for m in found], o.dataset, o.data_dir), []
    held = _held_out(o, found, data, console) if o.tune else None
    stats, batches, why = _statistics_plan(o, net, found[0].model_spec, data, dev, console)   # before the long part
    options = dict(max_iter=o.max_iter, seed=o.seed, device=dev, max_passes=o.max_passes, tol=o.tol)
    options.update(_data_needs(o, entry, data, found[0].model_spec, dev, console))
    bar = options.get('progress', lambda record: None)
    options['progress'] = lambda record: (_merge_progress(console, record, distance), bar(record))
    runs = len({m.path.parent for m in found})
    console.print(f'merging {len(found)} models from {runs} run{"s" * (runs != 1)}', markup=False)
    o.tuned = _tune(o, console, found, spec, options, held) if o.tune else None
    if o.partial is not None:
        return _partial_merge(o, console, found, spec, options, data, dev, out, start)
    merged, perms = merge_models(o.method, spec, [m.state for m in found], **options)
    if stats:
        auto = f' (--stats auto: {why}; --stats none turns it off)' if o.stats == 'auto' else ''
        console.print(f'statistics: {STATISTICS_DONE[stats]} on {sum(map(len, batches)):,} training images{auto}',
                      markup=False)
        merged = _restored(stats, net, merged, spec, perms, found, batches, dev)
    evaluation = _evaluation(console, o, data, found, [('merged', merged)], dev)
    config = dict(command='merge', method=o.method, sources=[str(m.path) for m in found], model=found[0].model_spec,
                  seed=o.seed, max_iter=o.max_iter, max_passes=o.max_passes, tol=o.tol,
                  passes=len(distance) - 1 if distance else None, distance=distance,
                  sweeps=[len(q.objective) - 1 if q.objective else None for q in perms], stats=o.stats,
                  reset_bn=stats == 'reset-bn', repair=stats == 'repair', stats_why=why,
                  bn_examples=o.bn_examples if stats else None,
                  examples=o.examples if entry.needs_data else None, **_method_settings(o), **_known(data),
                  evaluation=evaluation,
                  time_s=time.perf_counter() - start, **te.environment(dev))
    _write_run(out, [merged], [config['sources']], found[0].model_spec, config, o.force)
    how = (f'in {len(distance) - 1} pass{"es" * (len(distance) != 2)}' if distance else f'by {o.method} matching'
           + (f' on {o.examples} training images' if entry.needs_data else ''))
    console.print(f'merged {len(found)} models {how}, {time.perf_counter() - start:.1f} s: wrote {out}', markup=False)


def _restored(stats, net, merged, spec, perms, found, batches, device):
    """The merged state dict with its statistics restored: BatchNorm's recomputed (reset-bn), or each channel
    given the mean of the models' channel statistics, each model in the merged model's basin (repair)."""
    net.load_state_dict(merged)
    net.to(device)
    if stats == 'reset-bn':
        return reset_bn(net, batches)
    ends = [_module(m.model_spec, apply_permutation(spec, q, m.state), device) for q, m in zip(perms, found)]
    return repair_many(ends, [1 / len(ends)] * len(ends), net, batches)


def _requested_statistics(o):
    """merge's --stats, with --reset-bn and --repair (its shorter spellings, older than it) folded in."""
    if o.stats not in STATISTICS:
        raise RebasinError(f"unknown --stats '{o.stats}': use one of {', '.join(STATISTICS)}")
    flags = [name for name, given in (('reset-bn', o.reset_bn), ('repair', o.repair)) if given]
    if len(flags) == 2:
        raise RebasinError('--reset-bn and --repair are alternatives (--repair also recomputes the statistics)')
    if flags and o.stats not in ('auto', flags[0]):
        raise RebasinError(f'--{flags[0]} is --stats {flags[0]}: it cannot go with --stats {o.stats}')
    return flags[0] if flags else o.stats


def _statistics_plan(o, net, model_spec, data, device, console):
    """(what restores the merged model's statistics: 'reset-bn', 'repair' or None; the training batches it
    reads; why, for --stats auto). The batches are loaded before the merge, so that an explicit choice fails
    before the long part; auto never fails a merge: where the data cannot be loaded it says so in one line
    and merges the plain average. Zipping restores statistics of its own."""
    te, stats, why = _te(), o.stats, None
    if stats in ('none', 'auto') and o.method == 'zip':
        return None, None, 'zipping restores them itself'
    if stats == 'none':
        return None, None, None
    example = torch.zeros(1, *te.input_shape(model_spec))
    if stats == 'auto':
        stats, why = auto_statistics(net, example)
        if stats is None:
            console.print(f'statistics: the plain average (--stats auto: {why})', markup=False)
            return None, None, why
    elif stats == 'repair':
        repair_layers(net, example)
    elif not _batchnorms(net):
        raise RebasinError('--reset-bn: these models have no BatchNorm layers (--repair rescales their layers)')
    try:
        return stats, _training_batches(data, model_spec, o.bn_examples, o.batch_size, device), why
    except (RebasinError, te.EnsembleError, OSError) as e:
        if o.stats != 'auto':
            raise
        why = f"{STATISTICS_DONE[stats]} skipped, no training data ({' '.join(str(e).split())})"
        console.print(f'statistics: {why}; the merged model is the plain average', markup=False)
        return None, None, why


def _method_settings(o):
    """What config.json records of ste's and zip's own options (nothing for the other methods)."""
    if o.method == 'zip' and getattr(o, 'tuned', None):
        return {**_zip_options(o), 'tuned': o.tuned}
    return dict(steps=o.steps, lr=o.lr) if o.method == 'ste' else _zip_options(o) if o.method == 'zip' else {}


def _partial_merge(o, console, found, spec, options, data, dev, out, start):
    """merge --method zip --partial K: the partially zipped model, its branches' probabilities averaged,
    written as the one member of a run; evaluated and recorded as such."""
    te, params = _te(), [m.state for m in found]
    branches, shared = partial_zip(spec, params, o.partial, options['module'], options['batches'], device=dev,
                                   **_zip_options(o))
    names = {k for k, _ in _te().build_model(found[0].model_spec).named_parameters()}
    one = sum(t.numel() for k, t in params[0].items() if k in names)
    trunk = sum(params[0][k].numel() for k in shared if k in names)
    count = trunk + len(branches) * (one - trunk)
    evaluation = _evaluation(console, o, data, found, [(f'branch {i}', b) for i, b in enumerate(branches)], dev)
    # One member: the branches side by side, their probabilities averaged (train_ensemble.Branches), so that
    # load_member rebuilds the partially zipped model itself. The trunk is stored once per branch.
    model = te.branches_spec(found[0].model_spec, len(branches))
    state = {f'branches.{i}.{k}': v for i, branch in enumerate(branches) for k, v in branch.items()}
    config = dict(command='merge', method='zip', partial=o.partial, sources=[str(m.path) for m in found],
                  model=model, seed=o.seed, **_method_settings(o), examples=o.examples, members=1,
                  branches=len(branches), shared=shared, parameters=count, parameters_per_model=one, stats=o.stats,
                  reset_bn=True, **_known(data), evaluation=evaluation, time_s=time.perf_counter() - start,
                  **te.environment(dev))
    _write_run(out, [state], [config['sources']], model, config, o.force)
    if evaluation and 'test_acc' in evaluation:
        console.print(f"  partially zipped model (the branches' ensemble)  {100 * evaluation['test_acc']:.2f}%",
                      markup=False)
    console.print(f'zipped the first {o.partial} of {len(spec.perms)} permutation groups of {len(found)} models: '
                  f'{len(branches)} branches averaged, {count:,} parameters ({count / one:.2f}x one model), '
                  f'{time.perf_counter() - start:.1f} s: wrote {out}', markup=False)


def _check_tune(o):
    """merge --tune's refusals, before any work: zip alone is tuned, and not with the settings it chooses."""
    if not o.tune:
        return
    if o.method != 'zip':
        raise RebasinError(f"--tune chooses zip's --alpha and --beta: it needs --method zip, not {o.method}")
    given = [f'--{name}' for name in ('alpha', 'beta') if name in getattr(o, 'explicit', ())]
    if given:
        raise RebasinError(f"--tune chooses {' and '.join(given)} on held-out images: give "
                           f"{'them' if len(given) > 1 else 'it'} by hand or pass --tune, not both")


def _example_bytes(x):
    """Each example's bytes: which images two splits share."""
    return [bytes(row) for row in x.reshape(len(x), -1).cpu().numpy()]


def _held_out(o, found, data, console):
    """merge --tune's held-out images (floats, as the batches are) and labels: the source runs' validation
    splits (each with its run's classes), interleaved run by run, less any image that a source run trained on
    or that the correlations read (--examples), each once, at most TUNE_EXAMPLES. Never the test set."""
    te, runs = _te(), list(dict.fromkeys(m.path.parent for m in found))
    configs = [_raw_config(run) for run in runs]
    if not configs[0].get('val_size'):
        raise RebasinError(f'--tune scores zip settings on held-out images, but {runs[0]} has no validation '
                           'split: train with --val-size N, or pass --alpha and --beta by hand')
    if data.get('task') == 'regression':
        raise RebasinError('--tune scores accuracy: it needs a classification task; pass --alpha and --beta by hand')
    seen, splits = set(_example_bytes(te.load_run_data(data, download=False).x_train[:o.examples])), []
    for run, config in zip(runs, configs):
        loaded = te.load_run_data({**config, 'dataset': data['dataset'], 'data_dir': data['data_dir']},
                                  download=False)
        seen.update(_example_bytes(loaded.x_train))
        if loaded.x_val is None:
            console.print(f"note: {run} has no validation split; --tune scores on the other runs'", markup=False)
        else:
            splits.append((loaded.x_val, loaded.y_val))
    parts = []
    for x, y in splits:   # after every run's training images are known; an image in two splits counts once
        keep = [i for i, row in enumerate(_example_bytes(x)) if row not in seen and not seen.add(row)]
        parts.append((x[keep], y[keep]))
    rank = torch.cat([torch.arange(len(y)) for _, y in parts])
    if not len(rank):
        raise RebasinError('--tune: every validation image of the source runs is one that another run trained on '
                           'or that the correlations read; train them with one --val-size, or pass --alpha and --beta')
    order = torch.argsort(rank, stable=True)[:TUNE_EXAMPLES]   # the first of each run's split, then the next...
    return te.to_float_images(torch.cat([x for x, _ in parts])[order]), torch.cat([y for _, y in parts])[order]


def _tune(o, console, found, spec, options, held):
    """merge --tune: ZipIt's α and β from ZIP_GRID (--within fixed where given), scored on the held-out images
    (tune_zip); set as o's and the merge options' alpha, beta and within; returns what config.json records as
    'tuned'."""
    grid = {**ZIP_GRID, 'within': (o.within,)} if 'within' in getattr(o, 'explicit', ()) else ZIP_GRID
    x, y = held
    point, accuracy, scores = tune_zip(spec, [m.state for m in found], options['module'], options['batches'], x, y,
                                       grid=grid, k=o.partial, device=options['device'], progress=_grid_bar(console))
    o.alpha, o.beta, o.within = point['alpha'], point['beta'], point['within']
    options.update(_zip_options(o))   # the merge's own settings, taken from o before the tuning
    console.print(f"tuned: α {o.alpha:g}, β {o.beta:g}, within {o.within:g} (best of {len(scores)} grid points): "
                  f'{100 * accuracy:.2f}% on {len(y):,} held-out validation images', markup=False)
    return dict(alpha=o.alpha, beta=o.beta, within=o.within, held_out_accuracy=accuracy, held_out_examples=len(y))


def _grid_bar(console):
    """progress(record) for merge --tune on a terminal: a rich progress bar over the grid points (None elsewhere)."""
    if not console.is_terminal:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    state = {'best': 0.0}

    def progress(record):
        if 'bar' not in state:
            state['bar'] = Progress(TextColumn('tuning zip'), BarColumn(), TextColumn(
                '{task.completed}/{task.total} grid points, best {task.fields[best]:.2%}'), TimeRemainingColumn(),
                console=console, transient=True)
            state['bar'].start()
            state['task'] = state['bar'].add_task('tune', total=record['points'], best=0.0)
        state['best'] = max(state['best'], record['accuracy'])
        state['bar'].update(state['task'], completed=record['point'], best=state['best'])
        if record['point'] == record['points']:
            state.pop('bar').stop()
    return progress


def _merge_progress(console, record, distance):
    if 'distance' in record:
        distance.append(record['distance'])
        console.print(f"{'start' if record['pass'] == 0 else 'pass ' + str(record['pass'])}: "
                      f"Σ‖θ_i − mean of the others‖² = {record['distance']:.6g}")


def make_app():
    """The typer application: spec, align, merge."""
    import typer
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      context_settings={'help_option_names': ['-h', '--help']},
                      help='Git re-basin: permutation specs (spec), alignment of one run to another (align), '
                           'and merging several models into one (merge).')

    @app.callback()
    def versions(version: bool = typer.Option(False, '--version', help='Print the versions (checkpoint format, '
                                              'torch) and exit.', is_eager=True, callback=print_version)):
        pass

    for add_command in (_add_spec, _add_align, _add_merge):
        add_command(app, typer)
    return app


def print_version(asked):
    """--version, as train_ensemble.py prints its own: the checkpoint format it reads and writes (train_ensemble's,
    which a copied rebasin.py may lack) and torch's version."""
    if asked:
        try:
            print(importlib.import_module('train_ensemble').version_line('rebasin.py'))
        except ImportError:
            print(f'rebasin.py: checkpoints none (needs train_ensemble.py); torch {torch.__version__}')
        raise SystemExit(0)


METHOD_HELP = 'How channels are matched, one of: ' + '; '.join(f'{k} ({m.help})' for k, m in MERGE_METHODS.items())
NO_EVAL_HELP = ("Skip the test accuracy (RMSE for regression) of the sources and the result, which is otherwise "
                "printed and recorded in config.json's 'evaluation'.")
TEST_EXAMPLES_HELP = 'Evaluate on at most this many test examples (default: all of them).'
EXAMPLES_HELP = ('--method activation, ste, zip: training images whose activations are correlated (ste: whose '
                 'loss is lowered).')
STEPS_HELP = '--method ste: optimizer steps of learned matching, one training batch each.'
LR_HELP = "--method ste: Adam's learning rate for the soft weights."
ALPHA_HELP = ("--method zip: ZipIt's α, a cluster's correlations multiplied by it after each merge (0 to 1; 0: a "
              "merged feature merges no more with its models'; the authors' default 0.3).")
BETA_HELP = ("merge --method zip: ZipIt's β, each model's budget of merges within itself as a fraction of merges / N "
             "(0 to 1; 0: across models only; the authors' default 0.125; unset: no budget).")
TUNE_HELP = (f"merge --method zip: choose --alpha and --beta from rebasin.ZIP_GRID (the authors' grid; within 1 "
             'unless --within is given) by accuracy on held-out images: the source runs\' validation splits '
             f'(train with --val-size N), at most {TUNE_EXAMPLES:,}, none that a source run trained on; never the '
             'test set. With --partial K, of the partially zipped model.')
WITHIN_HELP = ("merge --method zip: weight of a pair of features within one model against a pair across models "
               "(0 to 1; this toolkit's own, 1 in the authors' ZipIt).")
STATS_HELP = ("How the merged model's channel statistics are restored after averaging. "
              + ' '.join(f'{k}: {v}.' for k, v in STATISTICS.items()))
MATCH, BN, DATA = 'Matching', 'Statistics after averaging', 'Data and evaluation'   # --help's option panels


def _add_spec(app, typer):
    """Register `rebasin.py spec` (typer is passed in: it is imported only when the command line runs)."""
    @app.command('spec', short_help="Print a model's permutations and what stays unpermuted.")
    def spec_command(
        model: Path = typer.Argument(..., help='A member_<i>.safetensors file, or a run directory (its first member).'),
        json_out: Optional[Path] = typer.Option(None, '--json', help='Also write the spec as JSON to this file.'),
    ):
        """Print a model's permutation structure: each permutation, its size, the tensors and axes it touches,
        and which tensors are left unpermuted and why. --json writes it with its 'axes' table, which
        rebasin.spec_from_table reads back (edit it for a model that tracing cannot handle)."""
        with _user_errors():
            m = _load_models([model])[0]
            _, spec = _permutation_spec_of(m.model_spec)
            _print_spec(spec, m.state, f"Permutation spec of {m.path} ({m.model_spec.get('arch', '?')})")
            if json_out:
                _te().write_json(json_out, asdict(spec))


def _shared_options(typer):
    """The options align and merge both take, each written once (typer is imported only when the command
    line runs, so they are made here)."""
    return dict(
        force=typer.Option(False, '--force', help='Replace --out (or the default) if it already exists.'),
        method=typer.Option(next(iter(MERGE_METHODS)), help=METHOD_HELP, rich_help_panel=MATCH),
        examples=typer.Option(BN_EXAMPLES, help=EXAMPLES_HELP, rich_help_panel=MATCH),
        steps=typer.Option(STE_STEPS, help=STEPS_HELP, rich_help_panel=MATCH),
        lr=typer.Option(STE_LR, help=LR_HELP, rich_help_panel=MATCH),
        alpha=typer.Option(ZIP_ALPHA, help=ALPHA_HELP, rich_help_panel=MATCH),
        beta=typer.Option(ZIP_BETA, help=BETA_HELP, rich_help_panel=MATCH),
        within=typer.Option(ZIP_WITHIN, help=WITHIN_HELP, rich_help_panel=MATCH),
        data_dir=typer.Option(None, help="Where that dataset lives (default: the source run's, else data/).",
                              rich_help_panel=DATA),
        batch_size=typer.Option(BN_BATCH, help='Batch size of the passes over training images.', rich_help_panel=DATA),
        no_eval=typer.Option(False, '--no-eval', help=NO_EVAL_HELP, rich_help_panel=DATA),
        test_examples=typer.Option(None, help=TEST_EXAMPLES_HELP, rich_help_panel=DATA),
    )


def _add_align(app, typer):
    """Register `rebasin.py align` (typer is passed in: it is imported only when the command line runs)."""
    shared = _shared_options(typer)

    @app.command(short_help="Permute B's members into A's basin (the same functions).")
    def align(
        a: Path = typer.Argument(..., help='The reference: a member file, or a run directory (its member_0).'),
        b: Path = typer.Argument(..., help='The models to permute: a member file, or a run directory (every member).'),
        out: Optional[Path] = typer.Option(None, help='Output run directory (default: aligned/<B>_aligned, '
                                                      'numbered _2, _3, ... if taken).'),
        device: str = typer.Option('auto', help='Where cost matrices are built: auto (cuda if available), cpu '
                                                'or cuda.'),
        force: bool = shared['force'],
        method: str = shared['method'],
        max_iter: int = typer.Option(MAX_SWEEPS, help='Most weight-matching sweeps over all permutations.',
                                     rich_help_panel=MATCH),
        seed: int = typer.Option(0, help='Seed of the random order of the permutations within a sweep.',
                                 rich_help_panel=MATCH),
        examples: int = shared['examples'],
        steps: int = shared['steps'],
        lr: float = shared['lr'],
        alpha: float = shared['alpha'],
        dataset: Optional[str] = typer.Option(None, help="Data for the test accuracy and the training images "
                                                         "(default: B's run's).", rich_help_panel=DATA),
        data_dir: Optional[Path] = shared['data_dir'],
        batch_size: int = shared['batch_size'],
        no_eval: bool = shared['no_eval'],
        test_examples: Optional[int] = shared['test_examples'],
    ):
        """Permute B's members into A's basin by weight matching (or activation matching). Each output member
        computes exactly the same function as its source; only the order of its hidden channels changes."""
        o = SimpleNamespace(**locals())
        with _user_errors():
            _align(o)


def _add_merge(app, typer):
    """Register `rebasin.py merge` (typer is passed in: it is imported only when the command line runs)."""
    shared = _shared_options(typer)

    @app.command(short_help='Merge models (MergeMany) into one, printing its accuracy.')
    def merge(
        ctx: typer.Context,
        models: List[Path] = typer.Argument(..., help='Run directories or member files (every member is merged); '
                                                      'paths that are not finished runs are skipped and named.'),
        out: Optional[Path] = typer.Option(None, help="Output run directory (default: merges/<the runs' shared "
                                                      "name>_merge<N>, numbered _2, _3, ... if taken)."),
        device: str = typer.Option('auto', help='Where to match and compute statistics: auto (cuda if available), '
                                                'cpu or cuda.'),
        force: bool = shared['force'],
        method: str = shared['method'],
        max_iter: int = typer.Option(MAX_SWEEPS, help='Most weight-matching sweeps per alignment step.',
                                     rich_help_panel=MATCH),
        max_passes: int = typer.Option(MAX_PASSES, help='Most MergeMany passes over all models.',
                                       rich_help_panel=MATCH),
        tol: float = typer.Option(PASS_TOL, help='Stop when a pass shrinks the total distance by less than this '
                                                 'fraction.', rich_help_panel=MATCH),
        seed: int = typer.Option(0, help='Seed of the random orders (models within a pass, permutations within '
                                         'a sweep).', rich_help_panel=MATCH),
        examples: int = shared['examples'],
        steps: int = shared['steps'],
        lr: float = shared['lr'],
        alpha: float = shared['alpha'],
        beta: Optional[float] = shared['beta'],
        within: float = shared['within'],
        partial: Optional[int] = typer.Option(None, help='--method zip: zip only the first K permutation groups and '
                                                         'keep the rest of each model as a branch (their '
                                                         'probabilities averaged, in one member); 0 is the ensemble.',
                                              rich_help_panel=MATCH),
        tune: bool = typer.Option(False, '--tune', help=TUNE_HELP, rich_help_panel=MATCH),
        stats: str = typer.Option('auto', help=STATS_HELP, rich_help_panel=BN),
        reset_bn: bool = typer.Option(False, '--reset-bn', help='Same as --stats reset-bn.', rich_help_panel=BN),
        repair: bool = typer.Option(False, '--repair', help='Same as --stats repair.', rich_help_panel=BN),
        bn_examples: int = typer.Option(BN_EXAMPLES, help='Training images that the statistics are measured on.',
                                        rich_help_panel=BN),
        dataset: Optional[str] = typer.Option(None, help='Data for the test accuracy and the training images of '
                                                         "--stats or --method activation (default: the first "
                                                         "run's).", rich_help_panel=DATA),
        data_dir: Optional[Path] = shared['data_dir'],
        batch_size: int = shared['batch_size'],
        no_eval: bool = shared['no_eval'],
        test_examples: Optional[int] = shared['test_examples'],
    ):
        """MergeMany: align every model to the mean of the others until that distance stops shrinking, then
        average them (BatchNorm statistics too) into one model in the first model's basin, and restore its
        channel statistics on training images (--stats). Prints the merged model's test accuracy beside its
        sources'."""
        explicit = {name for name in ('alpha', 'beta', 'within')   # --tune chooses these where not given
                    if ctx.get_parameter_source(name).name in ('COMMANDLINE', 'ENVIRONMENT')}
        o = SimpleNamespace(**locals())
        with _user_errors():
            _merge(o)


def _missing_for_cli():
    """What the command line lacks, in words (None: nothing): typer and rich, and train_ensemble.py beside
    this file to rebuild networks from checkpoints and load data."""
    lacks = []
    for package in ('typer', 'rich'):
        try:
            importlib.import_module(package)
        except ImportError:
            lacks.append(package)
    if lacks:
        return f"the package{'s' * (len(lacks) > 1)} {' and '.join(lacks)} (pip install {' '.join(lacks)})"
    try:
        importlib.import_module('train_ensemble')
    except ImportError as e:
        if not Path(__file__).with_name('train_ensemble.py').exists():
            return 'train_ensemble.py beside it (to rebuild networks from checkpoints and load data)'
        return f'train_ensemble.py, which does not import here ({e})'
    return None


def main():
    """The command line; copied alone, a one-line message saying what it needs instead of a traceback."""
    lacks = _missing_for_cli()
    if lacks:
        print_version('--version' in sys.argv[1:])   # needs torch alone
        command = next((a for a in sys.argv[1:] if a in ('spec', 'align', 'merge')), None)
        print(f"error: rebasin.py{' ' + command if command else ''} needs {lacks}; copied alone, rebasin.py "
              'offers its Python API (permutation_spec, weight_matching, merge_many, ...) with torch and scipy',
              file=sys.stderr)
        raise SystemExit(2)
    make_app()()


if __name__ == '__main__':
    main()
