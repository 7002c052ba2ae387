#!/usr/bin/env python3
"""Generate the re-parameterizable block *family* fixtures of onnx-repvgg.

What it makes
-------------
Small PyTorch models built from the blocks of the other re-parameterizable architectures (the
RepVGG fixtures themselves come from ``generate.py``), each with the class structure, module
names, branch order and re-parameterization code of its reference implementation:

  qarepvgg           YOLOv6 ``QARepVGGBlock``: rbr_dense (Conv3x3+BN), rbr_1x1 (plain Conv, no BN,
                     no bias), rbr_identity (raw x), sum, **post BN** ``bn``, ReLU
  qarepvggv2         YOLOv6 ``QARepVGGBlockV2``: + rbr_avg AvgPool2d(3, 1, 1, count_include_pad=True)
  qarepvggv2_nopad   the same with count_include_pad=False (not a convolution at the borders)
  mobileone          apple/ml-mobileone ``MobileOneBlock`` (num_conv_branches=4): rbr_conv[k],
                     rbr_scale, rbr_skip; a depthwise 3x3 / pointwise 1x1 stage
  yolov7_repconv     YOLOv7 ``RepConv`` (SiLU, BN eps 1e-3 momentum 0.03) and ultralytics ``RepConv``
  repvgg_se          official RepVGG block with ``use_se`` (D2se): the sum feeds SEBlock (2 consumers)
  acnet              ACNet ``ACBlock`` (3x3 + 3x1 + 1x3 Conv+BN) and a bias/no-BN variant
  replknet           RepLKNet ``ReparamLargeKernelConv`` (dw 7x7 + dw small kernel), stride 1 and 2
  unireplknet        UniRepLKNet ``DilatedReparamBlock`` (dw 7x7 + dilated dw branches), one
                     followed by the block's ``norm`` BN (folded by ``reparameterize``)
  dilated_repvgg     RepVGG blocks with a dilated 3x3 (dilation 2 and 4) as in segmentation nets
  repvit             RepViT ``RepVGGDW``: dw Conv3x3+BN, dw Conv1x1 with bias, raw x, post BN
  standalone         plain CNN: Conv+BN, Conv(+bias) then x*scale+shift, Conv(no bias)+bias
  conv1d, conv3d     RepVGG-style blocks made of Conv1d/BatchNorm1d and Conv3d/BatchNorm3d
  dbb                DiverseBranchBlock (1x1->kxk with BNAndPad, 1x1->AvgPool, 1x1, kxk)

Every BatchNorm gets random statistics from a fixed seed (running_mean ~ N(0, 0.5),
running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.3)); convolutions that have a
bias in the original keep PyTorch's (seeded, random) default initialization. The deploy model
is made by each family's own re-parameterization code (switch_to_deploy, reparameterize,
merge_kernel, fuse_convs, merge_dilated_branches, fuse) and asserted to reproduce the
training-structure output within 1e-5 relative to max|y|.

Forms (see FORMS): TorchScript with and without constant folding (opset 17), the dynamo
exporter (opset 18, default external data) with and without its optimizer, the deploy model
(TorchScript, folding), and for qarepvgg also a TRAINING-mode export (must be refused), an
fp16 export and a bf16 one (dynamo, opset 22, unoptimized: the only bf16 export that passes the
checker; ONNX Runtime's CPU provider has no bf16 Expand, so it is not run: ``ort_runs: false``).
The dynamo exports keep only the ``pkg.torch.onnx.name_scopes`` node metadata (see
KEEP_NODE_METADATA), which keeps the folder small and the bytes independent of the checkout path.

Outputs (relative to this folder):
  families/<model>/<form>.onnx (+ .onnx.data)   one export
  families/<model>/input.pb, output.pb          f32 TensorProto input ~ N(0, 1), PyTorch output
  families/<model>/input_{fp16,bf16,train}.pb   (+ output_*) for the fp16, bf16, training forms
  families/manifest.json                        one entry per fixture (schema of manifest.json
                                                plus ``family`` and ``expect``; see README.md)

Every file is checked with ``onnx.checker.check_model(path, full_check=True)`` and run in ONNX
Runtime against PyTorch (relative error, < 1e-4 asserted for f32).

  python testdata/families.py                 # rewrite testdata/families/ (~1 min on 2 cores)
  python testdata/families.py mobileone,dbb   # redo some models, keep the other manifest entries

Use the pinned versions of requirements.txt; other torch/onnx versions emit other graphs.
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
import onnx.numpy_helper
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate as common  # noqa: E402  (helpers: quiet, save_tensor, op_histogram, rel_err, run_ort)

OUT = os.path.join(HERE, "families")
SEED = 20240301


def block(cls):
    """Mark a class as one re-parameterizable block (counted in the manifest)."""
    cls._rep_block = True
    return cls


# ============================================================================================
# 1, 2. QARepVGG / QARepVGGv2 (meituan/YOLOv6, yolov6/layers/common.py)
# ============================================================================================

def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1, dilation=1,
            conv=nn.Conv2d, bn=nn.BatchNorm2d):
    """RepVGG's / YOLOv6's conv_bn: nn.Sequential(conv (bias=False), bn)."""
    result = nn.Sequential()
    result.add_module("conv", conv(in_channels=in_channels, out_channels=out_channels,
                                   kernel_size=kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=groups, bias=False))
    result.add_module("bn", bn(num_features=out_channels))
    return result


def fuse_seq_bn(kernel, bn):
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, *([1] * (kernel.dim() - 1)))
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


class RepVGGBlock(nn.Module):
    """YOLOv6 RepVGGBlock (= official RepVGG block); base class of the QARepVGG blocks.

    ``dilation`` is passed to rbr_dense (the official code only passes it to rbr_reparam) so the
    same class gives the dilated blocks of segmentation backbones; ``use_se`` builds the
    official SEBlock (D2se)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups=1, padding_mode="zeros", deploy=False, use_se=False, se_internal=None):
        super().__init__()
        self.deploy = deploy
        self.groups = groups
        self.in_channels = in_channels
        self.out_channels = out_channels
        assert kernel_size == 3
        assert padding == dilation
        padding_11 = padding - kernel_size // 2 * dilation
        self.nonlinearity = nn.ReLU()
        if use_se:
            self.se = SEBlock(out_channels, internal_neurons=se_internal or out_channels // 16)
        else:
            self.se = nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                         dilation, groups, bias=True, padding_mode=padding_mode)
        else:
            self.rbr_identity = (nn.BatchNorm2d(num_features=in_channels)
                                 if out_channels == in_channels and stride == 1 else None)
            self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding,
                                     groups=groups, dilation=dilation)
            self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, padding_11,
                                   groups=groups)

    def rep_info(self):
        ident = getattr(self, "rbr_identity", None)
        return ident is not None, self.groups

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))

    def get_equivalent_kernel_bias(self):
        kernel3x3, bias3x3 = self._fuse_bn_tensor(self.rbr_dense)
        kernel1x1, bias1x1 = self._fuse_bn_tensor(self.rbr_1x1)
        kernelid, biasid = self._fuse_bn_tensor(self.rbr_identity)
        return (kernel3x3 + self._pad_1x1_to_3x3_tensor(kernel1x1) + kernelid,
                bias3x3 + bias1x1 + biasid)

    def _pad_1x1_to_3x3_tensor(self, kernel1x1):
        if kernel1x1 is None or isinstance(kernel1x1, int):
            return 0
        return F.pad(kernel1x1, [1, 1, 1, 1])

    def _id_kernel(self):
        input_dim = self.in_channels // self.groups
        kernel_value = np.zeros((self.in_channels, input_dim, 3, 3), dtype=np.float32)
        for i in range(self.in_channels):
            kernel_value[i, i % input_dim, 1, 1] = 1
        return torch.from_numpy(kernel_value)

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, nn.Sequential):
            return fuse_seq_bn(branch.conv.weight, branch.bn)
        assert isinstance(branch, nn.BatchNorm2d)
        return fuse_seq_bn(self._id_kernel(), branch)

    def _avg_to_3x3_tensor(self, avgp):
        channels, groups, kernel_size = self.in_channels, self.groups, avgp.kernel_size
        input_dim = channels // groups
        k = torch.zeros((channels, input_dim, kernel_size, kernel_size))
        k[np.arange(channels), np.tile(np.arange(input_dim), groups), :, :] = 1.0 / kernel_size ** 2
        return k

    def switch_to_deploy(self):
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        dense = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(dense.in_channels, dense.out_channels, dense.kernel_size,
                                     dense.stride, dense.padding, dense.dilation, dense.groups,
                                     bias=True)
        self.rbr_reparam.weight.data = kernel
        self.rbr_reparam.bias.data = bias
        for para in self.parameters():
            para.detach_()
        self.__delattr__("rbr_dense")
        self.__delattr__("rbr_1x1")
        if hasattr(self, "rbr_identity"):
            self.__delattr__("rbr_identity")
        if hasattr(self, "rbr_avg"):
            self.__delattr__("rbr_avg")
        self.deploy = True


