"""The zoo corpus: architectures this project did not write, from well-kept libraries' definitions with
random weights (nothing is downloaded), each imported three ways (``from_torch``; ONNX from torch's
TorchScript exporter at opset 14; ONNX from its dynamo exporter at opset 18).

``MEMBERS`` maps a name to (builder, default routes): the builder returns the model in eval mode and its
example input; the routes named run in the default suite, every other (member, route) with ``-m slow``. ``weight_ops_*`` count the
conv/dense/matmul-with-constant-weight call sites independently of tvm-lut's own graph code, so a layer
missing from the report is caught.

torchvision's wheel on PyPI is its CUDA build: against the CPU torch we pin, its C++ ops (``nms``...) do
not load and its import fails on registering their fake kernels. Its model definitions are pure Python,
so ``import_torchvision`` declares the two operator schemas that import needs and imports it; the models
never call those ops.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch


def import_torchvision():
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")  # kept alive on the module below
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision

        torchvision._tvm_lut_schema_lib = lib
    return torchvision


class Output(torch.nn.Module):
    """The first tensor a model returns (``last_hidden_state`` for transformers, logits for torchvision)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def _tv(name: str, size: int = 32, **kw) -> Callable:
    def build():
        torch.manual_seed(0)
        m = getattr(import_torchvision().models, name)(weights=None, **kw)
        return Output(m).eval(), torch.randn(1, 3, size, size)
    return build


def _hf(kind: str) -> Callable:
    def build():
        import_torchvision()  # transformers imports torchvision when it is installed
        import transformers as T

        torch.manual_seed(0)
        if kind == "bert":  # BERT-tiny-sized
            m = T.BertModel(T.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=512, vocab_size=1000), add_pooling_layer=False)
            x = torch.randint(0, 1000, (1, 16))
        elif kind == "distilbert":
            m = T.DistilBertModel(T.DistilBertConfig(dim=128, n_layers=2, n_heads=2, hidden_dim=512, vocab_size=1000))
            x = torch.randint(0, 1000, (1, 16))
        elif kind == "vit":
            m = T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, image_size=32, patch_size=8), add_pooling_layer=False)
            x = torch.randn(1, 3, 32, 32)
        elif kind == "wav2vec2":  # a speech encoder: conv feature extractor + transformer
            m = T.Wav2Vec2Model(T.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2),
                                                 conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                                 num_conv_pos_embedding_groups=4))
            x = torch.randn(1, 1600)
        elif kind == "convnext":
            m = T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]))
            x = torch.randn(1, 3, 32, 32)
        elif kind == "mobilevit":
            m = T.MobileViTModel(T.MobileViTConfig(image_size=32, hidden_sizes=[32, 40, 48],
                                                   neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]))
            x = torch.randn(1, 3, 32, 32)
        elif kind == "swin":
            m = T.SwinModel(T.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                         window_size=4))
            x = torch.randn(1, 3, 32, 32)
        else:
            raise KeyError(kind)
        return Output(m).eval(), x
    return build


FAST = ("torch", "onnx-torchscript-14")
MEMBERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "resnet18": (_tv("resnet18"), FAST),
    "squeezenet1_0": (_tv("squeezenet1_0", 64), ()),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), ("torch",)),
    "bert-tiny": (_hf("bert"), FAST),
    "resnet50": (_tv("resnet50"), ()),
    "mobilenet_v2": (_tv("mobilenet_v2"), ()),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), ()),
    "efficientnet_b0": (_tv("efficientnet_b0"), ()),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), ()),
    "densenet121": (_tv("densenet121"), ()),
    "convnext_tiny": (_tv("convnext_tiny"), ()),
    "vit_b_16": (_tv("vit_b_16", 32, image_size=32), ()),
    "mnasnet0_5": (_tv("mnasnet0_5"), ()),
    "googlenet": (_tv("googlenet", 64, aux_logits=False, init_weights=True), ()),
    "resnext50_32x4d": (_tv("resnext50_32x4d"), ()),
    "distilbert": (_hf("distilbert"), ()),
    "hf-vit": (_hf("vit"), ()),
    "wav2vec2": (_hf("wav2vec2"), ()),
    "hf-convnext": (_hf("convnext"), ()),
    "mobilevit": (_hf("mobilevit"), ()),
    "swin": (_hf("swin"), ()),
}
ROUTES = ("torch", "onnx-torchscript-14", "onnx-dynamo-18")  # 14: the first opset with attention's ops


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: str, route: str) -> None:
    dynamo = route.startswith("onnx-dynamo")
    opset = int(route.rsplit("-", 1)[1])
    kw = {"dynamo": True, "external_data": False} if dynamo else {"dynamo": False}
    torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], opset_version=opset, **kw)


_TORCH_WEIGHT_OPS = {"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.conv_transpose1d", "aten.conv_transpose2d",
                     "aten.convolution", "aten.linear"}


def weight_ops_torch(model: torch.nn.Module, x: torch.Tensor) -> int:
    """conv/linear call sites of the exported program (torch.export, as ``from_torch`` sees the model)."""
    ep = torch.export.export(model, (x,))
    return sum(1 for n in ep.graph.nodes
               if n.op == "call_function" and str(n.target).rsplit(".", 1)[0] in _TORCH_WEIGHT_OPS)


def weight_ops_onnx(model) -> int:
    """Conv/ConvTranspose/Gemm/MatMul nodes whose weight (second input) is constant: an initializer or a
    ``Constant`` node, possibly through Transpose/Reshape/Cast/Identity/Squeeze/Unsqueeze, or computed
    from constants only (weight norm's ``g * v / ||v||``, which the dynamo exporter leaves as nodes)."""
    g = model.graph
    const = {i.name for i in g.initializer}
    through = {"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Constant"}
    for node in g.node:  # nodes are topologically ordered
        if node.op_type == "Constant" or (node.op_type in through and node.input and node.input[0] in const):
            const.update(node.output)
        elif node.input and all(i in const for i in node.input if i):
            const.update(node.output)
    return sum(1 for node in g.node if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
               and len(node.input) > 1 and node.input[1] in const)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))


def calibration_like(x: torch.Tensor, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random samples shaped like ``x`` (token ids stay in the vocabulary range of the example)."""
    g = np.random.default_rng(seed)
    if x.dtype in (torch.int64, torch.int32):
        return g.integers(0, 1000, (n, *x.shape[1:])).astype(x.numpy().dtype)
    return g.standard_normal((n, *x.shape[1:])).astype(np.float32)


def exact_reasons(records: list[dict]) -> dict[str, int]:
    """Why layers stayed exact, counted by reason with its numbers dropped (``grouped/depthwise conv``)."""
    out: dict[str, int] = {}
    for r in records:
        if r["method"] == "exact":
            key = r["reason"].split(" (")[0].split(":")[0].strip()
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))
