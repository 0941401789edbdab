import pytest
import timm
import torch

# (model name, input size) pairs small enough for 2 CPU cores; ViT and Swin need their fixed size.
FAMILIES = [
    ("resnet18", 32),
    ("resnet50", 32),
    ("efficientnet_b0", 32),
    ("mobilenetv3_large_100", 32),
    ("convnext_atto", 32),
    ("regnetx_002", 32),
    ("densenet121", 32),
    ("vgg11_bn", 32),
    ("vit_tiny_patch16_224", 224),
    ("swin_tiny_patch4_window7_224", 224),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def create(name: str, **kwargs) -> torch.nn.Module:
    kwargs.setdefault("num_classes", 10)
    return timm.create_model(name, pretrained=False, **kwargs)
