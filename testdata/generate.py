#!/usr/bin/env python3
"""Generate the ONNX test fixtures of onnx-repvgg.

What it makes
-------------
RepVGG networks built with the same class structure and module names as the official
implementation (DingXiaoH/RepVGG, ``repvgg.py``): ``conv_bn()`` is an ``nn.Sequential`` of
``conv`` (bias=False) and ``bn``; ``RepVGGBlock`` has ``rbr_dense`` (3x3), ``rbr_1x1`` (1x1,
padding 0), ``rbr_identity`` (a BatchNorm2d when in == out channels and stride 1, else None),
``se`` (nn.Identity) and ``nonlinearity`` (ReLU), and computes
``nonlinearity(se(rbr_dense(x) + rbr_1x1(x) + id_out))``, so the exported Add tree is
``Add(Add(dense, 1x1), identity)`` or ``Add(dense, 1x1)``. ``switch_to_deploy()`` replaces the
branches by ``rbr_reparam`` (3x3 Conv with bias), fused in PyTorch as the official code does
(including the grouped identity kernel ``k[i, i % (in // groups), 1, 1] = 1``).

Every BatchNorm gets random, non-trivial statistics and affine parameters from a fixed seed
(running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.3)),
then the model is put in eval mode. Each model is exported in several forms (see ``FORMS``):
TorchScript exporter with/without constant folding at opsets 17 and 13 (and without at 14 and 8,
for BatchNormalization v14 and v7), PRESERVE and TRAINING
modes, the dynamo exporter at opsets 18 and 20 (external data, dynamic batch), an fp16 export,
and the deploy (already re-parameterized) model, which is the structure a fold must reproduce
node for node.

Outputs (relative to this folder):
  models/<model>/<form>.onnx           (+ <form>.onnx.data for the dynamo forms)
  models/<model>/input.pb, output.pb   f32 TensorProto, input 1x3xHxW ~ N(0, 1), PyTorch output
  models/<model>/input_fp16.pb, output_fp16.pb   the same for the half model (computed by
                                       PyTorch on CPU in float16)
  models/<model>/input_train.pb, output_train.pb  batch-2 input for the TRAINING-mode exports
                                       (BatchNorm in training mode needs more than one value per
                                       channel; stage4 is 1x1 at 32x32) and PyTorch's train-mode
                                       output
  manifest.json                        one entry per fixture (see README.md)

Every exported file is checked with ``onnx.checker.check_model(path, full_check=True)`` and run
in ONNX Runtime against PyTorch's output (tolerance relative to the output magnitude). The deploy
model's output is asserted to match the training-structure model's output.

How to run
----------
  python testdata/generate.py                 # regenerate the committed fixtures (small models,
                                              # 32x32 inputs) into testdata/
  python testdata/generate.py --full OUTDIR   # the official full-size RepVGG-A0, A1, B1g2, B3 at
                                              # 224x224 into OUTDIR (large, not committed)
  python testdata/generate.py --full OUTDIR --models RepVGG-A0 --forms ts_fold_op17,deploy_ts_fold_op17

Use the pinned versions of requirements.txt; other torch/onnx versions emit other graphs.
"""

import argparse
import collections
import contextlib
import copy
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
import torch.nn as nn

logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20240229


# --------------------------------------------------------------------------------------------
# RepVGG, structured and named as the official repvgg.py
# --------------------------------------------------------------------------------------------

