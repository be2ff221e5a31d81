"""Backbones: timm ResNet-18/50 (width parameter, CIFAR stem for small images) and timm ViT-T/S/B.

`build_backbone(cfg)` returns a module mapping images (B, 3, H, W) to pooled features (B, feat_dim)
with `.feat_dim`; ViTs also expose `.tokens(x)` -> (B, 1 + N, D), the CLS token then the patch tokens.
"""
from __future__ import annotations

import torch
from torch import nn

VIT_DIMS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}
ZERO_INIT_LAST = True   # backbones.<name>.zero_init_last when unset (timm's default)


class ResNetBackbone(nn.Module):
    def __init__(self, arch: str, width: int = 64, cifar_stem: bool = False,
                 zero_init_last: bool = ZERO_INIT_LAST):
        super().__init__()
        from timm.models.resnet import BasicBlock, Bottleneck, ResNet

        block, layers = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}[arch]
        if width % 2:
            raise ValueError(f"backbone width must be even, got {width}")
        # zero_init_last: each residual branch's last BN starts at gamma 0 (timm's default, as SimCLR's and BYOL's
        # ResNets); false: torchvision's default init (MoCo's and DINO's code). Initialisation only: same module.
        # timm sizes layer1's input from the stem: a deep stem of width/2 gives `width`; the stem itself
        # is then replaced by the standard single conv (7x7/2 + max-pool, or the CIFAR 3x3/1, no pool)
        net = ResNet(block, layers, num_classes=0, stem_type="deep", stem_width=width // 2,
                     channels=(width, 2 * width, 4 * width, 8 * width), zero_init_last=zero_init_last)
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:
            net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        self.net = net
        self.feat_dim = net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViTBackbone(nn.Module):
    def __init__(self, arch: str, image_size: int, patch_size: int, depth: int | None = None):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        dim, full_depth, heads = VIT_DIMS[arch]
        depth = depth or full_depth  # fewer blocks only for CPU profiles
        # dynamic_img_size: local crops (smaller than image_size) go through the same ViT
        self.net = VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=dim, depth=depth,
                                     num_heads=heads, num_classes=0, dynamic_img_size=True)
        self.feat_dim = dim
        self.patch_size = patch_size

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth on the residual branches, as timm builds it for `drop_path_rate=rate`: block i of n drops
        with probability rate * i / (n - 1) (linearly from 0 to `rate`). Modules without parameters, so a momentum
        copy made before or after keeps its parameters one to one."""
        from timm.layers import DropPath

        # on the host whatever the default device (a model built under torch.device('meta') has no .item())
        rates = [x.item() for x in torch.linspace(0, rate, len(self.net.blocks), device="cpu")]
        for block, r in zip(self.net.blocks, rates):
            block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
            block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D): the CLS token then the patch tokens, row-major, after the final norm."""
        return self.net.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]


def build_backbone(cfg: dict, image_size: int) -> nn.Module:
    arch = cfg["arch"]
    if arch.startswith("resnet"):
        return ResNetBackbone(arch, cfg.get("width", 64), cfg.get("cifar_stem", image_size <= 64),
                              cfg.get("zero_init_last", ZERO_INIT_LAST))
    return ViTBackbone(arch, image_size, cfg["patch_size"], cfg.get("depth"))