RepVGGBlock = block(RepVGGBlock)


class SEBlock(nn.Module):
    """Official RepVGG SEBlock (repvgg.py): avg_pool2d over the whole map, down, ReLU, up,
    sigmoid, view, multiply."""

    def __init__(self, input_channels, internal_neurons):
        super().__init__()
        self.down = nn.Conv2d(input_channels, internal_neurons, kernel_size=1, stride=1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, kernel_size=1, stride=1, bias=True)
        self.input_channels = input_channels

    def forward(self, inputs):
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = self.down(x)
        x = F.relu(x)
        x = self.up(x)
        x = torch.sigmoid(x)
        x = x.view(-1, self.input_channels, 1, 1)
        return inputs * x


@block
class QARepVGGBlock(RepVGGBlock):
    """YOLOv6 QARepVGGBlock. The reference ``switch_to_deploy`` keeps the post BN ("keep post bn
    for QAT"); ``switch_to_deploy(fuse_post_bn=True)`` also folds it with the class's own
    ``_fuse_extra_bn_tensor`` so the deploy model is one Conv + ReLU per block."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups=1, padding_mode="zeros", deploy=False, use_se=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         padding_mode, deploy, use_se)
        if not deploy:
            self.bn = nn.BatchNorm2d(out_channels)
            self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                     groups=groups, bias=False)
            self.rbr_identity = (nn.Identity()
                                 if out_channels == in_channels and stride == 1 else None)
        self._id_tensor = None

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(inputs))))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs)
                                                 + id_out)))

    def get_equivalent_kernel_bias(self):
        kernel3x3, bias3x3 = self._fuse_bn_tensor(self.rbr_dense)
        kernel = kernel3x3 + self._pad_1x1_to_3x3_tensor(self.rbr_1x1.weight)
        bias = bias3x3
        if self.rbr_identity is not None:
            kernel = kernel + self._id_kernel()
        return kernel, bias

    def _fuse_extra_bn_tensor(self, kernel, bias, branch):
        assert isinstance(branch, nn.BatchNorm2d)
        running_mean = branch.running_mean - bias  # remove bias
        std = (branch.running_var + branch.eps).sqrt()
        t = (branch.weight / std).reshape(-1, 1, 1, 1)
        return kernel * t, branch.bias - running_mean * branch.weight / std

    def switch_to_deploy(self, fuse_post_bn=True):
        super().switch_to_deploy()
        if fuse_post_bn and isinstance(self.bn, nn.BatchNorm2d):
            k, b = self._fuse_extra_bn_tensor(self.rbr_reparam.weight, self.rbr_reparam.bias,
                                              self.bn)
            self.rbr_reparam.weight.data = k.detach()
            self.rbr_reparam.bias.data = b.detach()
            self.bn = nn.Identity()


@block
class QARepVGGBlockV2(QARepVGGBlock):
    """YOLOv6 QARepVGGBlockV2: + rbr_avg = AvgPool2d(kernel_size, stride, padding) when
    in == out and stride 1 (count_include_pad=True, the default). ``count_include_pad=False``
    makes the (non-reference) variant whose AvgPool is not a convolution at the borders: its
    ``switch_to_deploy`` refuses (the block stays multi-branch in the deploy model)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups=1, padding_mode="zeros", deploy=False, use_se=False,
                 count_include_pad=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         padding_mode, deploy, use_se)
        if not deploy:
            self.rbr_avg = (nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding,
                                         count_include_pad=count_include_pad)
                            if out_channels == in_channels and stride == 1 else None)

    def foldable(self):
        return getattr(self, "rbr_avg", None) is None or self.rbr_avg.count_include_pad

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(inputs))))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        avg_out = 0 if self.rbr_avg is None else self.rbr_avg(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs)
                                                 + id_out + avg_out)))

    def get_equivalent_kernel_bias(self):
        kernel3x3, bias3x3 = self._fuse_bn_tensor(self.rbr_dense)
        kernel = kernel3x3 + self._pad_1x1_to_3x3_tensor(self.rbr_1x1.weight)
        if self.rbr_avg is not None:
            kernel = kernel + self._avg_to_3x3_tensor(self.rbr_avg)
        bias = bias3x3
        if self.rbr_identity is not None:
            kernel = kernel + self._id_kernel()
        return kernel, bias

    def switch_to_deploy(self, fuse_post_bn=True):
        if not self.foldable():
            return  # AvgPool with count_include_pad=False: not a convolution, keep the branches
        super().switch_to_deploy(fuse_post_bn)


class RepBlock(nn.Module):
    """YOLOv6 RepBlock: conv1, then n-1 blocks."""

    def __init__(self, in_channels, out_channels, n=1, block=RepVGGBlock, **kw):
        super().__init__()
        self.conv1 = block(in_channels, out_channels, **kw)
        self.block = (nn.Sequential(*(block(out_channels, out_channels, **kw)
                                      for _ in range(n - 1))) if n > 1 else None)

    def forward(self, x):
        x = self.conv1(x)
        if self.block is not None:
            x = self.block(x)
        return x


class EfficientRepLite(nn.Module):
    """The first two blocks of YOLOv6's EfficientRep: stem (stride 2, no identity), then
    ERBlock_2 (a RepBlock whose conv1 has the identity)."""

    def __init__(self, block, c_in=4, c=8, **kw):
        super().__init__()
        self.stem = block(c_in, c, 3, 2, **kw)
        self.ERBlock_2 = RepBlock(c, c, n=1, block=block, **kw)

    def forward(self, x):
        return self.ERBlock_2(self.stem(x))


# ============================================================================================
# 3. MobileOne (apple/ml-mobileone, mobileone.py)
# ============================================================================================

