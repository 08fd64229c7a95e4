"""The network (model/net.py): Keras's model S, its parameter count, layer order, glorot
initialisation of every kernel, and the Rescaling(1/255) it starts with; fidelity=torch's
defaults."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cifar_lightning.model.net import build_net, count_params
from cifar_lightning.schema import CONF_DIR
from tests.conftest import cfg_for

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# every recipe that trains Model S keeps it: the same layers, the same parameter count; a
# distilled recipe too (the teacher is not part of the student)
STUDENT_RECIPES = [
    [],
    *([f"experiment={e}"] for e in EXPERIMENTS if e != "teacher"),
    *(
        [f"experiment={e}", "distill.teacher=PATH/TO/teacher.ckpt"]
        for e in EXPERIMENTS
        if e != "teacher"
    ),
]


@pytest.mark.parametrize("recipe", STUDENT_RECIPES, ids=" ".join)
def test_parameter_count_matches_keras(recipe, tmp_path):
    cfg = cfg_for(tmp_path, tmp_path, *recipe)
    net = build_net(OmegaConf.to_container(cfg.model, resolve=True))
    assert count_params(net) == (815_018, 896)
    # Lightning would also count num_batches_tracked (6 more); Keras has no such counter.
    assert sum(b.numel() for b in net.buffers()) == 896 + 6
    assert net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)


@pytest.mark.parametrize("recipe", [["model=teacher"], ["experiment=teacher"]], ids=" ".join)
def test_the_teacher_has_its_own_parameter_count(recipe, tmp_path):
    net = build_net(OmegaConf.to_container(cfg_for(tmp_path, tmp_path, *recipe).model))
    assert type(net).__name__ == "TeacherNet"
    assert count_params(net) == (1_166_538, 1_856)
    assert net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)


def test_keras_init_and_batchnorm(tmp_path):
    net = build_net(OmegaConf.to_container(cfg_for(tmp_path, tmp_path).model, resolve=True))
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)  # Keras zero biases
    first = convs[0].weight  # glorot bound sqrt(6 / (fan_in + fan_out)) = sqrt(6 / (27 + 288))
    assert (
        first.abs().max() <= (6 / (27 + 288)) ** 0.5 and first.abs().max() > 0.9 * (6 / 315) ** 0.5
    )
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.01, 1e-3)  # Keras momentum 0.99, epsilon 1e-3


def test_torch_fidelity_gives_pytorch_defaults(tmp_path):
    net = build_net(
        OmegaConf.to_container(cfg_for(tmp_path, tmp_path, "fidelity=torch").model, resolve=True)
    )
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.1, 1e-5)
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert torch.count_nonzero(conv.bias) > 0  # PyTorch's default init has non-zero biases


def _container(node):
    return OmegaConf.to_container(node, resolve=True)


def _net(tmp_path, *overrides):
    return build_net(_container(cfg_for(tmp_path, tmp_path, *overrides).model))


def _glorot_bounds(net):
    """{layer: (max |w|, glorot bound sqrt(6 / (fan_in + fan_out)))}, each Conv2d and Linear kernel.

    The bound is rounded to the weights' dtype: a float32 draw at the edge can round up past the
    float64 bound (seen in about 1 run in 30 for the 2048 -> 256 layer)."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = torch.tensor((6 / (fan_in + fan_out)) ** 0.5, dtype=m.weight.dtype).item()
            out[name] = (m.weight.abs().max().item(), bound)
    return out


