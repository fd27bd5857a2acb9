"""A zoo of small but real CNN architectures for the channel-graph, pruning and compaction
tests (torchvision does not import here, so they are written out). Widths and images are
small so a whole test file runs in seconds on 2 cores; the ResNet builder is parametric so a
ResNet-50-shaped network is ``resnet(Bottleneck, (3, 4, 6, 3), width=64)``.

``randomize_bn(model)`` gives every BatchNorm non-trivial statistics (weight, bias,
running mean and variance), so that a test that ignores a BatchNorm fails.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6) else act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3); groups/base_width make it ResNeXt's."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout: stem conv + max pool, four stages (the first block of
    a stage with stride or width change gets a conv1x1 + BN downsample), global average
    pool, flatten, fc. ``width`` is the stem width (64 in ResNet-50); stages are
    width, 2*width, 4*width, 8*width planes."""

    def __init__(self, block: type, layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, num_classes: int = 1000,
                 groups: int = 1, width_per_group: int = 64, small_input: bool = False):
        super().__init__()
        self.inplanes = width
        self.groups, self.base_width = groups, width_per_group
        if small_input:  # 3x3 stem, no max pool: the last stage still sees a few pixels on 16x16 images
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, n in enumerate(layers):
            stages.append(self._make_layer(block, width * 2 ** i, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 2 ** (len(layers) - 1) * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, self.groups, self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_basic(width: int = 8, num_classes: int = 10) -> ResNet:
    """A small basic-block ResNet (two blocks in the first stage, one after), for small images."""
    return ResNet(BasicBlock, (2, 1, 1), width, num_classes, small_input=True)


def resnet_bottleneck(width: int = 8, layers: tuple[int, ...] = (1, 2, 1), num_classes: int = 10,
                      small_input: bool = True) -> ResNet:
    """Bottleneck ResNet; ``resnet_bottleneck(64, (3, 4, 6, 3), 1000, False)`` is ResNet-50."""
    return ResNet(Bottleneck, layers, width, num_classes, small_input=small_input)


def resnext(width: int = 8, groups: int = 4, width_per_group: int = 32, num_classes: int = 10) -> ResNet:
    """ResNeXt-like: bottlenecks whose 3x3 conv is grouped."""
    return ResNet(Bottleneck, (1, 1), width, num_classes, groups=groups, width_per_group=width_per_group,
                  small_input=True)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
                   conv_bn(hidden, cout, 1, act=None)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2-like: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 linear) with
    ReLU6, residuals where shapes allow, a 1x1 head conv, pool, dropout, Linear."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        # (expand, out, repeats, stride)
        cfg = [(1, width, 1, 1), (6, width * 2, 2, 2), (6, width * 3, 2, 2)]
        layers = [conv_bn(3, width * 2, 3, 2, act=nn.ReLU6)]
        cin = width * 2
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, width * 8, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(width * 8, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int = 2):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out)))


class DenseNet(nn.Module):
    """DenseNet-like: each layer's output is concatenated to its input (BN-ReLU-conv on the
    concatenation: a BatchNorm over several groups' channels), transitions with avg pooling."""

    def __init__(self, growth: int = 6, blocks: tuple[int, ...] = (3, 3), init: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, init, 3, 1, 1, bias=False)
        c = init
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, n in enumerate(blocks):
            block = nn.ModuleList()
            for _ in range(n):
                block.append(DenseLayer(c, growth))
                c += growth
            self.blocks.append(block)
            if i != len(blocks) - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                                      nn.AvgPool2d(2)))
                c //= 2
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            for layer in block:
                x = torch.cat([x, layer(x)], 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, (1, 1)).flatten(1))


class FlattenHead(nn.Module):
    """A VGG-like net whose last map is flattened into a Linear (each channel owns H*W
    inputs of fc1), through x.view(x.size(0), -1); convs with bias and a Linear + BN1d."""

    def __init__(self, num_classes: int = 10, width: int = 8, image: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width * 2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width * 2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(width * 2 * (image // 8) ** 2, 32)  # three 2x2 max pools
        self.bn3 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = self.pool(x)
        x = x.view(x.size(0), -1)
        return self.fc2(F.gelu(self.bn3(self.fc1(x))))


class SplitNet(nn.Module):
    """ShuffleNet-V2-like units without the shuffle: chunk the channels, run one half through
    a branch, concatenate; an explicit torch.split with unequal sizes; SiLU, Hardswish,
    multiplication by a number."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = conv_bn(3, width, 3, 2)
        h = width // 2
        self.branch = nn.Sequential(conv_bn(h, h, 1, act=nn.SiLU), conv_bn(h, h, 3, groups=h, act=None),
                                    conv_bn(h, h, 1, act=nn.Hardswish))
        self.mid = conv_bn(width, width + 8, 1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width + 8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], dim=1)
        x = self.mid(x)
        p, q = torch.split(x, [8, x.shape[1] - 8], dim=1)
        x = torch.cat([self.left(p), F.relu(self.right(q)) * 0.5], 1)
        return self.fc(x.mean((2, 3)))


class UNetLike(nn.Module):
    """An encoder-decoder with a ConvTranspose2d upsampling and a skip concatenation; the
    output is a map (its channels are the model's output)."""

    def __init__(self, width: int = 8, out: int = 2):
        super().__init__()
        self.enc1 = conv_bn(3, width)
        self.enc2 = conv_bn(width, width * 2, stride=2)
        self.up = nn.ConvTranspose2d(width * 2, width, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(width)
        self.dec = conv_bn(width * 2, width)
        self.head = nn.Conv2d(width, out, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(a)
        u = F.relu(self.up_bn(self.up(b)))
        return self.head(self.dec(torch.cat([u, a], 1)))


ZOO = {
    "resnet_basic": lambda: resnet_basic(),
    "resnet_bottleneck": lambda: resnet_bottleneck(),
    "resnext": lambda: resnext(),
    "mobilenet_v2": lambda: MobileNetV2(),
    "densenet": lambda: DenseNet(),
    "flatten_head": lambda: FlattenHead(),
    "splitnet": lambda: SplitNet(),
    "unet": lambda: UNetLike(),
}
IMAGE = (2, 3, 16, 16)  # batch 2 (BatchNorm1d in train mode needs > 1), 16x16: seconds on 2 busy cores


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (and non-zero conv biases),
    so that compaction that drops or mis-slices one shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.8 + 0.4)
            m.weight.copy_(torch.rand(n, generator=g) * 0.8 + 0.6)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def make(name: str, seed: int = 0) -> nn.Module:
    """Build a zoo model with fixed random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(ZOO[name](), seed).eval()
