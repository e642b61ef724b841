"""Reference models: shapes, published parameter counts and FLOPs, ResNet-9 structure, memory formats, registry."""

import pytest
import torch
from torch import nn

from nmsparse.nn.sparsify import default_filter, final_classifier
from nmsparse.models import (MLP, MODELS, ResNet9, SmallCNN, ViT, build_model, regnetx_400mf, resnet18, resnet50,
                             vit_tiny)
from nmsparse.models.resnet import BasicBlock


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name, kwargs, shape, classes", [
    ("resnet9", dict(width=0.125), (2, 3, 32, 32), 10),
    ("resnet9", dict(width=0.125, in_channels=1), (2, 1, 28, 28), 10),
    ("resnet18", dict(stem="cifar", num_classes=10, width=16), (2, 3, 32, 32), 10),
    ("resnet18", dict(), (2, 3, 64, 64), 1000),
    ("resnet50", dict(), (2, 3, 64, 64), 1000),
    ("regnetx_400mf", dict(num_classes=100), (2, 3, 64, 64), 100),
    ("small_cnn", dict(), (2, 1, 8, 8), 10),
    ("small_cnn", dict(in_channels=3, num_classes=7), (2, 3, 28, 28), 7),
    ("mlp", dict(in_features=64), (2, 1, 8, 8), 10),
    ("vit_tiny", dict(), (2, 1, 28, 28), 10),
    ("vit", dict(image_size=32, patch=8, dim=64, depth=2, heads=2, pool="mean", num_classes=5),
     (2, 3, 32, 32), 5),
])
def test_output_shape(name, kwargs, shape, classes):
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("factory, expected, rel", [
    (resnet18, 11_689_512, 0.0),
    (resnet50, 25_557_032, 0.0),
    (regnetx_400mf, 5_160_000, 0.01),  # published 5.2M; pycls 5,157,512
])
def test_published_parameter_counts(factory, expected, rel):
    assert n_params(factory()) == pytest.approx(expected, rel=rel)


def test_regnetx_400mf_flops_and_config():
    model = regnetx_400mf().eval()
    macs = [0]

    def hook(mod, inp, out):
        macs[0] += out[0].numel() * mod.weight[0].numel()  # per-sample outputs x MACs per output

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert macs[0] == pytest.approx(400e6, rel=0.1)
    assert [len(s) for s in model.layers] == [1, 2, 7, 12]
    assert [s[0].conv3[0].out_channels for s in model.layers] == [32, 64, 160, 384]
    assert all(m.in_channels // m.groups == 16 for m in convs(model) if m.groups > 1)


def test_resnet9_structure_matches_spec():
    model = ResNet9()
    got = [(tuple(c.weight.shape), c.stride[0], c.padding[0]) for c in convs(model)]
    assert got == [
        ((128, 3, 3, 3), 1, 1),
        ((256, 128, 5, 5), 2, 2),
        ((256, 256, 3, 3), 1, 1), ((256, 256, 3, 3), 1, 1),  # residual
        ((512, 256, 3, 3), 1, 1),
        ((512, 512, 3, 3), 1, 1), ((512, 512, 3, 3), 1, 1),  # residual, after max-pool 2
        ((256, 512, 3, 3), 1, 0),
    ]
    assert all(c.bias is None for c in convs(model))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Sequential", "Sequential", "Residual", "Sequential", "MaxPool2d", "Residual",
                     "Sequential", "AdaptiveMaxPool2d", "Flatten"]
    assert model.fc.weight.shape == (10, 256) and model.fc.bias is None
    x = torch.randn(2, 3, 16, 16)
    model = ResNet9(width=0.125).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.fc(model.features(x)) * 0.2)


@pytest.mark.parametrize("size, ok", [(32, True), (28, True), (11, True), (10, False)])
def test_resnet9_input_sizes(size, ok):
    model = ResNet9(width=0.0625, in_channels=1).eval()
    x = torch.randn(1, 1, size, size)
    with torch.no_grad():
        if ok:
            assert model(x).shape == (1, 10)
        else:
            with pytest.raises(RuntimeError):
                model(x)


