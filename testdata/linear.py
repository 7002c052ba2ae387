#!/usr/bin/env python3
"""Generate the fixtures of "every BatchNormalization that can fold, folds" (issue 15).

What it makes
-------------
Exports of small models whose BatchNorms sit next to linear layers, transposed convolutions,
1-D/3-D convolutions, or *before* a layer (BN then Linear / BN then 1x1 Conv), rather than after
a 2-D convolution branch (generate.py, families.py cover those):

  efficientvit_m     timm ``EfficientVitMsra`` (EfficientViT-M, msra), reduced: ``ConvNorm``
                     (Conv2d+BN) everywhere, cascaded group attention, head ``NormLinear``
                     (GlobalAveragePool -> Flatten -> BN1d -> Linear)
  levit              timm ``LevitDistilled`` (LeViT), reduced to one stage: ``LinearNorm`` on
                     tokens (Linear, then BN1d over ``x.flatten(0, 1)``, ``reshape_as``), attention,
                     two ``NormLinear`` heads (mean over tokens -> BN1d -> Linear) summed and / 2
  levit_subsample    the same with a second stage (``LevitDownsample``: ``AttentionDownsample``
                     with ``Subsample``); tract 0.23.9 cannot run it (``tract_runs: false``)
  repvit             timm ``RepVit`` (RepViT) with ``distillation=True``, reduced: ``RepVggDw``,
                     ``ConvNorm``, SE, ``RepVitClassifier`` (mean -> BN1d -> Linear, twice, / 2)
  nextvit            timm ``NextStage`` of ``NextConvBlock`` + ``NextTransformerBlock`` (Next-ViT)
                     behind a ``ConvNormAct`` stem, final BN2d and ``ClassifierHead``: BN2d before
                     1x1 convs (``merge_pre_bn``), BN2d before q/k/v Linears over tokens, BN1d
                     after AvgPool1d before k/v
  convtranspose_bn   hand-written decoder: ConvTranspose2d+BN2d (k2 s2), grouped ConvTranspose2d
                     (no bias) + BN2d
  conv1d_bn          hand-written Conv1d+BN1d, Conv1d(1x1)+BN1d
  conv3d_bn          hand-written Conv3d+BN3d, Conv3d(1x1x1, stride 2)+BN3d
  linear_bn          hand-written MLP on [N, C]: Linear+BN1d, Linear(no bias)+BN1d, BN1d -> Dropout
                     -> Linear; also exported in training mode and with initializers as graph inputs
                     (both must be refused)
  linear_bn_tokens   hand-written token MLP on [N, T, C]: Linear then BN1d through
                     ``transpose(1, 2)``, Linear(no bias) then BN1d through ``reshape(N*T, C)``,
                     BN1d (transposed) then Linear
  layer_scale        hand-written: Linear then timm ``LayerScale`` (Mul by gamma[C]) in a residual,
                     per-channel Mul/Add before a Linear and after it, a 2-D head with Mul after Gemm
  bn_conv            hand-written BN2d -> Conv1x1 (pads 0), BN2d -> grouped Conv3x3 (pads 0, stride 2)
  gemm_attrs         hand-written ONNX graph (onnx.helper, not an export): Gemm with transA=1,
                     alpha/beta != 1 then BN; BN -> Gemm(transB=1, alpha, beta, C [1, N]); Gemm
                     without C then BN
  bn_conv_pad        NEGATIVE: BN2d -> Conv3x3 with padding 1 (must stay; the Conv+BN before folds)
  bn_shared_input    NEGATIVE: Conv -> BN -> ReLU where the Conv output also feeds the residual Add;
                     the same with Gemm -> BN1d (both BNs must stay)
  reshape_mix        NEGATIVE: Linear -> Reshape [N, T, C] -> [N, C, T] (a view, not a transpose:
                     mixes tokens and channels) -> BN1d -> Reshape back -> Linear, and BN1d over
                     the token axis of [N, T, C] with T == C (both must stay)

The timm models are built from timm's own classes (timm 1.0.31, pinned in requirements.txt) with
tiny widths and depths; their deploy model is ``timm.utils.reparameterize_model`` (each module's
``fuse()`` / ``reparameterize()``), for nextvit followed by the stock Conv+BN fold
(``torch.nn.utils.fusion.fuse_conv_bn_eval``) of the ``ConvNormAct`` / ``PatchEmbed`` /
``ConvAttention`` pairs that timm leaves to the exporter, and with the final ``norm`` (BN2d ->
pool -> Linear) left in place as timm leaves it. Every timm-made deploy model is asserted to have
no BatchNorm module except nextvit's final norm. The hand-written models are folded by hand
(float64, see ``fold_*``); the negative ones keep the BNs that must not fold.

Every BatchNorm gets random statistics from a fixed seed (running_mean ~ N(0, 0.5), running_var ~
U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.3): ``families.randomize``), and parameters timm
initializes to zero or a constant (attention biases, Linear biases, LayerScale gammas) get random
values too (``randomize_rest``); then ``eval()``. The deploy model is asserted to reproduce the
training-structure output within 1e-5 relative to max|y|.

Forms (see FORMS): TorchScript exporter with and without constant folding (opset 17), the dynamo
exporter (opset 18, default external data, node metadata trimmed to
``pkg.torch.onnx.name_scopes`` as in families.py), and the deploy model (TorchScript, folding).
linear_bn also has ``ts_train_op17`` (TrainingMode.TRAINING, batch 2) and
``ts_nofold_op17_initin`` (``keep_initializers_as_inputs=True``: weights are graph inputs, not
constants). gemm_attrs has one form, ``onnx_op17`` (written with onnx.helper, opset 17, IR 8), and
its deploy counterpart. No export form failed for any model.

Outputs (relative to this folder):
  linear/<model>/<form>.onnx (+ .onnx.data)   one export
  linear/<model>/input.pb, output.pb          f32 TensorProto input ~ N(0, 1), PyTorch's output
  linear/<model>/input_train.pb, output_train.pb   batch-2 input of the training-mode form
  linear/manifest.json                        one entry per fixture (schema of
                                              families/manifest.json plus bn_before, bn_after,
                                              bn_min, summed_heads, source, deploy_method and,
                                              where tract 0.23.9 cannot run a file, tract_runs:
                                              false with tract_note; see README.md)

Every file is checked with ``onnx.checker.check_model(path, full_check=True)`` and run in ONNX
Runtime against PyTorch (relative error, < 1e-4 asserted).

  python testdata/linear.py                  # rewrite testdata/linear/ (~70 s on 1 thread)
  python testdata/linear.py levit,repvit     # redo some models, keep the other manifest entries
  python testdata/linear.py --sites [MODELS] # print the ONNX neighbourhood of every BN of the
                                             # committed files (no export)

Use the pinned versions of requirements.txt; other torch/onnx/timm versions emit other graphs.
"""