def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1):
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                        kernel_size=kernel_size, stride=stride, padding=padding,
                                        groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(num_features=out_channels))
    return result


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, padding_mode="zeros", deploy=False, use_se=False):
        super().__init__()
        self.deploy = deploy
        self.groups = groups
        self.in_channels = in_channels
        assert kernel_size == 3
        assert padding == 1
        padding_11 = padding - kernel_size // 2
        self.nonlinearity = nn.ReLU()
        assert not use_se, "SE blocks (D2se) are not generated here"
        self.se = nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                         kernel_size=kernel_size, stride=stride, padding=padding,
                                         dilation=dilation, groups=groups, bias=True,
                                         padding_mode=padding_mode)
        else:
            self.rbr_identity = (nn.BatchNorm2d(num_features=in_channels)
                                 if out_channels == in_channels and stride == 1 else None)
            self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size=kernel_size,
                                     stride=stride, padding=padding, groups=groups)
            self.rbr_1x1 = conv_bn(in_channels, out_channels, kernel_size=1, stride=stride,
                                   padding=padding_11, groups=groups)

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))

    def get_equivalent_kernel_bias(self):
        kernel3x3, bias3x3 = self._fuse_bn_tensor(self.rbr_dense)
        kernel1x1, bias1x1 = self._fuse_bn_tensor(self.rbr_1x1)
        kernelid, biasid = self._fuse_bn_tensor(self.rbr_identity)
        return (kernel3x3 + self._pad_1x1_to_3x3_tensor(kernel1x1) + kernelid,
                bias3x3 + bias1x1 + biasid)

    def _pad_1x1_to_3x3_tensor(self, kernel1x1):
        if kernel1x1 is None:
            return 0
        return torch.nn.functional.pad(kernel1x1, [1, 1, 1, 1])

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, nn.Sequential):
            kernel = branch.conv.weight
            bn = branch.bn
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                input_dim = self.in_channels // self.groups
                kernel_value = np.zeros((self.in_channels, input_dim, 3, 3), dtype=np.float32)
                for i in range(self.in_channels):
                    kernel_value[i, i % input_dim, 1, 1] = 1
                self.id_tensor = torch.from_numpy(kernel_value).to(branch.weight.device)
            kernel = self.id_tensor
            bn = branch
        std = (bn.running_var + bn.eps).sqrt()
        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        return kernel * t, bn.bias - bn.running_mean * bn.weight / std

    def switch_to_deploy(self):
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        dense = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(in_channels=dense.in_channels, out_channels=dense.out_channels,
                                     kernel_size=dense.kernel_size, stride=dense.stride,
                                     padding=dense.padding, dilation=dense.dilation,
                                     groups=dense.groups, bias=True)
        self.rbr_reparam.weight.data = kernel
        self.rbr_reparam.bias.data = bias
        for para in self.parameters():
            para.detach_()
        self.__delattr__("rbr_dense")
        self.__delattr__("rbr_1x1")
        if hasattr(self, "rbr_identity"):
            self.__delattr__("rbr_identity")
        if hasattr(self, "id_tensor"):
            self.__delattr__("id_tensor")
        self.deploy = True