@block
class MobileOneBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, inference_mode=False, use_se=False, num_conv_branches=1):
        super().__init__()
        self.inference_mode = inference_mode
        self.groups = groups
        self.stride = stride
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches
        assert not use_se
        self.se = nn.Identity()
        self.activation = nn.ReLU()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                          dilation, groups, bias=True)
        else:
            self.rbr_skip = (nn.BatchNorm2d(num_features=in_channels)
                             if out_channels == in_channels and stride == 1 else None)
            rbr_conv = list()
            for _ in range(self.num_conv_branches):
                rbr_conv.append(self._conv_bn(kernel_size=kernel_size, padding=padding))
            self.rbr_conv = nn.ModuleList(rbr_conv)
            self.rbr_scale = None
            if kernel_size > 1:
                self.rbr_scale = self._conv_bn(kernel_size=1, padding=0)

    def rep_info(self):
        return getattr(self, "rbr_skip", None) is not None, self.groups

    def forward(self, x):
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))

    def reparameterize(self):
        if self.inference_mode:
            return
        kernel, bias = self._get_kernel_bias()
        c = self.rbr_conv[0].conv
        self.reparam_conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride,
                                      c.padding, c.dilation, c.groups, bias=True)
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        for para in self.parameters():
            para.detach_()
        self.__delattr__("rbr_conv")
        self.__delattr__("rbr_scale")
        if hasattr(self, "rbr_skip"):
            self.__delattr__("rbr_skip")
        self.inference_mode = True

    def _get_kernel_bias(self):
        kernel_scale, bias_scale = 0, 0
        if self.rbr_scale is not None:
            kernel_scale, bias_scale = self._fuse_bn_tensor(self.rbr_scale)
            pad = self.kernel_size // 2
            kernel_scale = F.pad(kernel_scale, [pad, pad, pad, pad])
        kernel_identity, bias_identity = 0, 0
        if self.rbr_skip is not None:
            kernel_identity, bias_identity = self._fuse_bn_tensor(self.rbr_skip)
        kernel_conv, bias_conv = 0, 0
        for ix in range(self.num_conv_branches):
            _kernel, _bias = self._fuse_bn_tensor(self.rbr_conv[ix])
            kernel_conv += _kernel
            bias_conv += _bias
        return (kernel_conv + kernel_scale + kernel_identity,
                bias_conv + bias_scale + bias_identity)

    def _fuse_bn_tensor(self, branch):
        if isinstance(branch, nn.Sequential):
            return fuse_seq_bn(branch.conv.weight, branch.bn)
        assert isinstance(branch, nn.BatchNorm2d)
        if not hasattr(self, "id_tensor"):
            input_dim = self.in_channels // self.groups
            kernel_value = torch.zeros((self.in_channels, input_dim, self.kernel_size,
                                        self.kernel_size), dtype=branch.weight.dtype)
            for i in range(self.in_channels):
                kernel_value[i, i % input_dim, self.kernel_size // 2, self.kernel_size // 2] = 1
            self.id_tensor = kernel_value
        return fuse_seq_bn(self.id_tensor, branch)

    def _conv_bn(self, kernel_size, padding):
        mod_list = nn.Sequential()
        mod_list.add_module("conv", nn.Conv2d(self.in_channels, self.out_channels, kernel_size,
                                              self.stride, padding, groups=self.groups,
                                              bias=False))
        mod_list.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return mod_list


class MobileOneLite(nn.Module):
    """One MobileOne stage as ``MobileOne._make_stage`` builds it (2 blocks, first stride 2):
    depthwise 3x3 block then pointwise 1x1 block, each a MobileOneBlock with ReLU."""

    def __init__(self, in_planes=8, planes=16, num_blocks=2, k=4):
        super().__init__()
        blocks = []
        for ix, stride in enumerate([2] + [1] * (num_blocks - 1)):
            blocks.append(MobileOneBlock(in_planes, in_planes, 3, stride, 1, groups=in_planes,
                                         num_conv_branches=k))
            blocks.append(MobileOneBlock(in_planes, planes, 1, 1, 0, groups=1,
                                         num_conv_branches=k))
            in_planes = planes
        self.stage1 = nn.Sequential(*blocks)

    def forward(self, x):
        return self.stage1(x)


# ============================================================================================
# 4. YOLOv7 RepConv (WongKinYiu/yolov7 models/common.py) and ultralytics RepConv
# ============================================================================================

def autopad(k, p=None, d=1):
    if d > 1:
        k = d * (k - 1) + 1
    if p is None:
        p = k // 2
    return p


@block
class RepConv(nn.Module):
    """YOLOv7 RepConv: rbr_dense / rbr_1x1 are nn.Sequential(Conv2d, BatchNorm2d) (indices 0, 1)."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False):
        super().__init__()
        self.deploy = deploy
        self.groups = g
        self.in_channels = c1
        self.out_channels = c2
        assert k == 3
        assert autopad(k, p) == 1
        padding_11 = autopad(k, p) - k // 2
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module)
                                                  else nn.Identity())
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=True)
        else:
            self.rbr_identity = (nn.BatchNorm2d(num_features=c1) if c2 == c1 and s == 1 else None)
            self.rbr_dense = nn.Sequential(
                nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False),
                nn.BatchNorm2d(num_features=c2))
            self.rbr_1x1 = nn.Sequential(
                nn.Conv2d(c1, c2, 1, s, padding_11, groups=g, bias=False),
                nn.BatchNorm2d(num_features=c2))

    def rep_info(self):
        return getattr(self, "rbr_identity", None) is not None, self.groups

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    def get_equivalent_kernel_bias(self):
        kernel3x3, bias3x3 = self._fuse_bn_tensor(self.rbr_dense)
        kernel1x1, bias1x1 = self._fuse_bn_tensor(self.rbr_1x1)
        kernelid, biasid = self._fuse_bn_tensor(self.rbr_identity)
        pad1 = 0 if isinstance(kernel1x1, int) else F.pad(kernel1x1, [1, 1, 1, 1])
        return kernel3x3 + pad1 + kernelid, bias3x3 + bias1x1 + biasid

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, nn.Sequential):
            return fuse_seq_bn(branch[0].weight, branch[1])
        assert isinstance(branch, nn.BatchNorm2d)
        if not hasattr(self, "id_tensor"):
            input_dim = self.in_channels // self.groups
            kernel_value = np.zeros((self.in_channels, input_dim, 3, 3), dtype=np.float32)
            for i in range(self.in_channels):
                kernel_value[i, i % input_dim, 1, 1] = 1
            self.id_tensor = torch.from_numpy(kernel_value)
        return fuse_seq_bn(self.id_tensor, branch)

    def fuse_repvgg_block(self):
        # (YOLOv7's own fuse_repvgg_block folds the identity with a 1x1 kernel that is wrong for
        # groups > 1; these blocks are not grouped, the RepVGG formula above is used.)
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        c = self.rbr_dense[0]
        self.rbr_reparam = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride,
                                     c.padding, c.dilation, c.groups, bias=True)
        self.rbr_reparam.weight.data = kernel
        self.rbr_reparam.bias.data = bias
        for para in self.parameters():
            para.detach_()
        self.__delattr__("rbr_dense")
        self.__delattr__("rbr_1x1")
        if hasattr(self, "rbr_identity"):
            self.__delattr__("rbr_identity")
        self.deploy = True


class UConv(nn.Module):
    """ultralytics Conv: conv (bias=False), bn, act."""
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = (self.default_act if act is True
                    else act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@block
class URepConv(nn.Module):
    """ultralytics RepConv (ultralytics/nn/modules/conv.py): conv1 (3x3 UConv, no act), conv2
    (1x1 UConv, no act), optional identity ``bn`` (bn=True, c1 == c2, s == 1)."""
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False, deploy=False):
        super().__init__()
        assert k == 3 and p == 1
        self.g = g
        self.c1 = c1
        self.c2 = c2
        self.act = (self.default_act if act is True
                    else act if isinstance(act, nn.Module) else nn.Identity())
        self.bn = nn.BatchNorm2d(num_features=c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = UConv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = UConv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def rep_info(self):
        return getattr(self, "bn", None) is not None, self.g

    def forward_fuse(self, x):
        return self.act(self.conv(x))

    def forward(self, x):
        if hasattr(self, "conv"):  # ultralytics swaps forward for forward_fuse after fusing
            return self.forward_fuse(x)
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)

    def get_equivalent_kernel_bias(self):
        kernel3x3, bias3x3 = self._fuse_bn_tensor(self.conv1)
        kernel1x1, bias1x1 = self._fuse_bn_tensor(self.conv2)
        kernelid, biasid = self._fuse_bn_tensor(self.bn)
        pad1 = 0 if isinstance(kernel1x1, int) else F.pad(kernel1x1, [1, 1, 1, 1])
        return kernel3x3 + pad1 + kernelid, bias3x3 + bias1x1 + biasid

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, UConv):
            return fuse_seq_bn(branch.conv.weight, branch.bn)
        assert isinstance(branch, nn.BatchNorm2d)
        input_dim = self.c1 // self.g
        kernel_value = np.zeros((self.c1, input_dim, 3, 3), dtype=np.float32)
        for i in range(self.c1):
            kernel_value[i, i % input_dim, 1, 1] = 1
        return fuse_seq_bn(torch.from_numpy(kernel_value), branch)

    def fuse_convs(self):
        if hasattr(self, "conv"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        c = self.conv1.conv
        self.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                              c.dilation, c.groups, bias=True).requires_grad_(False)
        self.conv.weight.data = kernel
        self.conv.bias.data = bias
        for para in self.parameters():
            para.detach_()
        self.__delattr__("conv1")
        self.__delattr__("conv2")
        if hasattr(self, "bn"):
            self.__delattr__("bn")


class YoloRepLite(nn.Module):
    """model.0 / model.1: YOLOv7 RepConv (4->8 stride 2, no identity; 8->8 with identity BN);
    model.2: ultralytics RepConv (8->8, bn=False as in RT-DETR's RepC3: no identity).
    Every BN has eps=1e-3, momentum=0.03 (both codebases' initialize_weights)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(RepConv(4, 8, 3, 2), RepConv(8, 8, 3, 1), URepConv(8, 8))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3
                m.momentum = 0.03

    def forward(self, x):
        return self.model(x)


# ============================================================================================
# 5. RepVGG-D2se block, 9. dilated RepVGG
# ============================================================================================

class RepVGGSELite(nn.Module):
    """stage0 (3->8, stride 2, no identity) and stage1.0 (8->8, identity), both with use_se.
    The official D2se uses internal_neurons = out // 16; with 8 channels that is 0, so these use
    out // 4 (RepVGGplus's post_se ratio): 2."""

    def __init__(self):
        super().__init__()
        self.stage0 = RepVGGBlock(3, 8, 3, stride=2, padding=1, use_se=True, se_internal=2)
        self.stage1 = nn.Sequential(RepVGGBlock(8, 8, 3, stride=1, padding=1, use_se=True,
                                                se_internal=2))

    def forward(self, x):
        return self.stage1(self.stage0(x))


class DilatedRepVGGLite(nn.Module):
    """layer4.0: RepVGG block, 3x3 dilation 2 / padding 2; layer4.1: dilation 4 / padding 4
    (1x1 and identity BN unchanged), as segmentation backbones dilate the last stages."""

    def __init__(self, c=8):
        super().__init__()
        self.layer4 = nn.Sequential(RepVGGBlock(c, c, 3, 1, padding=2, dilation=2),
                                    RepVGGBlock(c, c, 3, 1, padding=4, dilation=4))

    def forward(self, x):
        return self.layer4(x)


# ============================================================================================
# 6. ACNet ACBlock (DingXiaoH/ACNet acnet/acb.py)
# ============================================================================================

@block
class ACBlock(nn.Module):
    """ACBlock (use_affine=True, crop=0 case): square_conv+square_bn, ver_conv (k x 1, padding
    [p, 0]) + ver_bn, hor_conv (1 x k, padding [0, p]) + hor_bn, summed, no activation.
    ``asym_bias=True`` is a (non-reference) variant: ver/hor convs with bias and no BN."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, padding_mode="zeros", deploy=False, asym_bias=False):
        super().__init__()
        self.deploy = deploy
        self.groups = groups
        self.asym_bias = asym_bias
        if deploy:
            self.fused_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size),
                                        stride, padding, dilation, groups, bias=True,
                                        padding_mode=padding_mode)
            return
        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride,
                                     padding, dilation, groups, bias=False,
                                     padding_mode=padding_mode)
        self.square_bn = nn.BatchNorm2d(num_features=out_channels)
        assert padding - kernel_size // 2 >= 0
        self.crop = 0
        hor_padding = [padding - kernel_size // 2, padding]
        ver_padding = [padding, padding - kernel_size // 2]
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride, ver_padding,
                                  dilation, groups, bias=asym_bias, padding_mode=padding_mode)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride, hor_padding,
                                  dilation, groups, bias=asym_bias, padding_mode=padding_mode)
        if asym_bias:
            self.ver_bn = nn.Identity()
            self.hor_bn = nn.Identity()
        else:
            self.ver_bn = nn.BatchNorm2d(num_features=out_channels)
            self.hor_bn = nn.BatchNorm2d(num_features=out_channels)

    def rep_info(self):
        return None, self.groups

    def _fuse_bn_tensor(self, conv, bn):
        if isinstance(bn, nn.Identity):
            return conv.weight, conv.bias
        return fuse_seq_bn(conv.weight, bn)

    def _add_to_square_kernel(self, square_kernel, asym_kernel):
        asym_h, asym_w = asym_kernel.size(2), asym_kernel.size(3)
        square_h, square_w = square_kernel.size(2), square_kernel.size(3)
        square_kernel[:, :, square_h // 2 - asym_h // 2: square_h // 2 - asym_h // 2 + asym_h,
                      square_w // 2 - asym_w // 2: square_w // 2 - asym_w // 2 + asym_w] += asym_kernel

    def get_equivalent_kernel_bias(self):
        hor_k, hor_b = self._fuse_bn_tensor(self.hor_conv, self.hor_bn)
        ver_k, ver_b = self._fuse_bn_tensor(self.ver_conv, self.ver_bn)
        square_k, square_b = self._fuse_bn_tensor(self.square_conv, self.square_bn)
        square_k = square_k.clone()
        self._add_to_square_kernel(square_k, hor_k)
        self._add_to_square_kernel(square_k, ver_k)
        return square_k, hor_b + ver_b + square_b

    def switch_to_deploy(self):
        deploy_k, deploy_b = self.get_equivalent_kernel_bias()
        self.deploy = True
        sq = self.square_conv
        self.fused_conv = nn.Conv2d(sq.in_channels, sq.out_channels, sq.kernel_size, sq.stride,
                                    sq.padding, sq.dilation, sq.groups, bias=True,
                                    padding_mode=sq.padding_mode)
        self.__delattr__("square_conv")
        self.__delattr__("square_bn")
        self.__delattr__("hor_conv")
        self.__delattr__("hor_bn")
        self.__delattr__("ver_conv")
        self.__delattr__("ver_bn")
        self.fused_conv.weight.data = deploy_k.detach()
        self.fused_conv.bias.data = deploy_b.detach()

    def forward(self, input):
        if self.deploy:
            return self.fused_conv(input)
        square_outputs = self.square_bn(self.square_conv(input))
        vertical_outputs = self.ver_bn(self.ver_conv(input))
        horizontal_outputs = self.hor_bn(self.hor_conv(input))
        return square_outputs + vertical_outputs + horizontal_outputs


class ACNetLite(nn.Module):
    """conv1: ACBlock 4->8 (3x3, stride 1) + relu1; conv2: the bias/no-BN variant 8->8 stride 2
    + relu2 (ACNet replaces a ResNet/VGG conv by an ACBlock; the ReLU stays outside)."""

    def __init__(self):
        super().__init__()
        self.conv1 = ACBlock(4, 8, 3, 1, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = ACBlock(8, 8, 3, 2, 1, asym_bias=True)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))


# ============================================================================================
# 7. RepLKNet ReparamLargeKernelConv (DingXiaoH/RepLKNet-pytorch replknet.py)
# ============================================================================================

def fuse_bn(conv, bn):
    """RepLKNet / UniRepLKNet fuse_bn (conv bias included when present)."""
    conv_bias = 0 if conv.bias is None else conv.bias
    std = (bn.running_var + bn.eps).sqrt()
    return (conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1),
            bn.bias + (conv_bias - bn.running_mean) * bn.weight / std)


@block
class ReparamLargeKernelConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, groups, small_kernel,
                 small_kernel_merged=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.groups = groups
        padding = kernel_size // 2
        if small_kernel_merged:
            self.lkb_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                         1, groups, bias=True)
        else:
            self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding,
                                      groups=groups)
            if small_kernel is not None:
                assert small_kernel <= kernel_size
                self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride,
                                          small_kernel // 2, groups=groups)

    def rep_info(self):
        return None, self.groups

    def forward(self, inputs):
        if hasattr(self, "lkb_reparam"):
            out = self.lkb_reparam(inputs)
        else:
            out = self.lkb_origin(inputs)
            if hasattr(self, "small_conv"):
                out += self.small_conv(inputs)
        return out

    def get_equivalent_kernel_bias(self):
        eq_k, eq_b = fuse_bn(self.lkb_origin.conv, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            small_k, small_b = fuse_bn(self.small_conv.conv, self.small_conv.bn)
            eq_b += small_b
            eq_k += F.pad(small_k, [(self.kernel_size - self.small_kernel) // 2] * 4)
        return eq_k, eq_b

    def merge_kernel(self):
        eq_k, eq_b = self.get_equivalent_kernel_bias()
        c = self.lkb_origin.conv
        self.lkb_reparam = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride,
                                     c.padding, c.dilation, c.groups, bias=True)
        self.lkb_reparam.weight.data = eq_k.detach()
        self.lkb_reparam.bias.data = eq_b.detach()
        self.__delattr__("lkb_origin")
        if hasattr(self, "small_conv"):
            self.__delattr__("small_conv")


class RepLKBlockLite(nn.Module):
    """large_kernel + lk_nonlinear of a RepLKBlock (the 1x1 pw convs and the shortcut left out)."""

    def __init__(self, c, k, small, stride):
        super().__init__()
        self.large_kernel = ReparamLargeKernelConv(c, c, k, stride, groups=c, small_kernel=small)
        self.lk_nonlinear = nn.ReLU()

    def forward(self, x):
        return self.lk_nonlinear(self.large_kernel(x))


class RepLKNetLite(nn.Module):
    """stages.0: dw 7x7 + dw 5x5 (stride 1; RepLKNet's default small_kernel is 5);
    stages.1: dw 7x7 + dw 3x3, stride 2."""

    def __init__(self, c=8):
        super().__init__()
        self.stages = nn.Sequential(RepLKBlockLite(c, 7, 5, 1), RepLKBlockLite(c, 7, 3, 2))

    def forward(self, x):
        return self.stages(x)


# ============================================================================================
# 8. UniRepLKNet DilatedReparamBlock (AILab-CVC/UniRepLKNet unireplknet.py)
# ============================================================================================

def convert_dilated_to_nondilated(kernel, dilate_rate):
    identity_kernel = torch.ones((1, 1, 1, 1))
    if kernel.size(1) == 1:
        return F.conv_transpose2d(kernel, identity_kernel, stride=dilate_rate)
    slices = []
    for i in range(kernel.size(1)):
        slices.append(F.conv_transpose2d(kernel[:, i:i + 1, :, :], identity_kernel,
                                         stride=dilate_rate))
    return torch.cat(slices, dim=1)


def merge_dilated_into_large_kernel(large_kernel, dilated_kernel, dilated_r):
    large_k = large_kernel.size(2)
    dilated_k = dilated_kernel.size(2)
    equivalent_kernel_size = dilated_r * (dilated_k - 1) + 1
    equivalent_kernel = convert_dilated_to_nondilated(dilated_kernel, dilated_r)
    rows_to_pad = large_k // 2 - equivalent_kernel_size // 2
    return large_kernel + F.pad(equivalent_kernel, [rows_to_pad] * 4)


@block
class DilatedReparamBlock(nn.Module):
    def __init__(self, channels, kernel_size, deploy=False):
        super().__init__()
        self.channels = channels
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, stride=1,
                                   padding=kernel_size // 2, dilation=1, groups=channels,
                                   bias=deploy)
        if kernel_size == 7:
            self.kernel_sizes = [5, 3, 3]
            self.dilates = [1, 2, 3]
        elif kernel_size == 5:
            self.kernel_sizes = [3, 3]
            self.dilates = [1, 2]
        else:
            raise ValueError("only kernel sizes 5 and 7 here")
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                self.__setattr__(f"dil_conv_k{k}_{r}",
                                 nn.Conv2d(channels, channels, kernel_size=k, stride=1,
                                           padding=(r * (k - 1) + 1) // 2, dilation=r,
                                           groups=channels, bias=False))
                self.__setattr__(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def rep_info(self):
        return None, self.channels

    def forward(self, x):
        if not hasattr(self, "origin_bn"):  # deploy mode
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = self.__getattr__(f"dil_conv_k{k}_{r}")
            bn = self.__getattr__(f"dil_bn_k{k}_{r}")
            out = out + bn(conv(x))
        return out

    def merge_dilated_branches(self):
        if hasattr(self, "origin_bn"):
            origin_k, origin_b = fuse_bn(self.lk_origin, self.origin_bn)
            for k, r in zip(self.kernel_sizes, self.dilates):
                conv = self.__getattr__(f"dil_conv_k{k}_{r}")
                bn = self.__getattr__(f"dil_bn_k{k}_{r}")
                branch_k, branch_b = fuse_bn(conv, bn)
                origin_k = merge_dilated_into_large_kernel(origin_k, branch_k, r)
                origin_b = origin_b + branch_b
            merged_conv = nn.Conv2d(origin_k.size(0), origin_k.size(0), origin_k.size(2), stride=1,
                                    padding=origin_k.size(2) // 2, dilation=1,
                                    groups=origin_k.size(0), bias=True)
            merged_conv.weight.data = origin_k.detach()
            merged_conv.bias.data = origin_b.detach()
            self.lk_origin = merged_conv
            self.__delattr__("origin_bn")
            for k, r in zip(self.kernel_sizes, self.dilates):
                self.__delattr__(f"dil_conv_k{k}_{r}")
                self.__delattr__(f"dil_bn_k{k}_{r}")


class UniRepLKNetBlockLite(nn.Module):
    """dwconv (DilatedReparamBlock) then, when ``use_norm``, the block's ``norm`` BN, folded into
    the merged conv by UniRepLKNetBlock.reparameterize (a BN after the sum)."""

    def __init__(self, dim, kernel_size, use_norm):
        super().__init__()
        self.dwconv = DilatedReparamBlock(dim, kernel_size)
        self.norm = nn.BatchNorm2d(dim) if use_norm else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(self.dwconv(x)))

    def reparameterize(self):
        if hasattr(self.dwconv, "merge_dilated_branches"):
            self.dwconv.merge_dilated_branches()
        if hasattr(self.norm, "running_var"):
            std = (self.norm.running_var + self.norm.eps).sqrt()
            lk = self.dwconv.lk_origin
            lk.weight.data = lk.weight.data * (self.norm.weight / std).view(-1, 1, 1, 1).detach()
            lk.bias.data = (self.norm.bias + (lk.bias - self.norm.running_mean)
                            * self.norm.weight / std).detach()
            self.norm = nn.Identity()


class UniRepLKNetLite(nn.Module):
    """stages.0.0: DilatedReparamBlock k7 (branches k5 d1, k3 d2, k3 d3), no norm;
    stages.0.1: DilatedReparamBlock k5 (k3 d1, k3 d2) followed by the block's BN."""

    def __init__(self, c=8):
        super().__init__()
        self.stages = nn.Sequential(nn.Sequential(UniRepLKNetBlockLite(c, 7, False),
                                                  UniRepLKNetBlockLite(c, 5, True)))

    def forward(self, x):
        return self.stages(x)


# ============================================================================================
# 10. RepViT RepVGGDW (THU-MIG/RepViT model/repvit.py)
# ============================================================================================

class Conv2d_BN(nn.Sequential):
    def __init__(self, a, b, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self):
        c, bn = self._modules.values()
        w = bn.weight / (bn.running_var + bn.eps) ** 0.5
        w = c.weight * w[:, None, None, None]
        b = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5
        m = nn.Conv2d(w.size(1) * self.c.groups, w.size(0), w.shape[2:], stride=self.c.stride,
                      padding=self.c.padding, dilation=self.c.dilation, groups=self.c.groups)
        m.weight.data.copy_(w)
        m.bias.data.copy_(b)
        return m


@block
class RepVGGDW(nn.Module):
    def __init__(self, ed):
        super().__init__()
        self.conv = Conv2d_BN(ed, ed, 3, 1, 1, groups=ed)
        self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
        self.dim = ed
        self.bn = nn.BatchNorm2d(ed)

    def rep_info(self):
        return True, self.dim

    def forward(self, x):
        return self.bn((self.conv(x) + self.conv1(x)) + x)

    @torch.no_grad()
    def fuse(self):
        conv = self.conv.fuse()
        conv1 = self.conv1
        conv_w, conv_b = conv.weight, conv.bias
        conv1_w, conv1_b = conv1.weight, conv1.bias
        conv1_w = F.pad(conv1_w, [1, 1, 1, 1])
        identity = F.pad(torch.ones(conv1_w.shape[0], conv1_w.shape[1], 1, 1), [1, 1, 1, 1])
        final_conv_w = conv_w + conv1_w + identity
        final_conv_b = conv_b + conv1_b
        conv.weight.data.copy_(final_conv_w)
        conv.bias.data.copy_(final_conv_b)
        bn = self.bn
        w = bn.weight / (bn.running_var + bn.eps) ** 0.5
        w = conv.weight * w[:, None, None, None]
        b = bn.bias + (conv.bias - bn.running_mean) * bn.weight / (bn.running_var + bn.eps) ** 0.5
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(b)
        return conv


def replace_batchnorm(net):
    """RepViT utils.replace_batchnorm: fuse() every module that has it; leftover BNs -> Identity."""
    for child_name, child in net.named_children():
        if hasattr(child, "fuse"):
            fused = child.fuse()
            setattr(net, child_name, fused)
            replace_batchnorm(fused)
        elif isinstance(child, nn.BatchNorm2d):
            setattr(net, child_name, nn.Identity())
        else:
            replace_batchnorm(child)


class RepViTBlockLite(nn.Module):
    """token_mixer = Sequential(RepVGGDW, Identity (no SE)), then a ReLU (the channel mixer left out)."""

    def __init__(self, c):
        super().__init__()
        self.token_mixer = nn.Sequential(RepVGGDW(c), nn.Identity())
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.token_mixer(x))


class RepViTLite(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.features = nn.Sequential(RepViTBlockLite(c), RepViTBlockLite(c))

    def forward(self, x):
        return self.features(x)


# ============================================================================================
# 11. Standalone folds (no branches)
# ============================================================================================

class PlainCNN(nn.Module):
    """conv1+bn1 -> ReLU; conv2 (bias) -> x * scale.view(1,C,1,1) + shift.view(1,C,1,1) (a
    decomposed BN) -> ReLU; conv3 (no bias, stride 2) + bias3.view(1,C,1,1) -> ReLU.
    ``switch_to_deploy`` folds each into its Conv: 3 folds."""

    def __init__(self, c_in=4, c=8):
        super().__init__()
        self.c = c
        self.conv1 = nn.Conv2d(c_in, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=True)
        self.scale = nn.Parameter(torch.rand(c) + 0.5)
        self.shift = nn.Parameter(torch.randn(c) * 0.3)
        self.conv3 = nn.Conv2d(c, c, 3, 2, 1, bias=False)
        self.bias3 = nn.Parameter(torch.randn(c) * 0.3)
        self.relu = nn.ReLU()
        self.deploy = False

    def forward(self, x):
        c = self.c
        if self.deploy:
            return self.relu(self.conv3(self.relu(self.conv2(self.relu(self.conv1(x))))))
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.conv2(x) * self.scale.view(1, c, 1, 1) + self.shift.view(1, c, 1, 1)
        x = self.relu(x)
        x = self.conv3(x) + self.bias3.view(1, c, 1, 1)
        return self.relu(x)

    @torch.no_grad()
    def switch_to_deploy(self):
        if self.deploy:
            return
        k, b = fuse_seq_bn(self.conv1.weight, self.bn1)
        conv1 = nn.Conv2d(self.conv1.in_channels, self.c, 3, 1, 1, bias=True)
        conv1.weight.data, conv1.bias.data = k.clone(), b.clone()
        conv2 = nn.Conv2d(self.c, self.c, 3, 1, 1, bias=True)
        conv2.weight.data = self.conv2.weight * self.scale.view(-1, 1, 1, 1)
        conv2.bias.data = self.conv2.bias * self.scale + self.shift
        conv3 = nn.Conv2d(self.c, self.c, 3, 2, 1, bias=True)
        conv3.weight.data = self.conv3.weight.clone()
        conv3.bias.data = self.bias3.clone()
        self.conv1, self.conv2, self.conv3 = conv1, conv2, conv3
        for name in ("bn1", "scale", "shift", "bias3"):
            self.__delattr__(name)
        self.deploy = True


# ============================================================================================
# 12. RepVGG-style Conv1d / Conv3d blocks
# ============================================================================================

@block
class RepVGGBlockND(nn.Module):
    """RepVGG block for 1-D or 3-D data: rbr_dense (3-tap Conv+BN, padding 1), rbr_1x1 (1-tap
    Conv+BN), rbr_identity (BN iff in == out and stride 1), sum, ReLU."""

    def __init__(self, in_channels, out_channels, stride=1, dims=1):
        super().__init__()
        self.dims = dims
        self.in_channels = in_channels
        self.groups = 1
        Conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
        BN = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims]
        self.nonlinearity = nn.ReLU()
        self.rbr_identity = (BN(in_channels) if in_channels == out_channels and stride == 1
                             else None)
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, 1, conv=Conv, bn=BN)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, conv=Conv, bn=BN)

    def rep_info(self):
        return getattr(self, "rbr_identity", None) is not None, 1

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    @torch.no_grad()
    def switch_to_deploy(self):
        d = self.dims
        k3, b3 = fuse_seq_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        k1, b1 = fuse_seq_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel = k3 + F.pad(k1, [1, 1] * d)
        bias = b3 + b1
        if self.rbr_identity is not None:
            idk = torch.zeros_like(k3)
            for i in range(self.in_channels):
                idk[(i, i) + (1,) * d] = 1
            ki, bi = fuse_seq_bn(idk, self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        c = self.rbr_dense.conv
        self.rbr_reparam = type(c)(c.in_channels, c.out_channels, c.kernel_size, c.stride,
                                   c.padding, c.dilation, c.groups, bias=True)
        self.rbr_reparam.weight.data = kernel
        self.rbr_reparam.bias.data = bias
        self.__delattr__("rbr_dense")
        self.__delattr__("rbr_1x1")
        self.__delattr__("rbr_identity")


class RepND(nn.Module):
    """stage0: 4->8 (no identity); stage1: 8->8 (identity BN)."""

    def __init__(self, dims):
        super().__init__()
        self.stage0 = RepVGGBlockND(4, 8, 1, dims)
        self.stage1 = RepVGGBlockND(8, 8, 1, dims)

    def forward(self, x):
        return self.stage1(self.stage0(x))


# ============================================================================================
# 13. Diverse Branch Block (DingXiaoH/DiverseBranchBlock diversebranchblock.py, dbb_transforms.py)
# ============================================================================================

def transI_fusebn(kernel, bn):
    gamma = bn.weight
    std = (bn.running_var + bn.eps).sqrt()
    return kernel * ((gamma / std).reshape(-1, 1, 1, 1)), bn.bias - bn.running_mean * gamma / std


def transII_addbranch(kernels, biases):
    return sum(kernels), sum(biases)


def transIII_1x1_kxk(k1, b1, k2, b2, groups):
    assert groups == 1
    k = F.conv2d(k2, k1.permute(1, 0, 2, 3))
    b_hat = (k2 * b1.reshape(1, -1, 1, 1)).sum((1, 2, 3))
    return k, b_hat + b2


def transV_avg(channels, kernel_size, groups):
    input_dim = channels // groups
    k = torch.zeros((channels, input_dim, kernel_size, kernel_size))
    k[np.arange(channels), np.tile(np.arange(input_dim), groups), :, :] = 1.0 / kernel_size ** 2
    return k


def transVI_multiscale(kernel, target_kernel_size):
    H_pixels_to_pad = (target_kernel_size - kernel.size(2)) // 2
    W_pixels_to_pad = (target_kernel_size - kernel.size(3)) // 2
    return F.pad(kernel, [H_pixels_to_pad, H_pixels_to_pad, W_pixels_to_pad, W_pixels_to_pad])


class IdentityBasedConv1x1(nn.Conv2d):
    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups,
                         bias=False)
        assert channels % groups == 0
        input_dim = channels // groups
        id_value = np.zeros((channels, input_dim, 1, 1))
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = torch.from_numpy(id_value).type_as(self.weight)
        # The reference zero-initializes the weight (a trained model has moved it): keep a
        # small random one so the branch is non-trivial.
        nn.init.normal_(self.weight, std=0.2)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation,
                        groups=self.groups)

    def get_actual_kernel(self):
        return self.weight + self.id_tensor.to(self.weight.device)


