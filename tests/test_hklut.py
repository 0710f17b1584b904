"""HKLUT tables: the torch network, tabulated whole, computes what the network computes (numpy reference)."""

import numpy as np
import pytest
import torch

from tvm_lut.math import sr_lut
from tvm_lut.train import hklut


def test_table_sizes_are_hklut_s():
    """HKLUT-S at x4: two x2 stages of 3 MSB tables (16^3 x 4 int8) and 2 LSB tables (16^2 x 4)."""
    torch.manual_seed(0)
    tables = hklut.tabulate(hklut.HKNet(scale=4, nf=8, depth=1))
    assert [t.scale for t in tables] == [2, 2]
    assert {k: v.shape for k, v in tables[0].msb.items()} == {p: (4096, 2, 2) for p in ("h", "d", "b")}
    assert {k: v.shape for k, v in tables[0].lsb.items()} == {p: (256, 2, 2) for p in ("h2", "d2")}
    assert sum(t.nbytes for t in tables) == 102_400 and all(v.dtype == np.int8 for v in tables[0].msb.values())


def test_table_index_reads_the_pattern_first_pixel_most_significant():
    levels = np.arange(12).reshape(3, 4) % 16
    idx = sr_lut.table_index(levels, "d")
    assert idx[0, 0] == levels[0, 0] * 256 + levels[1, 1] * 16 + levels[2, 2]
    assert idx[2, 3] == levels[2, 3] * 256 + levels[1, 2] * 16 + levels[0, 1]  # reflected past the corner


@pytest.mark.parametrize("scale,shape", [(2, (9, 13)), (4, (7, 5)), (3, (6, 6))])
def test_tables_compute_what_the_network_computes(scale, shape):
    torch.manual_seed(1)
    model = hklut.HKNet(scale=scale, nf=16, depth=2).eval()
    img = np.random.default_rng(scale).integers(0, 256, shape, dtype=np.uint8)
    with torch.no_grad():
        y = model(torch.from_numpy(img.astype(np.float32) / 255)[None, None])[0, 0].numpy()
    net = np.floor(y * np.float32(255) + np.float32(0.5)).astype(np.uint8)
    lut = sr_lut.upscale(img, hklut.tabulate(model))
    assert lut.shape == (shape[0] * scale, shape[1] * scale)
    # the same function up to float rounding just before a floor (a batched matmul sums in another order)
    assert np.mean(lut != net) < 0.01 and np.abs(lut.astype(int) - net).max() <= 2


@pytest.mark.parametrize("scale", [2, 4])
def test_the_table_form_trains_the_same_function_and_gradient(scale):
    """``by_table=True`` (what training runs) computes the per-pixel network's output and weight gradient."""
    torch.manual_seed(3)
    model = hklut.HKNet(scale=scale, nf=16, depth=2)
    x = torch.from_numpy(np.random.default_rng(scale).integers(0, 256, (3, 1, 11, 9)).astype(np.float32) / 255)
    target = torch.rand(3, 1, 11 * scale, 9 * scale, generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for by_table in (False, True):
        model.zero_grad()
        y = model(x, by_table=by_table)
        torch.nn.functional.mse_loss(y, target).backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.stages[-1].parameters()]))
    assert torch.mean((outs[0] != outs[1]).float()) < 0.01
    # the last stage's weights: the table form has no gradient through a table's indices, so an earlier
    # stage's gradient differs by the LSB units' input term (a deployed table has none either)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5 * grads[0].abs().max())


def test_colour_images_go_channel_by_channel_and_bad_input_is_refused():
    torch.manual_seed(2)
    tables = hklut.tabulate(hklut.HKNet(scale=2, nf=8, depth=1))
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    out = sr_lut.upscale(rgb, tables)
    assert out.shape == (10, 12, 3)
    np.testing.assert_array_equal(out[..., 1], sr_lut.upscale(rgb[..., 1].copy(), tables))
    with pytest.raises(ValueError, match="uint8"):
        sr_lut.upscale(rgb.astype(np.uint16), tables)
