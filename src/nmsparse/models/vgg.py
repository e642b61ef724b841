"""VGG-16 (Simonyan & Zisserman, configuration D): one of the block-sparsity paper's networks."""

from __future__ import annotations

from torch import nn

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG-16 (configuration D, no batch-norm): 13 convs 3x3 + ReLU, 5 max-pools, 3 fully connected."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224):
        super().__init__()
        layers, cin = [], in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        side = image_size // 32
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(512 * side * side, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg16(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> VGG16:
    """``VGG16`` for ``image_size`` x ``image_size`` inputs (its classifier reads 512 x (image_size / 32)^2)."""
    return VGG16(num_classes, in_channels, image_size)
