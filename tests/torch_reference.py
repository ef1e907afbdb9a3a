"""The AlexNet family written independently in PyTorch (NCHW): the reference the weight-import
and model tests compare against, and the baseline benchmarks/ times. PyTorch is a test and
benchmark dependency only (the `test` extra)."""

import torch
from torch import nn

# torch.nn.LocalResponseNorm divides alpha by size, as Caffe does; the paper's alpha is 1e-4 per
# channel (so 5e-4 here) with k = 2, BVLC Caffe's is 1e-4 over the window with k = 1.
LRN = {"paper": dict(size=5, alpha=5e-4, beta=0.75, k=2.0),
       "caffe": dict(size=5, alpha=1e-4, beta=0.75, k=1.0)}


def alexnet(variant="paper", num_classes=1000, lrn="paper"):
    """paper (two groups) or single_tower as nn.Sequential, in BVLC's deploy.prototxt order:
    conv-relu-norm-pool. `lrn`: a key of LRN, or None to leave LRN out."""
    groups = {"paper": 2, "single_tower": 1}[variant]

    def norm():
        return nn.LocalResponseNorm(**LRN[lrn]) if lrn else nn.Identity()

    return nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(), norm(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=groups), nn.ReLU(), norm(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, padding=1, groups=groups), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1, groups=groups), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(9216, 4096), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, num_classes),
    )


class TorchvisionAlexNet(nn.Module):
    """torchvision.models.alexnet (the one_weird_trick variant), written out with the same module
    names, so that its state_dict has torchvision's keys."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SeedSmallAlexNet(nn.Module):
    """The small AlexNet the project's seed write-up prints (module names as printed), for
    3 x 32 x 32 images."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 64, 5), nn.ReLU())
        self.max_pool1 = nn.MaxPool2d(3, 2)
        self.conv2 = nn.Sequential(nn.Conv2d(64, 64, 5), nn.ReLU(inplace=True))
        self.max_pool2 = nn.MaxPool2d(3, 2)
        self.fc1 = nn.Sequential(nn.Linear(1024, 384), nn.ReLU(inplace=True))
        self.fc2 = nn.Sequential(nn.Linear(384, 192), nn.ReLU(inplace=True))
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x):
        x = self.max_pool2(self.conv2(self.max_pool1(self.conv1(x))))
        return self.fc3(self.fc2(self.fc1(torch.flatten(x, 1))))


def logits(model, images_nhwc):
    """The model's outputs (eval mode, no gradients) for NHWC numpy images."""
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