class BNAndPadLayer(nn.Module):
    def __init__(self, pad_pixels, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = (self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach()
                              / torch.sqrt(self.bn.running_var + self.bn.eps))
            else:
                pad_values = - self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


@block
class DiverseBranchBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, internal_channels_1x1_3x3=None, deploy=False, nonlinear=None):
        super().__init__()
        self.deploy = deploy
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size = kernel_size
        self.out_channels = out_channels
        self.groups = groups
        assert padding == kernel_size // 2
        assert groups == 1
        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding,
                                  groups=groups, dilation=dilation)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0,
                                                      groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding,
                                                        num_features=out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride,
                                                        padding=0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride,
                                                        padding=padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal_channels_1x1_3x3 == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(channels=in_channels,
                                                                        groups=groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal_channels_1x1_3x3,
                                                           1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding,
                                                         num_features=internal_channels_1x1_3x3,
                                                         affine=True))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal_channels_1x1_3x3, out_channels,
                                                       kernel_size, stride, 0, groups=groups,
                                                       bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def rep_info(self):
        return None, self.groups

    def get_equivalent_kernel_bias(self):
        k_origin, b_origin = transI_fusebn(self.dbb_origin.conv.weight, self.dbb_origin.bn)
        if hasattr(self, "dbb_1x1"):
            k_1x1, b_1x1 = transI_fusebn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            k_1x1 = transVI_multiscale(k_1x1, self.kernel_size)
        else:
            k_1x1, b_1x1 = 0, 0
        if hasattr(self.dbb_1x1_kxk, "idconv1"):
            k_1x1_kxk_first = self.dbb_1x1_kxk.idconv1.get_actual_kernel()
        else:
            k_1x1_kxk_first = self.dbb_1x1_kxk.conv1.weight
        k_1x1_kxk_first, b_1x1_kxk_first = transI_fusebn(k_1x1_kxk_first, self.dbb_1x1_kxk.bn1.bn)
        k_1x1_kxk_second, b_1x1_kxk_second = transI_fusebn(self.dbb_1x1_kxk.conv2.weight,
                                                           self.dbb_1x1_kxk.bn2)
        k_1x1_kxk_merged, b_1x1_kxk_merged = transIII_1x1_kxk(
            k_1x1_kxk_first, b_1x1_kxk_first, k_1x1_kxk_second, b_1x1_kxk_second,
            groups=self.groups)
        k_avg = transV_avg(self.out_channels, self.kernel_size, self.groups)
        k_1x1_avg_second, b_1x1_avg_second = transI_fusebn(k_avg, self.dbb_avg.avgbn)
        if hasattr(self.dbb_avg, "conv"):
            k_1x1_avg_first, b_1x1_avg_first = transI_fusebn(self.dbb_avg.conv.weight,
                                                             self.dbb_avg.bn.bn)
            k_1x1_avg_merged, b_1x1_avg_merged = transIII_1x1_kxk(
                k_1x1_avg_first, b_1x1_avg_first, k_1x1_avg_second, b_1x1_avg_second,
                groups=self.groups)
        else:
            k_1x1_avg_merged, b_1x1_avg_merged = k_1x1_avg_second, b_1x1_avg_second
        return transII_addbranch((k_origin, k_1x1, k_1x1_kxk_merged, k_1x1_avg_merged),
                                 (b_origin, b_1x1, b_1x1_kxk_merged, b_1x1_avg_merged))

    def switch_to_deploy(self):
        if hasattr(self, "dbb_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        c = self.dbb_origin.conv
        self.dbb_reparam = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride,
                                     c.padding, c.dilation, c.groups, bias=True)
        self.dbb_reparam.weight.data = kernel.detach()
        self.dbb_reparam.bias.data = bias.detach()
        for para in self.parameters():
            para.detach_()
        self.__delattr__("dbb_origin")
        self.__delattr__("dbb_avg")
        if hasattr(self, "dbb_1x1"):
            self.__delattr__("dbb_1x1")
        self.__delattr__("dbb_1x1_kxk")

    def forward(self, inputs):
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class DBBLite(nn.Module):
    """dbb1: one DBB 4->8 (3x3, stride 2, ReLU; one block only: each exports into hundreds of
    nodes). groups 1, so it has dbb_origin, dbb_1x1, dbb_avg (conv, BNAndPad, avg, avgbn) and
    dbb_1x1_kxk (idconv1, BNAndPad, conv2, bn2)."""

    def __init__(self):
        super().__init__()
        self.dbb1 = DiverseBranchBlock(4, 8, 3, 2, 1, nonlinear=nn.ReLU())

    def forward(self, x):
        return self.dbb1(x)