def test_glorot_uniform_covers_dense_layers_as_well_as_convs(tmp_path):
    # Keras's Dense default is glorot_uniform too; torch's Linear default (bound 1/sqrt(fan_in),
    # 0.022 for the 2048 -> 256 layer) is less than half its glorot bound (0.051), so the two are
    # easy to tell apart.
    net = _net(tmp_path)
    bounds = _glorot_bounds(net)
    assert len(bounds) == 8  # 6 convs + 2 dense
    outside = {name: wb for name, wb in bounds.items() if not 0.9 * wb[1] < wb[0] <= wb[1]}
    assert outside == {}
    assert all(
        torch.count_nonzero(m.bias) == 0
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    torch_bounds = _glorot_bounds(_net(tmp_path, "fidelity=torch"))
    # the check can fail
    assert not all(0.9 * bound < w <= bound for w, bound in torch_bounds.values())


def test_network_rescales_uint8_input_by_1_over_255_itself(tmp_path):
    # Keras's Rescaling(1/255) is the model's first layer, so loaders hand over raw 0-255 pixels.
    torch.manual_seed(0)
    # eval: no dropout; BatchNorm with its initial statistics is near-identity
    net = _net(tmp_path).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        by_hand = net.classifier(net.features(x.float() / 255))
        assert torch.allclose(net(x), by_hand, rtol=1e-5, atol=1e-6)
        # float 0-255 input as well
        assert torch.allclose(net(x.float()), by_hand, rtol=1e-5, atol=1e-6)


def test_layer_order_is_keras_model_s(tmp_path):
    # Keras's Sequential: per block (Conv2D same -> ReLU activation -> BatchNormalization) x 2 ->
    # MaxPool2D, then Flatten -> Dropout(0.5) -> Dense 256 relu -> Dropout(0.5) -> Dense 10. The
    # order of ReLU and BatchNorm, and both dropouts, change the function but not the number of
    # parameters.
    net = _net(tmp_path)
    leaves = [m for m in net.modules() if not list(m.children())]
    block = [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d]
    head = [nn.Flatten, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [type(m) for m in leaves] == block * 3 + head
    convs = [m for m in leaves if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [32, 32, 64, 64, 128, 128]
    assert all(
        m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding in ((1, 1), "same")
        for m in convs
    )
    assert all(m.kernel_size == 2 for m in leaves if isinstance(m, nn.MaxPool2d))
    assert [m.p for m in leaves if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert [(m.in_features, m.out_features) for m in leaves if isinstance(m, nn.Linear)] == [
        (2048, 256),
        (256, 10),
    ]
    seen = []
    next(m for m in leaves if isinstance(m, nn.Flatten)).register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape)
    )
    net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert seen == [torch.Size([1, 128, 4, 4])]  # 4x4x128 feature map flattened to 2048


def test_tta_views_mirror_and_shift_by_whole_pixels():
    from cifar_lightning.model.net import shift, tta_views

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    counts = [len(tta_views(x, flip, pixels)) for flip, pixels in [(0, 0), (1, 0), (0, 1), (1, 2)]]
    assert counts == [1, 2, 3, 6]
    moved = shift(x, 1, 1)  # down and right by one
    assert torch.equal(moved[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(moved[..., 0, 1:], x[..., 1, :-1])  # the new top row reflects row 1
    assert torch.equal(shift(moved, -1, -1)[..., :-1, :-1], x[..., :-1, :-1])
    views = tta_views(x, True, 2)
    assert torch.equal(views[1], x.flip(-1)) and torch.equal(views[5], shift(x.flip(-1), -2, -2))


def test_tta_shift_along_axes_moves_each_view_left_right_up_and_down():
    from cifar_lightning.model.net import shift, tta_views

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    assert [len(tta_views(x, flip, 1, "axes")) for flip in (False, True)] == [5, 10]
    views = tta_views(x, True, 1, "axes")
    moves = [(0, 1), (0, -1), (1, 0), (-1, 0)]
    expected = [x, x.flip(-1)] + [shift(v, dy, dx) for v in (x, x.flip(-1)) for dy, dx in moves]
    assert all(torch.equal(a, b) for a, b in zip(views, expected))
    assert torch.equal(views[2][..., :, 1:], x[..., :, :-1])  # right by one pixel, rows kept


def test_whitening_init_decorrelates_patches_and_keeps_both_signs():
    from cifar_lightning.model.init import whiten_first_conv

    torch.manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand(64, 3, 18, 18), 3, 1) * 255  # correlated
    conv = nn.Conv2d(3, 32, 3, padding=1)
    whiten_first_conv(conv, images, eps_fraction=0.0)
    patches = torch.nn.functional.unfold(images.double() / 255, 3).transpose(1, 2).reshape(-1, 27)
    out = patches @ conv.weight.double().reshape(32, 27).T + conv.bias.double()
    assert torch.allclose(out.mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-5)
    cov = torch.cov(out[:, :16].T)  # the top 16 directions, each of unit variance, uncorrelated
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=1e-3)
    assert torch.equal(conv.weight[16:], -conv.weight[:16])
    assert conv.weight.requires_grad  # it stays trainable
    # The filters are the top 16 principal directions: the patches' variance along each (unit)
    # filter direction is one of the 16 largest eigenvalues of their covariance, not the
    # smallest (any eigen-direction scaled by 1/sqrt(its variance) whitens to unit variance)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(patches.T))  # ascending
    w = conv.weight.double().reshape(32, 27)[:16]
    along = torch.cov((patches @ (w / w.norm(dim=1, keepdim=True)).T).T).diagonal()
    assert torch.allclose(along.sort().values, eigenvalues[-16:], rtol=1e-4)
    assert eigenvalues[:16].sum() < 0.5 * eigenvalues[-16:].sum()  # the bottom 16: far smaller
    # with added variance eps, each output's variance is lambda / (lambda + eps), largest first
    whiten_first_conv(conv, images, eps_fraction=0.5)
    out = patches @ conv.weight.double().reshape(32, 27)[:16].T
    expected = eigenvalues[-16:] / (eigenvalues[-16:] + 0.5 * eigenvalues.mean())
    assert torch.allclose(out.var(0).sort().values, expected, rtol=1e-4)


def _whitening_reference(conv, images, eps_fraction):
    """Weight and bias as whitening first computed them: every patch at once, in float64."""
    patches = torch.nn.functional.unfold(images.double() / 255.0, conv.kernel_size)
    patches = patches.transpose(1, 2).reshape(-1, conv.weight[0].numel())
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
    half = conv.out_channels // 2
    scale = (eigenvalues[-half:] + eps_fraction * eigenvalues.mean()).rsqrt()
    top = eigenvectors[:, -half:].T * scale[:, None]
    weight = torch.cat([top, -top])
    return weight, -weight @ patches.mean(0)


@pytest.mark.parametrize("chunk_patches", [100, 2**18])  # many chunks (and a partial one), one
def test_whitening_by_chunks_matches_the_float64_reference(chunk_patches):
    from cifar_lightning.model.init import whiten_first_conv

    torch.manual_seed(0)
    noise = torch.nn.functional.avg_pool2d(torch.rand(37, 3, 14, 14), 3, 1)
    images = (noise * 255).round().to(torch.uint8)  # as the datamodule gives them
    conv = nn.Conv2d(3, 32, 3, padding=1)
    whiten_first_conv(conv, images, chunk_patches=chunk_patches)
    weight, bias = _whitening_reference(conv, images, 1e-3)
    got_w, got_b = conv.weight.detach().double().reshape(32, 27), conv.bias.detach().double()
    # an eigenvector's sign is arbitrary: filter i may be the reference's filter i + 16
    same = (got_w[:16] * weight[:16]).sum(1) > 0
    order = torch.where(same, torch.arange(16), torch.arange(16) + 16)
    order = torch.cat([order, (order + 16) % 32])
    assert torch.allclose(got_w, weight[order], rtol=1e-4, atol=1e-4 * weight.abs().max())
    assert torch.allclose(got_b, bias[order], rtol=1e-4, atol=1e-4 * bias.abs().max())