def test_resnet_v15_stem_and_strides():
    model = resnet50()
    first = model.layers[1][0]
    assert first.conv1[0].stride == (1, 1) and first.conv2[0].stride == (2, 2)
    assert first.shortcut[0].stride == (2, 2)
    assert model.stem[0][0].kernel_size == (7, 7) and isinstance(model.stem[1], nn.MaxPool2d)
    assert all(c.bias is None for c in convs(model))
    cifar = resnet18(stem="cifar", width=32, in_channels=1, num_classes=10)
    stem = cifar.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.in_channels == 1
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    assert cifar.fc.in_features == 256
    with pytest.raises(ValueError, match="stem"):
        resnet18(stem="tiny")


@pytest.mark.parametrize("factory", [resnet18, resnet50, regnetx_400mf])
def test_zero_init_residual(factory):
    def last_gammas(model):
        blocks = [b for stage in model.layers for b in stage]
        return [(b.conv2 if isinstance(b, BasicBlock) else b.conv3)[1].weight for b in blocks]

    assert all((g == 0).all() for g in last_gammas(factory(zero_init_residual=True)))
    assert all((g == 1).all() for g in last_gammas(factory()))


@pytest.mark.parametrize("build", [
    lambda: ResNet9(width=0.125),
    lambda: resnet18(stem="cifar", width=16),
    lambda: regnetx_400mf(num_classes=10),
    lambda: SmallCNN(in_channels=3),
])
def test_channels_last_matches_nchw(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build, shape", [
    (lambda: ResNet9(width=0.125, in_channels=1), (2, 1, 28, 28)),
    (lambda: resnet18(stem="cifar", width=16, num_classes=10), (2, 3, 16, 16)),
    (lambda: SmallCNN(), (4, 1, 8, 8)),
    (lambda: MLP(64, (64, 32)), (4, 1, 8, 8)),
    (lambda: vit_tiny(), (2, 1, 28, 28)),
    (lambda: ViT(16, 4, 3, 64, 2, 2, 10, pool="mean"), (2, 3, 16, 16)),
])
def test_backward_reaches_every_parameter(build, shape):
    torch.manual_seed(0)
    model = build().train()
    out = model(torch.randn(shape))
    nn.functional.cross_entropy(out, torch.arange(len(out)) % out.shape[1]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_sparsifiable_widths_and_dense_stems():
    """Every layer the default filter picks has both widths multiples of 32; stems and heads are left out."""
    for model, head in [(SmallCNN(), "fc"), (MLP(64), "fc"), (vit_tiny(), "head"), (ResNet9(), "fc")]:
        assert final_classifier(model) == head
        keep = default_filter(model)
        picked = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear)) and keep(n, m)]
        assert picked
        for n, m in picked:
            conv = isinstance(m, nn.Conv2d)
            cin, cout = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
            if n != "body.1":  # the MLP's first layer reads the raw pixels
                assert cin % 32 == 0 and cout % 32 == 0, n
    vit = vit_tiny()
    assert not default_filter(vit)("patch_embed", vit.patch_embed)


def test_vit_argument_checks():
    with pytest.raises(ValueError, match="patch"):
        ViT(image_size=30, patch=4)
    with pytest.raises(ValueError, match="heads"):
        ViT(dim=100, heads=3)
    with pytest.raises(ValueError, match="pool"):
        ViT(pool="max")


def test_registry_errors():
    assert set(MODELS) == {"resnet9", "resnet18", "resnet50", "regnetx_400mf", "small_cnn", "mlp",
                           "vit_tiny", "vit", "vgg16", "gpt"}
    with pytest.raises(ValueError, match="did you mean 'resnet18'") as err:
        build_model("resnet_18")
    assert all(name in str(err.value) for name in MODELS)
    with pytest.raises(ValueError, match=r"unknown model 'alexnet'\. Known models: resnet9, "):
        build_model("alexnet")
    with pytest.raises(TypeError, match="'resnet18'.*'widht'.*did you mean 'width'"):
        build_model("resnet18", widht=32)
    with pytest.raises(TypeError, match="'mlp'"):
        build_model("mlp", image_size=8)
    assert isinstance(build_model("small_cnn", width=64), SmallCNN)
