"""The chain machinery PLeaS and ZipIt share: two models of different shapes are refused by every entry
point, naming the first tensor that differs and both shapes (or that model B lacks it)."""

from __future__ import annotations

import pytest
import torch

from mergelab.align.pleas import pleas_conv, pleas_mlp
from mergelab.align.zipit import zipit_conv
from mergelab.errors import MergeLabError
from tests.align.conftest import convnet, mlp


def _state(net):
    return {k: v.detach() for k, v in net.state_dict().items()}


def test_mlps_of_other_widths_or_missing_tensors_are_refused_by_name():
    a = _state(mlp(0))
    x = torch.randn(40, 8)
    with pytest.raises(MergeLabError, match=r"PLeaS: tensor '0\.weight' has shape \(16, 8\) in model A but "
                                            r"\(20, 8\) in model B"):
        pleas_mlp(a, _state(mlp(1, widths=(8, 20, 12, 3))), x)
    b = _state(mlp(1))
    del b["2.bias"]
    with pytest.raises(MergeLabError, match=r"tensor '2\.bias' has shape \(12,\) in model A but is missing in model B"):
        pleas_mlp(a, b, x)


@pytest.mark.parametrize("merge, who", [(zipit_conv, "ZipIt"), (pleas_conv, "PLeaS")])
def test_conv_nets_of_other_shapes_are_refused_by_name(merge, who):
    a, b = convnet(0), convnet(1)
    wide = torch.nn.Linear(b.fc1.in_features, b.fc1.out_features + 1)
    b.fc1 = wide
    shape_a = tuple(a.fc1.weight.shape)
    with pytest.raises(MergeLabError, match=rf"{who}: tensor 'fc1\.weight' has shape \({shape_a[0]}, {shape_a[1]}\) "
                                            rf"in model A but \({shape_a[0] + 1}, {shape_a[1]}\) in model B"):
        merge(a, b, torch.randn(8, 1, 8, 8))