# ============================================================================================
# Model table
# ============================================================================================

BASE_FORMS = ["ts_fold_op17", "ts_nofold_op17", "dynamo_op18", "dynamo_noopt_op18",
              "deploy_ts_fold_op17"]

FORMS = collections.OrderedDict([
    ("ts_fold_op17", "TorchScript exporter, eval, opset 17, do_constant_folding=True"),
    ("ts_nofold_op17", "TorchScript exporter, eval, opset 17, do_constant_folding=False"),
    ("dynamo_op18", "dynamo exporter, opset 18, default external data"),
    ("dynamo_noopt_op18", "dynamo exporter, opset 18, optimize=False, default external data"),
    ("ts_train_op17", "TorchScript exporter, TrainingMode.TRAINING, opset 17, batch 2 (must be refused)"),
    ("ts_fold_op17_fp16", "model.half(), TorchScript exporter, opset 17, constant folding"),
    ("dynamo_noopt_op22_bf16", "model.to(torch.bfloat16), dynamo exporter, opset 22 (Conv accepts bfloat16 from opset 22), optimize=False"),
    ("deploy_ts_fold_op17", "the re-parameterized (deploy) model, TorchScript exporter, opset 17, constant folding"),
])


def _deploy_methods(model):
    """Call each block's own re-parameterization method (innermost first)."""
    for m in list(model.modules())[::-1]:
        for name in ("switch_to_deploy", "reparameterize", "merge_kernel", "fuse_convs",
                     "fuse_repvgg_block"):
            if hasattr(m, name):
                getattr(m, name)()
                break
    return model