import collections
import copy
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import onnx.shape_inference
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate as common  # noqa: E402  (quiet, export_ts, save_tensor, op_histogram, rel_err, run_ort)
import families as fam  # noqa: E402  (randomize, export_dynamo, make_form, FORMS)

import timm  # noqa: E402
from timm.layers import ClassifierHead, LayerScale  # noqa: E402
from timm.models.efficientvit_msra import EfficientVitMsra  # noqa: E402
from timm.models.levit import LevitDistilled  # noqa: E402
from timm.models.nextvit import ConvNormAct, NextConvBlock, NextStage, NextTransformerBlock  # noqa: E402
from timm.models.repvit import RepVit  # noqa: E402
from timm.utils import reparameterize_model  # noqa: E402

OUT = os.path.join(HERE, "linear")
SEED = 20240415
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ============================================================================================
# Fold arithmetic for the hand-written models (float64, written back as float32)
# ============================================================================================

def bn_affine(bn):
    """BatchNorm in eval mode as y = t * x + s (float64)."""
    t = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return t, bn.bias.double() - bn.running_mean.double() * t


def _set(module, weight, bias):
    module.weight.data = weight.float().contiguous()
    if module.bias is None:
        module.bias = nn.Parameter(bias.float().contiguous())
    else:
        module.bias.data = bias.float().contiguous()


def _bias(module, n):
    return (module.bias.double() if module.bias is not None
            else torch.zeros(n, dtype=torch.float64))