class RepVGG(nn.Module):
    def __init__(self, num_blocks, num_classes=1000, width_multiplier=None,
                 override_groups_map=None, deploy=False, use_se=False):
        super().__init__()
        assert len(width_multiplier) == 4
        self.deploy = deploy
        self.override_groups_map = override_groups_map or dict()
        self.use_se = use_se
        assert 0 not in self.override_groups_map
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(in_channels=3, out_channels=self.in_planes, kernel_size=3,
                                  stride=2, padding=1, deploy=self.deploy, use_se=self.use_se)
        # Layer indices count the blocks of stages 1..4, starting at 1 (stage0 is not counted).
        self.cur_layer_idx = 1
        self.stage1 = self._make_stage(int(64 * width_multiplier[0]), num_blocks[0], stride=2)
        self.stage2 = self._make_stage(int(128 * width_multiplier[1]), num_blocks[1], stride=2)
        self.stage3 = self._make_stage(int(256 * width_multiplier[2]), num_blocks[2], stride=2)
        self.stage4 = self._make_stage(int(512 * width_multiplier[3]), num_blocks[3], stride=2)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(int(512 * width_multiplier[3]), num_classes)

    def _make_stage(self, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        blocks = []
        for stride in strides:
            cur_groups = self.override_groups_map.get(self.cur_layer_idx, 1)
            blocks.append(RepVGGBlock(in_channels=self.in_planes, out_channels=planes,
                                      kernel_size=3, stride=stride, padding=1, groups=cur_groups,
                                      deploy=self.deploy, use_se=self.use_se))
            self.in_planes = planes
            self.cur_layer_idx += 1
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = self.stage0(x)
        out = self.stage1(out)
        out = self.stage2(out)
        out = self.stage3(out)
        out = self.stage4(out)
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


optional_groupwise_layers = [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26]
g2_map = {layer: 2 for layer in optional_groupwise_layers}
g4_map = {layer: 4 for layer in optional_groupwise_layers}


def repvgg_model_convert(model):
    """Deep copy of ``model`` with every block switched to deploy (as the official helper)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()
    return model


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

# Small committed models. Width multipliers are exact binary fractions so the official
# int(64 * w) formula gives the intended widths.
SMALL_MODELS = {
    # stage widths 8 / 8 / 16 / 24 / 32; 7 blocks, 5 without identity.
    "tiny": dict(num_blocks=[1, 2, 2, 1], num_classes=10,
                 width_multiplier=[0.125, 0.125, 0.09375, 0.0625], override_groups_map=None),
    # stage widths 16 / 16 / 32 / 32 / 48; 8 blocks, 5 without identity; layers 2, 4, 6 (the
    # second block of stages 1-3, all with identity) grouped with 2, 4 and 2 groups, as the
    # official g2_map/g4_map group the even layers.
    "grouped": dict(num_blocks=[2, 2, 2, 1], num_classes=10,
                    width_multiplier=[0.25, 0.25, 0.125, 0.09375],
                    override_groups_map={2: 2, 4: 4, 6: 2}),
}
SMALL_HW = 32

FULL_MODELS = {
    "RepVGG-A0": dict(num_blocks=[2, 4, 14, 1], num_classes=1000,
                      width_multiplier=[0.75, 0.75, 0.75, 2.5], override_groups_map=None),
    "RepVGG-A1": dict(num_blocks=[2, 4, 14, 1], num_classes=1000,
                      width_multiplier=[1, 1, 1, 2.5], override_groups_map=None),
    "RepVGG-B1g2": dict(num_blocks=[4, 6, 16, 1], num_classes=1000,
                        width_multiplier=[2, 2, 2, 4], override_groups_map=g2_map),
    # For benchmarks (scripts/bench.py): the biggest official configuration, ~490 MB unfolded.
    "RepVGG-B3": dict(num_blocks=[4, 6, 16, 1], num_classes=1000,
                      width_multiplier=[3, 3, 3, 5], override_groups_map=None),
}
FULL_HW = 224


def randomize_bn(model, gen):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.3)


def build_model(cfg, seed):
    torch.manual_seed(seed)
    model = RepVGG(**cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_bn(model, gen)
    return model.eval()


def block_counts(model):
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    without = sum(1 for b in blocks if getattr(b, "rbr_identity", None) is None)
    grouped = sum(1 for b in blocks if b.groups > 1)
    return len(blocks), without, grouped


# --------------------------------------------------------------------------------------------
# Export forms
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet():
    """Silence exporter chatter (warnings and dynamo progress lines)."""
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(buf):
            yield


def export_ts(model, x, path, opset, fold, training=torch.onnx.TrainingMode.EVAL):
    with quiet():
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset,
                          do_constant_folding=fold, training=training)


def export_dynamo(model, x, path, opset, dynamic_batch=False):
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    with quiet():
        # Default external_data=True: the exporter writes <form>.onnx.data next to the model and
        # moves the larger initializers there (small ones stay inline: a mixed file).
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=opset, **kwargs)
    assert os.path.exists(path + ".data"), "expected the dynamo exporter's external data file"


# form name -> description (written to the manifest). Forms named ts_train_* are the
# training-mode exports (not fusable), *_fp16 the half-precision one.
FORMS = collections.OrderedDict([
    ("ts_fold_op17", "TorchScript exporter, eval, opset 17, do_constant_folding=True"),
    ("ts_nofold_op17", "TorchScript exporter, eval, opset 17, do_constant_folding=False"),
    ("ts_fold_op13", "TorchScript exporter, eval, opset 13, do_constant_folding=True"),
    ("ts_nofold_op13", "TorchScript exporter, eval, opset 13, do_constant_folding=False"),
    ("ts_nofold_op14", "TorchScript exporter, eval, opset 14 (BatchNormalization v14), no folding"),
    ("ts_nofold_op8", "TorchScript exporter, eval, opset 8 (BatchNormalization v7), no folding"),
    ("ts_preserve_op17", "TorchScript exporter, TrainingMode.PRESERVE on an eval model, opset 17, no folding"),
    ("ts_train_op17", "TorchScript exporter, TrainingMode.TRAINING, opset 17 (must be refused)"),
    ("ts_train_op13", "TorchScript exporter, TrainingMode.TRAINING, opset 13 (must be refused)"),
    ("dynamo_op18", "dynamo exporter, opset 18, external data"),
    ("dynamo_op20_dynbatch", "dynamo exporter, opset 20, dynamic batch, external data"),
    ("ts_fold_op17_fp16", "model.half(), TorchScript exporter, opset 17, constant folding"),
    ("deploy_ts_fold_op17", "switch_to_deploy() model, TorchScript exporter, opset 17, constant folding"),
])


def make_form(form, model, deploy, x, x_train, path):
    if form == "ts_fold_op17":
        export_ts(model, x, path, 17, True)
    elif form == "ts_nofold_op17":
        export_ts(model, x, path, 17, False)
    elif form == "ts_fold_op13":
        export_ts(model, x, path, 13, True)
    elif form == "ts_nofold_op13":
        export_ts(model, x, path, 13, False)
    elif form == "ts_nofold_op14":
        export_ts(model, x, path, 14, False)
    elif form == "ts_nofold_op8":
        export_ts(model, x, path, 8, False)
    elif form == "ts_preserve_op17":
        m = copy.deepcopy(model).eval()
        export_ts(m, x, path, 17, False, torch.onnx.TrainingMode.PRESERVE)
    elif form in ("ts_train_op17", "ts_train_op13"):
        # The export runs the forward in train mode, which updates the running statistics:
        # work on a copy. Batch 2: train-mode BN needs > 1 value per channel.
        m = copy.deepcopy(model)
        export_ts(m, x_train, path, 17 if form.endswith("17") else 13, False,
                  torch.onnx.TrainingMode.TRAINING)
    elif form == "dynamo_op18":
        export_dynamo(copy.deepcopy(model), x, path, 18)
    elif form == "dynamo_op20_dynbatch":
        # torch.export specializes a size-1 example dimension: export with a batch-2 example.
        export_dynamo(copy.deepcopy(model), torch.cat([x, x]), path, 20, dynamic_batch=True)
    elif form == "ts_fold_op17_fp16":
        export_ts(copy.deepcopy(model).half(), x.half(), path, 17, True)
    elif form == "deploy_ts_fold_op17":
        export_ts(deploy, x, path, 17, True)
    else:
        raise KeyError(form)


# --------------------------------------------------------------------------------------------
# Checks and facts
# --------------------------------------------------------------------------------------------

def save_tensor(arr, path):
    with open(path, "wb") as f:
        f.write(onnx.numpy_helper.from_array(np.ascontiguousarray(arr)).SerializeToString())


def op_histogram(path):
    m = onnx.load(path, load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in m.graph.node).items()))


def uses_external_data(path):
    m = onnx.load(path, load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_ort(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    return outs


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def generate_model(name, cfg, hw, root, forms, seed):
    """Export ``forms`` of one model into root/models/<name>/; return manifest entries."""
    rel_dir = os.path.join("models", name)
    out_dir = os.path.join(root, rel_dir)
    os.makedirs(out_dir, exist_ok=True)

    model = build_model(cfg, seed)
    n_blocks, n_without, n_grouped = block_counts(model)
    print(f"[{name}] {n_blocks} blocks, {n_without} without identity, {n_grouped} grouped, "
          f"{sum(p.numel() for p in model.parameters())} parameters")

    rng = np.random.default_rng(seed + 2)
    x_np = rng.standard_normal((1, 3, hw, hw)).astype(np.float32)
    x_train_np = np.concatenate(
        [x_np, rng.standard_normal((1, 3, hw, hw)).astype(np.float32)])
    x = torch.from_numpy(x_np)
    x_train = torch.from_numpy(x_train_np)

    with torch.no_grad():
        y = model(x).numpy()
        deploy = repvgg_model_convert(model).eval()
        y_deploy = deploy(x).numpy()
        half = copy.deepcopy(model).half().eval()
        x_half_np = x_np.astype(np.float16)
        y_half = half(torch.from_numpy(x_half_np)).numpy()
        y_train = copy.deepcopy(model).train()(x_train).numpy()
    err = rel_err(y_deploy, y)
    print(f"[{name}] max|y| = {np.max(np.abs(y)):.4g}; deploy vs train-structure rel err "
          f"{err:.3g}; fp16 vs f32 rel err {rel_err(y_half, y):.3g}")
    assert err < 1e-5, f"deploy model disagrees with the training-structure model: {err}"
    assert block_counts(deploy)[0] == n_blocks

    files = {"input": "input.pb", "output": "output.pb", "input_fp16": "input_fp16.pb",
             "output_fp16": "output_fp16.pb", "input_train": "input_train.pb",
             "output_train": "output_train.pb"}
    save_tensor(x_np, os.path.join(out_dir, files["input"]))
    save_tensor(y, os.path.join(out_dir, files["output"]))
    save_tensor(x_half_np, os.path.join(out_dir, files["input_fp16"]))
    save_tensor(y_half, os.path.join(out_dir, files["output_fp16"]))
    save_tensor(x_train_np, os.path.join(out_dir, files["input_train"]))
    save_tensor(y_train, os.path.join(out_dir, files["output_train"]))

    # Op histograms of the deploy model exported the same way as each form (not kept): what a
    # fold of that form should leave, exporter quirks included (e.g. the dynamo exporter writes
    # ReduceMean for the pooling, TorchScript without folding computes the Reshape shape).
    same_export_ops = {}
    with tempfile.TemporaryDirectory() as tmp:
        for form in forms:
            p = os.path.join(tmp, form + ".onnx")
            make_form(form, deploy, deploy, x, x_train, p)
            same_export_ops[form] = op_histogram(p)
        if "deploy_ts_fold_op17" not in same_export_ops:
            p = os.path.join(tmp, "deploy.onnx")
            export_ts(deploy, x, p, 17, True)
            same_export_ops["deploy_ts_fold_op17"] = op_histogram(p)
        if "ts_fold_op17_fp16" not in same_export_ops:
            p = os.path.join(tmp, "deploy16.onnx")
            make_form("ts_fold_op17_fp16", deploy, deploy, x, x_train, p)
            same_export_ops["ts_fold_op17_fp16"] = op_histogram(p)
    deploy_ops = same_export_ops["deploy_ts_fold_op17"]
    deploy_ops_fp16 = same_export_ops["ts_fold_op17_fp16"]
    if deploy_ops_fp16 != deploy_ops:
        print(f"[{name}] note: fp16 deploy histogram differs: {deploy_ops_fp16}")

    entries = []
    for form in forms:
        path = os.path.join(out_dir, form + ".onnx")
        for stale in (path, path + ".data"):
            if os.path.exists(stale):
                os.remove(stale)
        make_form(form, model, deploy, x, x_train, path)

        onnx.checker.check_model(path, full_check=True)
        training_mode = form.startswith("ts_train")
        fp16 = form.endswith("_fp16")
        if training_mode:
            xin, yref, tol = x_train_np, y_train, 1e-4
            fin, fout = files["input_train"], files["output_train"]
        elif fp16:
            xin, yref, tol = x_half_np, y_half, 2e-2
            fin, fout = files["input_fp16"], files["output_fp16"]
        else:
            xin, yref, tol = x_np, y, 1e-4
            fin, fout = files["input"], files["output"]
        try:
            outs = run_ort(path, xin)
            e = rel_err(outs[0], yref)
            status = f"ORT rel err {e:.3g} ({len(outs)} output(s))"
            if training_mode:
                status += " [training mode: not asserted]"
            else:
                assert e < tol, f"{name}/{form}: ONNX Runtime disagrees with PyTorch ({e})"
        except Exception as ex:  # only training-mode exports may fail to run
            if not training_mode:
                raise
            status = f"ORT did not run it (training mode, not asserted): {str(ex).splitlines()[0][:160]}"
        ext = uses_external_data(path)
        size = os.path.getsize(path) + (os.path.getsize(path + ".data")
                                        if os.path.exists(path + ".data") else 0)
        print(f"[{name}] {form:22s} {size:>9d} B  ext={ext!s:5s} {status}")

        entries.append({
            "model": name,
            "form": form,
            "description": FORMS[form],
            "path": os.path.join(rel_dir, form + ".onnx").replace(os.sep, "/"),
            "input": os.path.join(rel_dir, fin).replace(os.sep, "/"),
            "output": os.path.join(rel_dir, fout).replace(os.sep, "/"),
            "dtype": "float16" if fp16 else "float32",
            "blocks": n_blocks,
            "without_identity": n_without,
            "grouped_blocks": n_grouped,
            "fusable": not training_mode,
            "deploy_structure": form.startswith("deploy_"),
            "deploy_ops": deploy_ops_fp16 if fp16 else deploy_ops,
            "deploy_ops_same_export": same_export_ops[form],
            "ops": op_histogram(path),
            "external_data": ext,
        })
    return entries


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", metavar="OUTDIR",
                    help="write the full-size official models (224x224) into OUTDIR instead")
    ap.add_argument("--models", help="comma-separated subset of models")
    ap.add_argument("--forms", help="comma-separated subset of forms")
    args = ap.parse_args()

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.full:
        root, models, hw = os.path.abspath(args.full), FULL_MODELS, FULL_HW
    else:
        root, models, hw = HERE, SMALL_MODELS, SMALL_HW
    names = args.models.split(",") if args.models else list(models)
    forms = args.forms.split(",") if args.forms else list(FORMS)
    for f in forms:
        if f not in FORMS:
            sys.exit(f"unknown form {f!r}; known: {', '.join(FORMS)}")
    for n in names:
        if n not in models:
            sys.exit(f"unknown model {n!r}; known: {', '.join(models)}")
    if not args.full and (args.models or args.forms):
        sys.exit("--models/--forms only with --full (the committed set is regenerated whole)")

    if not args.full:
        shutil.rmtree(os.path.join(root, "models"), ignore_errors=True)
    manifest = []
    manifest_path = os.path.join(root, "manifest.json")
    if args.full and os.path.exists(manifest_path):
        # --full runs may be split (--models/--forms): keep the entries of earlier runs.
        redone = {(n, f) for n in names for f in forms}
        with open(manifest_path) as f:
            manifest = [e for e in json.load(f) if (e["model"], e["form"]) not in redone]
    for n in names:
        seed = SEED + 100 * list(models).index(n)  # independent of --models
        manifest += generate_model(n, models[n], hw, root, forms, seed)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {manifest_path} ({len(manifest)} fixtures)")


if __name__ == "__main__":
    main()