def _deploy_repvit(model):
    replace_batchnorm(model)
    return model


# name -> dict(family, build, input shape, deploy, forms, expect(form) , description)
MODELS = collections.OrderedDict([
    ("qarepvgg", dict(
        family="qarepvgg", shape=(1, 4, 32, 32),
        build=lambda: EfficientRepLite(QARepVGGBlock),
        forms=BASE_FORMS + ["ts_train_op17", "ts_fold_op17_fp16", "dynamo_noopt_op22_bf16"],
        note="YOLOv6 QARepVGGBlock x2 (stem 4->8 stride 2; ERBlock_2.conv1 8->8 with raw identity)")),
    ("qarepvggv2", dict(
        family="qarepvggv2", shape=(1, 4, 32, 32),
        build=lambda: EfficientRepLite(QARepVGGBlockV2),
        note="YOLOv6 QARepVGGBlockV2 x2; ERBlock_2.conv1 has rbr_avg AvgPool2d(3, 1, 1, count_include_pad=True)")),
    ("qarepvggv2_nopad", dict(
        family="qarepvggv2", shape=(1, 4, 32, 32),
        build=lambda: EfficientRepLite(QARepVGGBlockV2, count_include_pad=False),
        seed_of="qarepvggv2",  # same weights and input: only count_include_pad differs
        expect="refused: count_include_pad",
        note="as qarepvggv2 with count_include_pad=False: ERBlock_2.conv1 must be refused (the stem, "
             "which has no AvgPool branch, still folds; its deploy model folds only the stem)")),
    ("mobileone", dict(
        family="mobileone", shape=(1, 8, 32, 32), build=lambda: MobileOneLite(8, 16, 2, 4),
        note="MobileOne stage1: dw3x3 s2 (8), pw1x1 (8->16), dw3x3 s1 (16, rbr_skip), pw1x1 (16->16, rbr_skip); "
             "num_conv_branches=4")),
    ("yolov7_repconv", dict(
        family="yolov7_repconv", shape=(1, 4, 32, 32), build=YoloRepLite,
        note="YOLOv7 RepConv 4->8 s2, RepConv 8->8 (identity BN), ultralytics RepConv 8->8 (bn=False); SiLU; BN eps 1e-3")),
    ("repvgg_se", dict(
        family="repvgg_se", shape=(1, 3, 32, 32), build=RepVGGSELite,
        note="official RepVGG blocks with use_se (SEBlock on the sum, internal 2): stage0 3->8 s2, stage1.0 8->8 identity")),
    ("acnet", dict(
        family="acnet", shape=(1, 4, 32, 32), build=ACNetLite,
        note="ACBlock 4->8 (3x3+3x1+1x3, Conv+BN each) and a variant 8->8 stride 2 whose 3x1/1x3 convs have bias and no BN")),
    ("replknet", dict(
        family="replknet", shape=(1, 8, 32, 32), build=RepLKNetLite,
        note="ReparamLargeKernelConv dw 7x7+5x5 (stride 1) and dw 7x7+3x3 (stride 2), 8 channels")),
    ("unireplknet", dict(
        family="unireplknet", shape=(1, 8, 16, 16), build=UniRepLKNetLite,
        note="DilatedReparamBlock k7 (k5 d1, k3 d2, k3 d3) and k5 (k3 d1, k3 d2) + post BN, 8 channels")),
    ("dilated_repvgg", dict(
        family="dilated_repvgg", shape=(1, 8, 16, 16), build=DilatedRepVGGLite,
        note="RepVGG blocks 8->8, 3x3 dilation 2 (pads 2) and dilation 4 (pads 4), 1x1, identity BN")),
    ("repvit", dict(
        family="repvit", shape=(1, 8, 16, 16), build=RepViTLite, deploy=_deploy_repvit,
        note="RepViT RepVGGDW x2 (dw3x3 Conv+BN, dw1x1 Conv with bias, raw x, post BN), 8 channels")),
    ("standalone", dict(
        family="standalone", shape=(1, 4, 16, 16), build=PlainCNN, blocks=(3, 0, 0),
        note="Conv+BN; Conv(bias) then per-channel Mul and Add; Conv(no bias, stride 2) then Add of a bias: 3 folds")),
    ("conv1d", dict(
        family="conv1d", shape=(1, 4, 16), build=lambda: RepND(1),
        forms=["ts_fold_op17", "dynamo_op18", "deploy_ts_fold_op17"],
        note="RepVGG-style Conv1d/BatchNorm1d blocks 4->8 (no identity) and 8->8 (identity)")),
    ("conv3d", dict(
        family="conv3d", shape=(1, 4, 8, 8, 8), build=lambda: RepND(3),
        forms=["ts_fold_op17", "dynamo_op18", "deploy_ts_fold_op17"],
        note="RepVGG-style Conv3d/BatchNorm3d blocks 4->8 (no identity) and 8->8 (identity)")),
    ("dbb", dict(
        family="dbb", shape=(1, 4, 16, 16), build=DBBLite,
        expect="partial: dbb_origin (kxk Conv+BN) and dbb_1x1 (1x1 Conv+BN) fold as usual; the "
               "1x1->BNAndPad->kxk and 1x1->BNAndPad->AvgPool branches are sequential compositions "
               "whose border values are written by slice assignments, foldable only by recognizing "
               "that pattern",
        forms=["ts_fold_op17", "ts_nofold_op17", "dynamo_op18", "deploy_ts_fold_op17"],
        note="one DiverseBranchBlock 4->8 stride 2, ReLU")),
])


