"""The multi-exit model: staged execution of timm backbones, exit heads, ``wrap``, MACs, serialisation."""

from .config import ScanConfig
from .hub import HubUploadError
from .macs import count_macs
from .multi_exit import MultiExitModel, MultiExitOutput, from_pretrained, wrap

__all__ = ["HubUploadError", "MultiExitModel", "MultiExitOutput", "ScanConfig", "count_macs", "from_pretrained", "wrap"]
