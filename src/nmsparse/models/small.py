"""Small models for the embedded digits set and MNIST-size images: a CNN and an MLP."""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Digits (8x8) / MNIST (28x28) CNN: conv in->w, conv w->2w /2, conv 2w->4w /2, avg-pool, Linear.

    With the default width 32 every conv after the (dense) stem has channel counts that are multiples
    of 32, so 2:4, 4:8, 8:16, 16:32, 8x8 blocks and transposable 4:8 all apply.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        layers, cin = [], in_channels
        for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class MLP(nn.Module):
    """Flatten, then Linear + ReLU per hidden width (keep them multiples of 32), then a Linear classifier."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 256), num_classes: int = 10):
        super().__init__()
        layers, cin = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU(inplace=True)]
            cin = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))