def randomize(model, gen):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)


def block_counts(model, spec):
    if "blocks" in spec:
        return spec["blocks"]
    blocks = [m for m in model.modules() if getattr(type(m), "_rep_block", False)
              and hasattr(m, "rep_info")]
    # A QARepVGGBlock is a RepVGGBlock subclass: count each module once.
    n = len(blocks)
    without = sum(1 for b in blocks if b.rep_info()[0] is False)
    grouped = sum(1 for b in blocks if b.rep_info()[1] > 1)
    return n, without, grouped


# ============================================================================================
# Exports
# ============================================================================================

# Node metadata the dynamo exporter writes that is kept in these fixtures; the others
# (pkg.torch.onnx.stack_trace with absolute paths of this script, fx_node, class_hierarchy,
# namespace) are debugging text that made up ~75% of the files' bytes.
KEEP_NODE_METADATA = ("pkg.torch.onnx.name_scopes",)


def trim_node_metadata(path):
    m = onnx.load(path, load_external_data=False)
    for n in m.graph.node:
        keep = [(p.key, p.value) for p in n.metadata_props if p.key in KEEP_NODE_METADATA]
        del n.metadata_props[:]
        for k, v in keep:
            n.metadata_props.add(key=k, value=v)
    onnx.save(m, path)  # external tensors keep their location/offset/length; .data untouched


