"""Convolutional reference models: the SDGP CIFAR ResNet-9, ImageNet ResNet-18/50 (v1.5) and RegNetX-400MF."""

from __future__ import annotations

from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int | None = None,
            groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Bias-free Conv2d, BatchNorm2d and (optionally) ReLU."""
    padding = kernel // 2 if padding is None else padding
    layers = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


class ResNet9(nn.Module):
    """The SDGP paper's CIFAR-10 ResNet-9 (SPEC section 2), every channel count scaled by `width`.

    conv 3x3 in->128, conv 5x5/2 128->256, residual(2 x conv 3x3 256->256), conv 3x3 256->512,
    max-pool 2, residual(2 x conv 3x3 512->512), conv 3x3 512->256 unpadded, global max-pool,
    Linear 256->classes without bias, logits x 0.2. Every conv is bias-free + BN + ReLU; SPEC gives
    no kernel for 256->512, so it is 3x3 like the others, and all but the last conv are padded
    to keep the size ("same"). Accepts any input of at least 11x11 (32x32 CIFAR -> 6x6 before the
    global pool, 28x28 Fashion-MNIST -> 5x5); smaller inputs vanish in the unpadded conv.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, scale: float = 0.2):
        super().__init__()
        c128, c256, c512 = (max(1, round(c * width)) for c in (128, 256, 512))
        self.scale = scale
        self.features = nn.Sequential(
            conv_bn(in_channels, c128, 3),
            conv_bn(c128, c256, 5, stride=2),
            Residual(nn.Sequential(conv_bn(c256, c256), conv_bn(c256, c256))),
            conv_bn(c256, c512),
            nn.MaxPool2d(2),
            Residual(nn.Sequential(conv_bn(c512, c512), conv_bn(c512, c512))),
            conv_bn(c512, c256, 3, padding=0),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(c256, num_classes, bias=False)

    def forward(self, x):
        return self.fc(self.features(x)) * self.scale


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, planes, 3, stride)
        self.conv2 = conv_bn(planes, planes, 3, relu=False)
        self.shortcut = _shortcut(cin, planes, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet-50 v1.5 block: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = conv_bn(cin, planes, 1)
        self.conv2 = conv_bn(planes, planes, 3, stride)
        self.conv3 = conv_bn(planes, cout, 1, relu=False)
        self.shortcut = _shortcut(cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 strided projection + BN when the shape changes."""
    return conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()


def _stem(kind: str, in_channels: int, width: int, imagenet: nn.Module) -> nn.Module:
    if kind == "imagenet":
        return imagenet
    if kind == "cifar":
        return conv_bn(in_channels, width, 3)
    raise ValueError(f"stem must be 'imagenet' or 'cifar', got {kind!r}")


def _init(model: nn.Module, zero_init_residual: bool) -> None:
    """He (fan-out) init for convs; optionally zero the last BN gamma of every residual branch."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck, XBlock)):
                last = m.conv2 if isinstance(m, BasicBlock) else m.conv3
                nn.init.zeros_(last[1].weight)


class _StagedNet(nn.Module):
    """stem -> stages (self.layers) -> average pool -> Linear: what ResNet and RegNet share."""

    def _head(self, cin: int, num_classes: int, zero_init_residual: bool) -> None:
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        _init(self, zero_init_residual)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))))


class ResNet(_StagedNet):
    """ResNet v1.5 with an ImageNet stem (7x7/2 conv + 3x3/2 max-pool) or a CIFAR stem (3x3/1 conv)."""

    def __init__(self, block: type, depths: list[int], num_classes: int = 1000, in_channels: int = 3,
                 width: int = 64, stem: str = "imagenet", zero_init_residual: bool = False):
        super().__init__()
        self.stem = _stem(stem, in_channels, width, nn.Sequential(
            conv_bn(in_channels, width, 7, stride=2), nn.MaxPool2d(3, stride=2, padding=1)))
        cin, stages = width, []
        for i, depth in enumerate(depths):
            planes = width * 2**i
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, planes, stride=2 if i > 0 and j == 0 else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self._head(cin, num_classes, zero_init_residual)


def resnet18(num_classes: int = 1000, in_channels: int = 3, width: int = 64, stem: str = "imagenet",
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 (11.69M parameters at 1000 classes)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width, stem, zero_init_residual)


def resnet50(num_classes: int = 1000, in_channels: int = 3, width: int = 64, stem: str = "imagenet",
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 v1.5 (25.56M parameters at 1000 classes)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width, stem, zero_init_residual)


class XBlock(nn.Module):
    """RegNetX block: 1x1, grouped 3x3 (carrying the stride), 1x1, with a projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int, bottleneck_ratio: float):
        super().__init__()
        mid = round(cout * bottleneck_ratio)
        self.conv1 = conv_bn(cin, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, stride, groups=mid // group_width)
        self.conv3 = conv_bn(mid, cout, 1, relu=False)
        self.shortcut = _shortcut(cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class RegNet(_StagedNet):
    """RegNetX: 3x3/2 stem, stages of XBlocks (first block of each stage strided), avg-pool, Linear."""

    def __init__(self, depths: list[int], widths: list[int], group_width: int, bottleneck_ratio: float = 1.0,
                 stem_width: int = 32, num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet",
                 zero_init_residual: bool = False):
        super().__init__()
        self.stem = _stem(stem, in_channels, stem_width, conv_bn(in_channels, stem_width, 3, stride=2))
        cin, stages = stem_width, []
        for depth, w in zip(depths, widths):
            stages.append(nn.Sequential(*(XBlock(cin if j == 0 else w, w, 2 if j == 0 else 1, group_width,
                                                 bottleneck_ratio) for j in range(depth))))
            cin = w
        self.layers = nn.Sequential(*stages)
        self._head(cin, num_classes, zero_init_residual)


def regnetx_400mf(num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet",
                  zero_init_residual: bool = False) -> RegNet:
    """RegNetX-400MF (Radosavovic et al. 2020: w0=24, wa=24.48, wm=2.54, d=22, g=16, b=1), quantized to
    depths [1, 2, 7, 12], widths [32, 64, 160, 384], group width 16, stem 32: 5.16M parameters, ~0.4 GMACs
    at 224x224."""
    return RegNet([1, 2, 7, 12], [32, 64, 160, 384], 16, 1.0, 32, num_classes, in_channels, stem,
                  zero_init_residual)