def fold_after(layer, t, s):
    """layer (Linear, ConvNd, ConvTransposeNd) followed by y = t * x + s per output channel."""
    w = layer.weight.double()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        # weight [C_in, C_out / g, k...]: output channel of w[i, j] is (i // (C_in / g)) * (C_out / g) + j.
        g = layer.groups
        cin, cout_g = w.shape[0], w.shape[1]
        idx = (torch.arange(cin)[:, None] // (cin // g)) * cout_g + torch.arange(cout_g)[None, :]
        tt = t[idx].reshape(cin, cout_g, *([1] * (w.dim() - 2)))
        n = cout_g * g
    else:
        tt = t.reshape(-1, *([1] * (w.dim() - 1)))
        n = w.shape[0]
    _set(layer, w * tt, _bias(layer, n) * t + s)


def fold_before(t, s, layer):
    """x -> t * x + s per input channel, then layer (Linear or ConvNd without padding)."""
    w = layer.weight.double()
    if isinstance(layer, nn.Linear):
        _set(layer, w * t[None, :], _bias(layer, w.shape[0]) + w @ s)
        return
    assert isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed
    assert all(p == 0 for p in layer.padding), "BN then Conv folds only without padding"
    g, cout, cin_g = layer.groups, w.shape[0], w.shape[1]
    # input channel of w[o, i] is (o // (C_out / g)) * (C_in / g) + i
    idx = (torch.arange(cout)[:, None] // (cout // g)) * cin_g + torch.arange(cin_g)[None, :]
    ti = t[idx].reshape(cout, cin_g, *([1] * (w.dim() - 2)))
    si = s[idx].reshape(cout, cin_g, *([1] * (w.dim() - 2)))
    _set(layer, w * ti, _bias(layer, cout) + (w * si).flatten(1).sum(1))


class Affine(nn.Module):
    """Per-channel x * scale + shift on the last axis (a 'lone' Mul and Add of constants)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * self.scale + self.shift


def affine_of(m):
    """(t, s) of a BN, a timm LayerScale or an Affine."""
    if isinstance(m, BN_TYPES):
        return bn_affine(m)
    if isinstance(m, LayerScale):
        return m.gamma.double(), torch.zeros_like(m.gamma, dtype=torch.float64)
    assert isinstance(m, Affine)
    return m.scale.double(), m.shift.double()


def apply_folds(model, folds):
    """folds: list of (a, b) module names: a layer then a BN/affine ('after'), or a BN/affine
    then a layer ('before'). The BN/affine module is replaced by nn.Identity."""
    for a, b in folds:
        ma, mb = model.get_submodule(a), model.get_submodule(b)
        if isinstance(mb, (*BN_TYPES, LayerScale, Affine)):
            fold_after(ma, *affine_of(mb))
            parent, _, name = b.rpartition(".")
        else:
            fold_before(*affine_of(ma), mb)
            parent, _, name = a.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())
    return model


# ============================================================================================
# Hand-written models (what timm lacks)
# ============================================================================================

class ConvTransposeBN(nn.Module):
    """Decoder: ConvTranspose2d (bias) + BN, ReLU, grouped ConvTranspose2d (no bias) + BN."""
    folds = [("up1", "bn1"), ("up2", "bn2")]

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(4, 8, 2, stride=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.up2 = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                      bias=False)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.up2(self.act(self.bn1(self.up1(x)))))


class ConvNdBN(nn.Module):
    """Conv{1,3}d (3, pad 1) + BN, ReLU, Conv{1,3}d (1, stride 2, bias) + BN."""
    folds = [("conv1", "bn1"), ("conv2", "bn2")]

    def __init__(self, nd):
        super().__init__()
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[nd]
        self.conv1 = conv(4, 8, 3, padding=1, bias=False)
        self.bn1 = bn(8)
        self.act = nn.ReLU()
        self.conv2 = conv(8, 8, 1, stride=2)
        self.bn2 = bn(8)

    def forward(self, x):
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class LinearBN(nn.Module):
    """[N, C]: Linear+BN1d, ReLU, Linear(no bias)+BN1d, ReLU, BN1d -> Dropout -> Linear."""
    folds = [("fc1", "bn1"), ("fc2", "bn2"), ("bn3", "head")]

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.bn1 = nn.BatchNorm1d(24)
        self.fc2 = nn.Linear(24, 12, bias=False)
        self.bn2 = nn.BatchNorm1d(12)
        self.bn3 = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.head(self.drop(self.bn3(x)))


class LinearBNTokens(nn.Module):
    """[N, T, C]: Linear then BN1d via transpose(1, 2) (BN over [N, C, T]), GELU, Linear (no
    bias) then BN1d via reshape(N*T, C) (BN over [N*T, C]), ReLU, BN1d via transpose, Linear."""
    folds = [("fc1", "bn1"), ("fc2", "bn2"), ("bn3", "fc3")]

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 12, bias=False)
        self.bn2 = nn.BatchNorm1d(12)
        self.bn3 = nn.BatchNorm1d(12)
        self.fc3 = nn.Linear(12, 8)

    def forward(self, x):
        x = self.fc1(x)
        x = self.bn1(x.transpose(1, 2)).transpose(1, 2)
        x = F.gelu(x)
        x = self.fc2(x)
        b, t, c = x.shape
        x = self.bn2(x.reshape(b * t, c)).reshape(b, t, c)
        x = F.relu(x)
        x = self.bn3(x.transpose(1, 2)).transpose(1, 2)
        return self.fc3(x)


class LayerScaleModel(nn.Module):
    """[N, T, C]: x + LayerScale(Linear(x)); Linear(x * a + b) * c + d; mean over tokens, then
    Linear on [N, C] (Gemm) times a per-class LayerScale."""
    folds = [("fc1", "ls1"), ("pre", "fc2"), ("fc2", "post"), ("head", "ls_head")]

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.ls1 = LayerScale(8)
        self.pre = Affine(8)
        self.fc2 = nn.Linear(8, 12)
        self.post = Affine(12)
        self.head = nn.Linear(12, 10)
        self.ls_head = LayerScale(10)

    def forward(self, x):
        x = x + self.ls1(self.fc1(x))
        x = F.relu(self.post(self.fc2(self.pre(x))))
        return self.ls_head(self.head(x.mean(1)))


class BNConv(nn.Module):
    """Conv3x3+BN, ReLU, BN -> Conv1x1 (pads 0, bias), ReLU, BN -> grouped Conv3x3 (pads 0,
    stride 2, groups 2, no bias)."""
    folds = [("conv0", "bn0"), ("bn1", "conv1"), ("bn2", "conv2")]

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 12, 1)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 8, 3, stride=2, groups=2, bias=False)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        x = F.relu(self.conv1(self.bn1(x)))
        return self.conv2(self.bn2(x))


class BNConvPad(nn.Module):
    """NEGATIVE: Conv3x3+BN, ReLU, BN -> Conv3x3 with padding 1 (the padded border would see the
    BN's shift instead of 0: that BN must stay)."""
    folds = [("conv0", "bn0")]

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        return self.conv1(self.bn1(x))


class BNSharedInput(nn.Module):
    """NEGATIVE: c = Conv(x); relu(BN(c)) + c; pool; h = Linear(.); relu(BN1d(h)) + h; Linear.
    The producer of each BN also feeds the residual Add, and a ReLU follows: neither BN folds."""
    folds = []

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x):
        c = self.conv(x)
        x = F.relu(self.bn1(c)) + c
        x = x.mean((2, 3))
        h = self.fc1(x)
        x = F.relu(self.bn2(h)) + h
        return self.fc2(x)


class ReshapeMix(nn.Module):
    """NEGATIVE: [N, T, C] = [2, 8, 8] -> Linear(8, 12) -> .reshape(N, 12, T) (a view that mixes
    tokens and channels, not a transpose) -> BN1d(12) -> .reshape(N, T, 12) -> Linear(12, 8) ->
    BN1d(8) applied directly to [N, T, C] (normalizes the token axis; T == C == 8, so the channel
    count alone does not tell it from a feature BN) -> Linear(8, 6). No BN folds."""
    folds = []

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.fc3 = nn.Linear(8, 6)

    def forward(self, x):
        b, t, _ = x.shape
        x = self.fc1(x)
        x = self.bn1(x.reshape(b, -1, t)).reshape(b, t, -1)
        x = self.fc2(x)
        return self.fc3(self.bn2(x))


def hand_deploy(model):
    return apply_folds(model, type(model).folds)


# ============================================================================================
# timm models (reduced widths / depths, built from timm's own classes)
# ============================================================================================

def build_efficientvit():
    return EfficientVitMsra(img_size=64, num_classes=10, embed_dim=(16, 24), key_dim=(4, 4),
                            depth=(1, 1), num_heads=(2, 2), window_size=(7, 7), kernels=(5, 5, 5, 5),
                            down_ops=(("", 1), ("subsample", 2)))


def build_levit():
    return LevitDistilled(img_size=64, num_classes=10, embed_dim=(16,), key_dim=4, depth=(2,),
                          num_heads=(2,), attn_ratio=2., mlp_ratio=2., stem_type="s16",
                          act_layer="hard_swish")


def build_levit_subsample():
    return LevitDistilled(img_size=64, num_classes=10, embed_dim=(16, 24), key_dim=4,
                          depth=(1, 1), num_heads=(2, 3), attn_ratio=2., mlp_ratio=2.,
                          stem_type="s16", down_op="subsample", act_layer="hard_swish")


def build_repvit():
    return RepVit(img_size=32, num_classes=10, embed_dim=(8, 16), depth=(1, 1), mlp_ratio=2,
                  distillation=True)


class NextVitLite(nn.Module):
    """NextViT's layout (stem, stages, norm, head) with one NextStage of a NextConvBlock and a
    NextTransformerBlock (sr_ratio 2: AvgPool1d + BN1d before k/v), head_dim 8. The full
    NextViT class hard-codes widths 96..1024."""

    def __init__(self):
        super().__init__()
        act = nn.ReLU
        self.stem = nn.Sequential(
            ConvNormAct(3, 16, kernel_size=3, stride=2, act_layer=act),
            ConvNormAct(16, 16, kernel_size=3, stride=2, act_layer=act),
        )
        self.stages = nn.Sequential(NextStage(
            16, [32, 40], [NextConvBlock, NextTransformerBlock], stride=2, sr_ratio=2,
            mix_block_ratio=0.75, head_dim=8, act_layer=act))
        self.norm = nn.BatchNorm2d(40)
        self.head = ClassifierHead(40, 10, pool_type="avg")

    def forward(self, x):
        return self.head(self.norm(self.stages(self.stem(x))))


def build_nextvit():
    return NextVitLite()


def timm_deploy(model):
    model = reparameterize_model(model)
    # nextvit: timm leaves ConvNormAct / PatchEmbed / ConvAttention Conv+BN pairs to the exporter
    # (TorchScript folding does them); fold them here too so every form's deploy export is the
    # fully folded model. Only the final norm (BN2d -> pool -> Linear) stays, as in timm.
    for parent in list(model.modules()):
        names = list(parent._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[conv_name] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                parent._modules[bn_name] = nn.Identity()
    return model


def randomize_rest(model, gen):
    """Random values for what timm initializes to zeros/constants: attention biases, zero Linear
    or Conv biases, LayerScale gammas, Affine scale/shift (BNs: families.randomize)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "attention_biases":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif leaf == "bias" and not torch.any(p != 0):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif leaf in ("gamma", "scale"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif leaf == "shift":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    # timm caches attention biases in eval mode: drop the caches made before randomization.
    for m in model.modules():
        if hasattr(m, "attention_bias_cache"):
            m.attention_bias_cache = {}


# ============================================================================================
# Hand-made ONNX graph: Gemm attributes the exporters never write
# ============================================================================================

def gemm_np(a, b, c, trans_a, trans_b, alpha, beta):
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    y = alpha * (a @ b)
    return y + beta * c if c is not None else y


def bn_np(x, p, eps):
    scale, bias, mean, var = p
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) \
        + bias.reshape(shape)


class GemmAttrs:
    """XT [6, 3] (transA=1 reads it as [3, 6]) -> Gemm(W1 [6, 8], b1 [8], alpha 0.5, beta 2) ->
    BN(8) -> Relu -> BN(8) -> Gemm(W2 [4, 8] transB=1, C [1, 4], alpha 1.5, beta 0.25) ->
    Gemm(W3 [4, 5], no C, alpha 2) -> BN(5, epsilon 1e-3) -> Y [3, 5]."""
    shape = (6, 3)

    def __init__(self, seed):
        r = np.random.default_rng(seed)
        f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731

        def bn(n):
            return (r.uniform(0.5, 1.5, n).astype(np.float32), (r.standard_normal(n) * 0.3).astype(np.float32),
                    (r.standard_normal(n) * 0.5).astype(np.float32), r.uniform(0.5, 2.0, n).astype(np.float32))
        self.w1, self.b1 = f(6, 8), f(8)
        self.bn1, self.bn2 = bn(8), bn(8)
        self.w2, self.b2 = f(4, 8), f(1, 4)
        self.w3 = f(4, 5)
        self.bn3 = bn(5)
        self.g1 = dict(trans_a=1, trans_b=0, alpha=0.5, beta=2.0)
        self.g2 = dict(trans_a=0, trans_b=1, alpha=1.5, beta=0.25)
        self.g3 = dict(trans_a=0, trans_b=0, alpha=2.0, beta=1.0)

    def __call__(self, xt):
        x = xt.astype(np.float64)
        d = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
        bn = lambda p: tuple(d(a) for a in p)  # noqa: E731
        h = gemm_np(x, d(self.w1), d(self.b1), **self.g1)
        h = np.maximum(bn_np(h, bn(self.bn1), 1e-5), 0)
        h = bn_np(h, bn(self.bn2), 1e-5)
        h = gemm_np(h, d(self.w2), d(self.b2), **self.g2)
        h = gemm_np(h, d(self.w3), None, **self.g3)
        return bn_np(h, bn(self.bn3), 1e-3).astype(np.float32)

    def deploy_params(self):
        """The same network with every BN folded (float64): Gemm -> Relu -> Gemm -> Gemm."""
        d = lambda a: a.astype(np.float64)  # noqa: E731

        def ts(p, eps):
            t = d(p[0]) / np.sqrt(d(p[3]) + eps)
            return t, d(p[1]) - d(p[2]) * t
        t1, s1 = ts(self.bn1, 1e-5)
        t2, s2 = ts(self.bn2, 1e-5)
        t3, s3 = ts(self.bn3, 1e-3)
        # BN1 after Gemm1 (output columns): W1[:, j] * t1[j]; C' = (beta * b1 * t1 + s1) / beta
        w1 = d(self.w1) * t1[None, :]
        b1 = (self.g1["beta"] * d(self.b1) * t1 + s1) / self.g1["beta"]
        # BN2 before Gemm2 (transB=1, W2 [4, 8] reads input columns): W2[:, i] * t2[i];
        # C' = C + alpha / beta * W2 @ s2
        w2 = d(self.w2) * t2[None, :]
        b2 = d(self.b2) + self.g2["alpha"] / self.g2["beta"] * (d(self.w2) @ s2)[None, :]
        # BN3 after Gemm3 (no C): W3[:, j] * t3[j]; new C = s3 with beta 1
        w3 = d(self.w3) * t3[None, :]
        return w1, b1, w2, b2, w3, s3

    def onnx_model(self, deploy=False):
        t = onnx.TensorProto.FLOAT
        inits, nodes = [], []

        def const(name, a):
            inits.append(onnx.numpy_helper.from_array(np.asarray(a, dtype=np.float32), name))
            return name

        def gemm(name, ins, out, g):
            attrs = {k: v for k, v in (("transA", g["trans_a"]), ("transB", g["trans_b"]),
                                         ("alpha", g["alpha"]), ("beta", g["beta"]))
                     if (k in ("alpha", "beta") and v != 1.0) or (k.startswith("trans") and v)}
            nodes.append(oh.make_node("Gemm", ins, [out], name=name, **attrs))

        def bn(name, x, out, p, eps):
            ins = [x] + [const(f"{name}.{k}", a) for k, a in zip(("scale", "B", "mean", "var"), p)]
            nodes.append(oh.make_node("BatchNormalization", ins, [out], name=name, epsilon=eps))

        if deploy:
            w1, b1, w2, b2, w3, s3 = self.deploy_params()
            gemm("gemm1", ["XT", const("W1", w1), const("b1", b1)], "h1", self.g1)
            nodes.append(oh.make_node("Relu", ["h1"], ["r1"], name="relu1"))
            gemm("gemm2", ["r1", const("W2", w2), const("b2", b2)], "h2", self.g2)
            gemm("gemm3", ["h2", const("W3", w3), const("b3", s3)], "Y", self.g3)
        else:
            gemm("gemm1", ["XT", const("W1", self.w1), const("b1", self.b1)], "h1", self.g1)
            bn("bn1", "h1", "n1", self.bn1, 1e-5)
            nodes.append(oh.make_node("Relu", ["n1"], ["r1"], name="relu1"))
            bn("bn2", "r1", "n2", self.bn2, 1e-5)
            gemm("gemm2", ["n2", const("W2", self.w2), const("b2", self.b2)], "h2", self.g2)
            gemm("gemm3", ["h2", const("W3", self.w3)], "h3", self.g3)
            bn("bn3", "h3", "Y", self.bn3, 1e-3)
        graph = oh.make_graph(nodes, "gemm_attrs", [oh.make_tensor_value_info("XT", t, [6, 3])],
                              [oh.make_tensor_value_info("Y", t, [3, 5])], inits)
        m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)],
                          producer_name="onnx-repvgg testdata/linear.py")
        m.ir_version = 8
        return m


# ============================================================================================
# Model table
# ============================================================================================

BASE_FORMS = ["ts_fold_op17", "ts_nofold_op17", "dynamo_op18", "deploy_ts_fold_op17"]

FORMS = collections.OrderedDict([
    ("ts_fold_op17", fam.FORMS["ts_fold_op17"]),
    ("ts_nofold_op17", fam.FORMS["ts_nofold_op17"]),
    ("dynamo_op18", fam.FORMS["dynamo_op18"]),
    ("ts_train_op17", fam.FORMS["ts_train_op17"]),
    ("ts_nofold_op17_initin", "TorchScript exporter, eval, opset 17, do_constant_folding=False, "
                              "keep_initializers_as_inputs=True (weights are graph inputs, not "
                              "constants: must be refused)"),
    ("onnx_op17", "hand-made with onnx.helper (not an export), opset 17, IR 8"),
    ("deploy_ts_fold_op17", fam.FORMS["deploy_ts_fold_op17"]),
    ("deploy_onnx_op17", "the folded graph, hand-made with onnx.helper, opset 17, IR 8"),
])

TIMM = f"timm {timm.__version__}"

# name -> spec: family, shape, build, deploy (callable), deploy_method, source, forms, expect,
# bn_min (BN nodes a complete fold leaves), summed_heads, note
MODELS = collections.OrderedDict([
    ("efficientvit_m", dict(
        family="efficientvit_msra", shape=(1, 3, 64, 64), build=build_efficientvit,
        source=f"{TIMM} timm.models.efficientvit_msra.EfficientVitMsra",
        note="EfficientVitMsra(img_size=64, embed_dim=(16, 24), key_dim=(4, 4), depth=(1, 1), num_heads=(2, 2), "
             "window_size=(7, 7), down_ops=(('', 1), ('subsample', 2)), num_classes=10): ConvNorm (Conv2d+BN) everywhere, "
             "head NormLinear (GlobalAveragePool -> Flatten -> BN1d -> Linear)")),
    ("levit", dict(
        family="levit", shape=(1, 3, 64, 64), build=build_levit, summed_heads=2,
        source=f"{TIMM} timm.models.levit.LevitDistilled",
        note="LevitDistilled(img_size=64, embed_dim=(16,), key_dim=4, depth=(2,), num_heads=(2,), num_classes=10, "
             "hard_swish): Stem16 ConvNorms, LinearNorm (Linear, BN1d over x.flatten(0, 1), reshape_as) for "
             "qkv/proj/mlp, heads NormLinear x2 (mean over tokens -> BN1d -> Linear) summed / 2; timm's fused heads "
             "stay 2 Gemm + Add + Div; one stage: no AttentionDownsample (see levit_subsample)")),
    ("levit_subsample", dict(
        family="levit", shape=(1, 3, 64, 64), build=build_levit_subsample, summed_heads=2,
        source=f"{TIMM} timm.models.levit.LevitDistilled",
        tract_runs=False,
        tract_note="tract 0.23.9 fails in declutter on timm's Subsample (x.view(B, H, W, C)[:, ::2, ::2]: a strided "
                   "Slice after a Reshape): 'Pulling Downsample over Reshape: Invalid axis', the deploy export too; "
                   "ONNX Runtime runs it",
        note="LevitDistilled(img_size=64, embed_dim=(16, 24), key_dim=4, depth=(1, 1), num_heads=(2, 3), "
             "num_classes=10, hard_swish): as levit plus a second stage with LevitDownsample (AttentionDownsample: "
             "kv LinearNorm, q = Subsample + LinearNorm, proj LinearNorm; then a LinearNorm MLP)")),
    ("repvit", dict(
        family="repvit", shape=(1, 3, 32, 32), build=build_repvit, summed_heads=2,
        source=f"{TIMM} timm.models.repvit.RepVit",
        note="RepVit(img_size=32, embed_dim=(8, 16), depth=(1, 1), mlp_ratio=2, distillation=True, num_classes=10): "
             "RepVggDw, ConvNorm, SE, RepVitClassifier (ReduceMean -> BN1d -> Linear twice, summed / 2); "
             "timm's fused classifier is one Linear")),
    ("nextvit", dict(
        family="nextvit", shape=(1, 3, 32, 32), build=build_nextvit,
        source=f"{TIMM} timm.models.nextvit NextStage/NextConvBlock/NextTransformerBlock/ConvNormAct",
        deploy_method="timm.utils.reparameterize_model (merge_pre_bn), then "
                      "torch.nn.utils.fusion.fuse_conv_bn_eval on the remaining Conv2d+BN2d pairs; "
                      "the final norm stays (timm does not fold it)",
        note="stem ConvNormAct 3->16 s2, 16->16 s2; NextStage(16, [32, 40], [NextConvBlock, NextTransformerBlock], "
             "stride 2, sr_ratio 2, mix_block_ratio 0.75 (mhsa 32 + mhca 8 channels), head_dim 8); norm BN2d(40); "
             "ClassifierHead(40, 10, avg). BN2d before 1x1 convs "
             "(its input also feeds the residual Add), BN2d norm1 before q and (via AvgPool1d + BN1d) k/v, final "
             "BN2d -> GlobalAveragePool -> Flatten -> Gemm (left by timm's deploy: bn_after 1, foldable)")),
    ("convtranspose_bn", dict(
        family="convtranspose", shape=(1, 4, 8, 8), build=ConvTransposeBN,
        note="ConvTranspose2d(4, 8, 2, s2, bias)+BN2d, ReLU, ConvTranspose2d(8, 6, 3, s2, p1, output_padding 1, "
             "groups 2, no bias)+BN2d (weight [C_in, C_out/g, k, k]: the BN scales axis 1 per group)")),
    ("conv1d_bn", dict(
        family="conv1d", shape=(1, 4, 16), build=lambda: ConvNdBN(1),
        note="Conv1d(4, 8, 3, p1, no bias)+BN1d, ReLU, Conv1d(8, 8, 1, s2, bias)+BN1d")),
    ("conv3d_bn", dict(
        family="conv3d", shape=(1, 4, 6, 6, 6), build=lambda: ConvNdBN(3),
        note="Conv3d(4, 8, 3, p1, no bias)+BN3d, ReLU, Conv3d(8, 8, 1, s2, bias)+BN3d")),
    ("linear_bn", dict(
        family="linear_bn", shape=(2, 16), build=LinearBN,
        forms=BASE_FORMS + ["ts_train_op17", "ts_nofold_op17_initin"],
        note="[N, C] = [2, 16]: Linear(16, 24)+BN1d, ReLU, Linear(24, 12, no bias)+BN1d, ReLU, BN1d(12) -> "
             "Dropout -> Linear(12, 10)")),
    ("linear_bn_tokens", dict(
        family="linear_bn", shape=(2, 5, 8), build=LinearBNTokens,
        note="[N, T, C] = [2, 5, 8]: Linear(8, 16) then BN1d(16) via transpose(1, 2), GELU, Linear(16, 12, no bias) "
             "then BN1d(12) via reshape(N*T, C), ReLU, BN1d(12) via transpose then Linear(12, 8)")),
    ("layer_scale", dict(
        family="layer_scale", shape=(2, 5, 8), build=LayerScaleModel,
        note="[N, T, C] = [2, 5, 8]: x + LayerScale(Linear(8, 8)(x)) (Mul by gamma), Relu(Linear(8, 12)(x * a + b) "
             "* c + d), mean over tokens, Linear(12, 10) (Gemm) * gamma; per-channel Mul/Add constants around "
             "MatMul/Gemm, no BN")),
    ("bn_conv", dict(
        family="bn_conv", shape=(1, 4, 10, 10), build=BNConv,
        note="Conv2d(4, 8, 3, p1)+BN2d, ReLU, BN2d -> Conv2d(8, 12, 1, bias), ReLU, BN2d -> Conv2d(12, 8, 3, s2, "
             "pads 0, groups 2, no bias)")),
    ("gemm_attrs", dict(
        family="linear_bn", shape=GemmAttrs.shape, onnx=GemmAttrs,
        forms=["onnx_op17", "deploy_onnx_op17"],
        source="hand-made ONNX (onnx.helper)", deploy_method="hand fold (numpy float64)",
        note="XT [6, 3] -> Gemm(transA=1, alpha 0.5, beta 2, C [8]) -> BN -> Relu -> BN -> Gemm(transB=1, alpha 1.5, "
             "beta 0.25, C [1, 4]) -> Gemm(alpha 2, no C) -> BN(epsilon 1e-3) -> Y [3, 5]")),
    ("bn_conv_pad", dict(
        family="bn_conv", shape=(1, 4, 10, 10), build=BNConvPad, expect="refused: pad", bn_min=1,
        note="NEGATIVE: Conv2d(4, 8, 3, p1)+BN2d (folds), ReLU, BN2d -> Conv2d(8, 8, 3, padding 1): that BN must stay")),
    ("bn_shared_input", dict(
        family="linear_bn", shape=(1, 4, 8, 8), build=BNSharedInput, expect="refused: consumer", bn_min=2,
        note="NEGATIVE: c = Conv(x); Relu(BN2d(c)) + c; mean; h = Linear(x); Relu(BN1d(h)) + h; Linear: each BN's "
             "input also feeds an Add and a Relu follows: both BNs must stay")),
    ("reshape_mix", dict(
        family="linear_bn", shape=(2, 8, 8), build=ReshapeMix, expect="refused: channel", bn_min=2,
        note="NEGATIVE: [2, 8, 8] -> Linear(8, 12) -> reshape [2, 12, 8] (a view: mixes tokens and channels) -> "
             "BN1d(12) -> reshape [2, 8, 12] -> Linear(12, 8) -> BN1d(8) on [2, 8, 8] (normalizes the token axis, "
             "T == C) -> Linear(8, 6): both BNs must stay")),
])


# ============================================================================================
# Exports
# ============================================================================================

def make_form(form, model, deploy, x, x_train, path):
    if form == "ts_nofold_op17_initin":
        with common.quiet():
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17,
                              do_constant_folding=False, keep_initializers_as_inputs=True)
    else:
        fam.make_form(form, model, deploy, x, x_train, path)
    # The dynamo exporter writes an empty .onnx.data when every tensor is small enough to stay
    # inline (none of the current models): drop it, nothing refers to it.
    data = path + ".data"
    if os.path.exists(data) and os.path.getsize(data) == 0:
        assert not common.uses_external_data(path)
        os.remove(data)


def bn_count(hist):
    return hist.get("BatchNormalization", 0)


# ============================================================================================
# BN neighbourhoods (for the report / the Rust matcher): --sites
# ============================================================================================

PASS_THROUGH = ("Reshape", "Transpose", "Flatten", "Identity", "Squeeze", "Unsqueeze",
                "GlobalAveragePool", "ReduceMean", "Dropout", "AveragePool")
LAYERS = ("Gemm", "MatMul", "Conv", "ConvTranspose")


class Graph:
    """Producer/consumer maps, static shapes (ONNX shape inference) and small constants."""

    def __init__(self, path):
        self.model = m = onnx.load(path, load_external_data=False)
        try:
            inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        except Exception:  # noqa: BLE001
            inferred = m
        self.shapes = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                    for d in vi.type.tensor_type.shape.dim]
        self.inits = {i.name: i for i in m.graph.initializer}
        self.graph_inputs = {i.name for i in m.graph.input}
        self.consts = {}
        for i in m.graph.initializer:
            self.shapes[i.name] = list(i.dims)
            if i.data_location != onnx.TensorProto.EXTERNAL and np.prod(i.dims) <= 8:
                self.consts[i.name] = onnx.numpy_helper.to_array(i)
        self.producer, self.consumers = {}, collections.defaultdict(list)
        for n in m.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
                v = onnx.numpy_helper.to_array(n.attribute[0].t)
                self.shapes[n.output[0]] = list(v.shape)
                if v.size <= 8:
                    self.consts[n.output[0]] = v
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers[i].append(n)

    def attrs(self, node):
        out = []
        for a in node.attribute:
            v = oh.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, onnx.TensorProto):
                v = onnx.numpy_helper.to_array(v).tolist()
            if isinstance(v, float):
                v = float(f"{v:.3g}")
            # defaults that carry no information for a matcher
            if (a.name, str(v)) in (("auto_pad", "NOTSET"), ("dilations", "[1, 1]"), ("dilations", "[1]"),
                                    ("dilations", "[1, 1, 1]"), ("momentum", "0.9")):
                continue
            out.append(f"{a.name}={v}")
        return out

    def operand(self, t, via, depth=0):
        """How input t of a node is made: '·' (the walked tensor), W[dims], const[..]=v, or
        <Op(...)> for a computed one (two levels deep)."""
        if t == "":
            return "-"
        if t == via:
            return "·"
        if t in self.inits:
            s = f"W{self.shapes[t]}"
            if t in self.consts and self.consts[t].size <= 4:
                s += f"={self.consts[t].tolist()}"
            return s + ("(graph input!)" if t in self.graph_inputs else "")
        if t in self.consts:
            return f"const{list(self.consts[t].shape)}={self.consts[t].tolist()}"
        if t in self.producer:
            p = self.producer[t]
            # expand weight transposes and shape computations, not the data path of the graph
            if depth >= 2 or p.op_type not in ("Transpose", "Concat", "Unsqueeze", "Slice", "Shape",
                                               "Gather", "Cast", "Squeeze", "Constant"):
                return f"<{p.op_type}>"
            ins = ",".join(self.operand(i, via, depth + 1) for i in p.input)
            a = ";".join(self.attrs(p))
            return f"<{p.op_type}({ins}{'; ' + a if a else ''})>"
        return "(graph input)" if t in self.graph_inputs else "?"

    def fmt(self, n, via):
        ins = ", ".join(self.operand(i, via) for i in n.input)
        a = "; ".join(self.attrs(n))
        out = self.shapes.get(n.output[0], "?")
        return f"{n.op_type}({ins}{'; ' + a if a else ''})->{out}"


def describe_bn_sites(path):
    """One line per BatchNormalization: the ops before it (through pass-through ops and a bias
    Add, up to the producing layer) and after it (up to the consuming layer), with operand order,
    attributes and static shapes. '·' marks the tensor on the walked path."""
    g = Graph(path)
    sites = []
    for n in g.model.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        up, t = [], n.input[0]
        for _ in range(5):
            if t not in g.producer:
                up.append(f"<graph input {g.shapes.get(t, '?')}>")
                break
            p = g.producer[t]
            # the operand on the path: the non-constant input
            data = [i for i in p.input if i and i not in g.inits and i not in g.consts]
            via = data[0] if data else p.input[0]
            s = g.fmt(p, via)
            if len(g.consumers[t]) > 1:
                s += f" {{output also feeds {', '.join(c.op_type for c in g.consumers[t] if c is not n and c.op_type)}}}"
            up.append(s)
            if p.op_type in LAYERS or (p.op_type not in PASS_THROUGH and p.op_type != "Add"):
                break
            if p.op_type == "Add" and len(data) != 1:
                break
            t = via
        down, t = [], n.output[0]
        for _ in range(5):
            cs = g.consumers.get(t, [])
            if len(cs) != 1:
                down.append("{" + " | ".join(g.fmt(c, t) for c in cs) + "}" if cs else "<graph output>")
                break
            c = cs[0]
            down.append(g.fmt(c, t))
            if c.op_type in LAYERS:
                # one more step: the Add / Div of summed heads, a bias Add, a Mul
                nxt = g.consumers.get(c.output[0], [])
                if len(nxt) == 1 and nxt[0].op_type in ("Add", "Mul", "Div", "Sub"):
                    down.append(g.fmt(nxt[0], c.output[0]))
                    nn_ = g.consumers.get(nxt[0].output[0], [])
                    if len(nn_) == 1 and nn_[0].op_type in ("Add", "Mul", "Div", "Sub"):
                        down.append(g.fmt(nn_[0], nxt[0].output[0]))
                break
            if c.op_type not in PASS_THROUGH:
                break
            t = c.output[0]
        extra = [o for o in n.output[1:] if o]
        bn = f"**BatchNormalization({'; '.join(g.attrs(n))}){g.shapes.get(n.input[0], '?')}" \
             f"{' [' + str(1 + len(extra)) + ' outputs]' if extra else ''}**"
        sites.append(" => ".join(list(reversed(up)) + [bn] + down))
    return sites


def print_sites(names):
    with open(os.path.join(OUT, "manifest.json")) as f:
        manifest = json.load(f)
    for e in manifest:
        if names and e["model"] not in names:
            continue
        sites = describe_bn_sites(os.path.join(OUT, e["path"]))
        print(f"## {e['model']} / {e['form']}: {len(sites)} BN")
        counts = collections.Counter(sites)
        for s, k in counts.items():
            print(f"  {k}x {s}")


# ============================================================================================
# Driver
# ============================================================================================

def check_and_entry(name, spec, form, path, xin, yref, fin, fout, deploy_ops, same_ops, kind):
    onnx.checker.check_model(path, full_check=True)
    outs = common.run_ort(path, xin)
    e = common.rel_err(outs[0], yref)
    status = f"ORT rel err {e:.3g} ({len(outs)} output(s))"
    if kind == "train":
        status += " [training mode: not asserted]"
    else:
        assert e < 1e-4, f"{name}/{form}: ONNX Runtime disagrees with the reference ({e})"
    ext = common.uses_external_data(path)
    size = os.path.getsize(path) + (os.path.getsize(path + ".data")
                                    if os.path.exists(path + ".data") else 0)
    ops = common.op_histogram(path)
    print(f"[{name}] {form:22s} {size:>8d} B ext={ext!s:5s} BN={bn_count(ops):2d} "
          f"(deploy {bn_count(same_ops):2d}) {status}")
    if kind == "train":
        expect = "refused: training"
    elif form == "ts_nofold_op17_initin":
        expect = "refused: constant"
    else:
        expect = spec.get("expect", "fused")
    n_bn, n_grouped = spec["_counts"]
    rel = lambda f: f"{name}/{f}"  # noqa: E731
    entry = {
        "model": name,
        "family": spec["family"],
        "form": form,
        "description": f"{FORMS[form]}; {spec['note']}",
        "path": rel(os.path.basename(path)),
        "input": rel(fin),
        "output": rel(fout),
        "dtype": "float32",
        "blocks": n_bn,
        "without_identity": 0,
        "grouped_blocks": n_grouped,
        "fusable": expect == "fused",
        "deploy_structure": form.startswith("deploy_"),
        "deploy_ops": deploy_ops,
        "deploy_ops_same_export": same_ops,
        "ops": ops,
        "external_data": ext,
        "expect": expect,
        "bn_before": bn_count(ops),
        "bn_after": bn_count(same_ops),
        # BN nodes a complete fold of this file leaves: all of them when the whole file must be
        # refused (training mode, weights as graph inputs), else the model's unfoldable ones.
        "bn_min": bn_count(ops) if kind == "train" or form == "ts_nofold_op17_initin"
        else spec.get("bn_min", 0),
        "summed_heads": spec.get("summed_heads", 0),
        "source": spec.get("source", "hand-written PyTorch (testdata/linear.py)"),
        "deploy_method": spec.get("deploy_method", "timm.utils.reparameterize_model"
                                  if "timm" in spec.get("source", "") else "hand fold (float64)"),
    }
    # Checked with tract-onnx 0.23.9 (the Rust tests' oracle) when these fixtures were made.
    if kind == "train":
        entry["tract_runs"] = False
        entry["tract_note"] = "tract cannot analyse a BatchNormalization in training mode"
    elif not spec.get("tract_runs", True):
        entry["tract_runs"] = False
        entry["tract_note"] = spec["tract_note"]
    return entry


def generate_onnx_model(name, spec, seed, out_dir):
    net = spec["onnx"](seed + 1)
    rng = np.random.default_rng(seed + 2)
    x = rng.standard_normal(spec["shape"]).astype(np.float32)
    y = net(x)
    common.save_tensor(x, os.path.join(out_dir, "input.pb"))
    common.save_tensor(y, os.path.join(out_dir, "output.pb"))
    spec["_counts"] = (3, 0)
    paths = {}
    for form, deploy in (("onnx_op17", False), ("deploy_onnx_op17", True)):
        paths[form] = os.path.join(out_dir, form + ".onnx")
        onnx.save(net.onnx_model(deploy), paths[form])
    # the folded graph must reproduce the unfolded one
    ya = common.run_ort(paths["onnx_op17"], x)[0]
    yb = common.run_ort(paths["deploy_onnx_op17"], x)[0]
    err = common.rel_err(yb, ya)
    print(f"[{name}] max|y| {np.max(np.abs(y)):.4g}, deploy vs original (ORT) rel err {err:.3g}")
    assert err < 1e-5, err
    deploy_ops = common.op_histogram(paths["deploy_onnx_op17"])
    return [check_and_entry(name, spec, form, paths[form], x, y, "input.pb", "output.pb",
                            deploy_ops, deploy_ops, "") for form in spec["forms"]]


def generate_model(name, spec, seed):
    out_dir = os.path.join(OUT, name)
    os.makedirs(out_dir, exist_ok=True)
    if "onnx" in spec:
        return generate_onnx_model(name, spec, seed, out_dir)
    forms = spec.get("forms", BASE_FORMS)
    is_timm = "timm" in spec.get("source", "")

    torch.manual_seed(seed)
    model = spec["build"]()
    gen = torch.Generator().manual_seed(seed + 1)
    fam.randomize(model, gen)
    randomize_rest(model, gen)
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    grouped = sum(1 for m in model.modules()
                  if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1)
    spec["_counts"] = (len(bns), grouped)

    rng = np.random.default_rng(seed + 2)
    shape = spec["shape"]
    x_np = rng.standard_normal(shape).astype(np.float32)
    x_train_np = np.concatenate([x_np, rng.standard_normal(shape).astype(np.float32)])
    x, x_train = torch.from_numpy(x_np), torch.from_numpy(x_train_np)

    with torch.no_grad():
        y = model(x).numpy()
        deploy = (timm_deploy if is_timm else hand_deploy)(copy.deepcopy(model)).eval()
        y_deploy = deploy(x).numpy()
    left = [n for n, m in deploy.named_modules() if isinstance(m, BN_TYPES)]
    err = common.rel_err(y_deploy, y)
    print(f"[{name}] {len(bns)} BN ({grouped} grouped convs), {sum(p.numel() for p in model.parameters())} "
          f"parameters, max|y| {np.max(np.abs(y)):.4g}, deploy vs train-structure rel err {err:.3g}, "
          f"BN modules left in deploy: {left or 'none'}")
    assert err < 1e-5, f"{name}: deploy model disagrees with the training-structure model: {err}"
    if is_timm:
        assert left == (["norm"] if name == "nextvit" else []), left

    files = {"": ("input.pb", "output.pb")}
    common.save_tensor(x_np, os.path.join(out_dir, "input.pb"))
    common.save_tensor(y, os.path.join(out_dir, "output.pb"))
    ref = {"": (x_np, y)}
    if "ts_train_op17" in forms:
        with torch.no_grad():
            yt = copy.deepcopy(model).train()(x_train).numpy()
        files["train"] = ("input_train.pb", "output_train.pb")
        common.save_tensor(x_train_np, os.path.join(out_dir, "input_train.pb"))
        common.save_tensor(yt, os.path.join(out_dir, "output_train.pb"))
        ref["train"] = (x_train_np, yt)

    # The deploy model exported with each form's own settings: what a fold of that form leaves.
    same = {}
    with tempfile.TemporaryDirectory() as tmp:
        for form in dict.fromkeys(forms + ["deploy_ts_fold_op17"]):
            p = os.path.join(tmp, form + ".onnx")
            make_form(form, deploy, deploy, x, x_train, p)
            same[form] = common.op_histogram(p)

    entries = []
    for form in forms:
        path = os.path.join(out_dir, form + ".onnx")
        make_form(form, model, deploy, x, x_train, path)
        kind = "train" if form.startswith("ts_train") else ""
        xin, yref = ref[kind]
        fin, fout = files[kind]
        entries.append(check_and_entry(name, spec, form, path, xin, yref, fin, fout,
                                       same["deploy_ts_fold_op17"], same[form], kind))
    return entries


def main():
    torch.set_num_threads(1)
    args = sys.argv[1:]
    if args and args[0] == "--sites":
        print_sites(args[1].split(",") if len(args) > 1 else None)
        return
    only = args[0].split(",") if args else None
    if only is not None:
        unknown = [n for n in only if n not in MODELS]
        if unknown:
            sys.exit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    if only is None:
        shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT, exist_ok=True)
    manifest_path = os.path.join(OUT, "manifest.json")
    manifest = []
    if only is not None and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = [e for e in json.load(f) if e["model"] not in only]
    names = list(MODELS)
    for name, spec in MODELS.items():
        if only is not None and name not in only:
            continue
        shutil.rmtree(os.path.join(OUT, name), ignore_errors=True)
        manifest += generate_model(name, spec, SEED + 100 * names.index(name))
    order = {n: i for i, n in enumerate(MODELS)}
    manifest.sort(key=lambda e: order[e["model"]])  # stable: forms keep their order
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {manifest_path} ({len(manifest)} fixtures)")


if __name__ == "__main__":
    main()