def export_dynamo(model, x, path, opset, optimize=True):
    with common.quiet():
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=opset, optimize=optimize)
    trim_node_metadata(path)


def make_form(form, model, deploy, x, x_train, path):
    if form == "ts_fold_op17":
        common.export_ts(model, x, path, 17, True)
    elif form == "ts_nofold_op17":
        common.export_ts(model, x, path, 17, False)
    elif form == "dynamo_op18":
        export_dynamo(copy.deepcopy(model), x, path, 18)
    elif form == "dynamo_noopt_op18":
        export_dynamo(copy.deepcopy(model), x, path, 18, optimize=False)
    elif form == "ts_train_op17":
        common.export_ts(copy.deepcopy(model), x_train, path, 17, False,
                         torch.onnx.TrainingMode.TRAINING)
    elif form == "ts_fold_op17_fp16":
        common.export_ts(copy.deepcopy(model).half(), x.half(), path, 17, True)
    elif form == "dynamo_noopt_op22_bf16":
        # The TorchScript exporter writes bf16 Conv at opsets <= 20, where Conv does not accept
        # bfloat16 (the checker and ONNX Runtime reject the file); the dynamo optimizer folds BN
        # into a float32 weight next to a bf16 input (also invalid). Unoptimized opset 22 is valid.
        export_dynamo(copy.deepcopy(model).to(torch.bfloat16), x.to(torch.bfloat16), path, 22,
                      optimize=False)
    elif form == "deploy_ts_fold_op17":
        common.export_ts(deploy, x, path, 17, True)
    else:
        raise KeyError(form)


def bf16_tensor(t):
    """torch bfloat16 tensor -> numpy array of ml_dtypes.bfloat16 (onnx.numpy_helper knows it)."""
    import ml_dtypes
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)


# ============================================================================================
# Driver
# ============================================================================================

def generate_model(name, spec, seed):
    out_dir = os.path.join(OUT, name)
    os.makedirs(out_dir, exist_ok=True)
    forms = spec.get("forms", BASE_FORMS)

    torch.manual_seed(seed)
    model = spec["build"]()
    randomize(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    n_blocks, n_without, n_grouped = block_counts(model, spec)

    rng = np.random.default_rng(seed + 2)
    shape = spec["shape"]
    x_np = rng.standard_normal(shape).astype(np.float32)
    x_train_np = np.concatenate([x_np, rng.standard_normal(shape).astype(np.float32)])
    x, x_train = torch.from_numpy(x_np), torch.from_numpy(x_train_np)

    with torch.no_grad():
        y = model(x).numpy()
        deploy = spec.get("deploy", _deploy_methods)(copy.deepcopy(model)).eval()
        y_deploy = deploy(x).numpy()
    err = common.rel_err(y_deploy, y)
    print(f"[{name}] {n_blocks} blocks ({n_without} without identity, {n_grouped} grouped), "
          f"max|y| {np.max(np.abs(y)):.4g}, deploy vs train-structure rel err {err:.3g}")
    assert err < 1e-5, f"{name}: deploy model disagrees with the training-structure model: {err}"

    files = {"": ("input.pb", "output.pb")}
    common.save_tensor(x_np, os.path.join(out_dir, "input.pb"))
    common.save_tensor(y, os.path.join(out_dir, "output.pb"))
    ref = {"": (x_np, y)}
    with torch.no_grad():
        if "ts_fold_op17_fp16" in forms:
            xh = x_np.astype(np.float16)
            yh = copy.deepcopy(model).half()(torch.from_numpy(xh)).numpy()
            files["fp16"] = ("input_fp16.pb", "output_fp16.pb")
            common.save_tensor(xh, os.path.join(out_dir, "input_fp16.pb"))
            common.save_tensor(yh, os.path.join(out_dir, "output_fp16.pb"))
            ref["fp16"] = (xh, yh)
        if "dynamo_noopt_op22_bf16" in forms:
            xb = x.to(torch.bfloat16)
            yb = copy.deepcopy(model).to(torch.bfloat16)(xb)
            files["bf16"] = ("input_bf16.pb", "output_bf16.pb")
            common.save_tensor(bf16_tensor(xb), os.path.join(out_dir, "input_bf16.pb"))
            common.save_tensor(bf16_tensor(yb), os.path.join(out_dir, "output_bf16.pb"))
            ref["bf16"] = (bf16_tensor(xb), bf16_tensor(yb))
        if "ts_train_op17" in forms:
            yt = copy.deepcopy(model).train()(x_train).numpy()
            files["train"] = ("input_train.pb", "output_train.pb")
            common.save_tensor(x_train_np, os.path.join(out_dir, "input_train.pb"))
            common.save_tensor(yt, os.path.join(out_dir, "output_train.pb"))
            ref["train"] = (x_train_np, yt)

    # Deploy model exported with each form's own settings: what a fold of that form should leave.
    same = {}
    with tempfile.TemporaryDirectory() as tmp:
        for form in dict.fromkeys(forms + ["deploy_ts_fold_op17"]):
            p = os.path.join(tmp, form + ".onnx")
            make_form(form, deploy, deploy, x, x_train, p)
            same[form] = common.op_histogram(p)
    deploy_ops = same["deploy_ts_fold_op17"]

    entries = []
    for form in forms:
        path = os.path.join(out_dir, form + ".onnx")
        make_form(form, model, deploy, x, x_train, path)
        onnx.checker.check_model(path, full_check=True)
        kind = ("train" if form.startswith("ts_train") else "fp16" if form.endswith("_fp16")
                else "bf16" if form.endswith("_bf16") else "")
        xin, yref = ref[kind]
        tol = {"": 1e-4, "fp16": 2e-2, "bf16": 5e-2, "train": None}[kind]
        ort_runs = True
        try:
            outs = common.run_ort(path, xin)
            e = common.rel_err(outs[0].astype(np.float64), np.asarray(yref, dtype=np.float64))
            status = f"ORT rel err {e:.3g} ({len(outs)} output(s))"
            if tol is None:
                status += " [training mode: not asserted]"
            else:
                assert e < tol, f"{name}/{form}: ONNX Runtime disagrees with PyTorch ({e})"
        except AssertionError:
            raise
        except Exception as ex:
            if kind not in ("train", "bf16"):
                raise
            ort_runs = False
            status = f"ORT did not run it: {str(ex).splitlines()[0][:200]}"
        ext = common.uses_external_data(path)
        size = os.path.getsize(path) + (os.path.getsize(path + ".data")
                                        if os.path.exists(path + ".data") else 0)
        print(f"[{name}] {form:20s} {size:>8d} B ext={ext!s:5s} {status}")

        if kind == "train":
            expect = "refused: training"
        else:
            expect = spec.get("expect", "fused")
        dtype = {"": "float32", "train": "float32", "fp16": "float16", "bf16": "bfloat16"}[kind]
        fin, fout = files[kind]
        rel = lambda f: f"{name}/{f}"  # noqa: E731
        entry = {
            "model": name,
            "family": spec["family"],
            "form": form,
            "description": f"{FORMS[form]}; {spec['note']}",
            "path": rel(form + ".onnx"),
            "input": rel(fin),
            "output": rel(fout),
            "dtype": dtype,
            "blocks": n_blocks,
            "without_identity": n_without,
            "grouped_blocks": n_grouped,
            "fusable": expect == "fused",
            "deploy_structure": form.startswith("deploy_"),
            "deploy_ops": same[form] if kind in ("fp16", "bf16") else deploy_ops,
            "deploy_ops_same_export": same[form],
            "ops": common.op_histogram(path),
            "external_data": ext,
            "expect": expect,
        }
        if not ort_runs:
            entry["ort_runs"] = False
        entries.append(entry)
    return entries


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else None
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
        seed = SEED + 100 * names.index(spec.get("seed_of", name))
        manifest += generate_model(name, spec, seed)
    order = {n: i for i, n in enumerate(MODELS)}
    manifest.sort(key=lambda e: order[e["model"]])  # stable: forms keep their order
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {manifest_path} ({len(manifest)} fixtures)")


if __name__ == "__main__":
    main()
