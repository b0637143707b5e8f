"""Turn a pretrained network into an N-input network, exactly.

Example:
    >>> import torch, torch.nn as nn
    >>> import inflate
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    >>> inflate.find_input_layers(net)
    ['0']
    >>> inflate.inflate_first_conv(net, 2)[0].in_channels
    6
"""

from ._batchnorm import BatchNormPin, pin_batchnorm
from ._split_frozen import FrozenSplit, split_frozen
from ._checkpoint import load_checkpoint, save_checkpoint
from ._discovery import find_input_layers
from ._errors import InexactError, InflateError, TraceError
from ._finetune import FinetuneReport, check_optimizer, finetune, layers
from ._inflate import inflate_first_conv
from ._preprocess import inflate_normalization
from ._schedule import Unfreezer, param_groups
from ._spikes import Spike, SpikeMonitor

__all__ = [
    "BatchNormPin",
    "FinetuneReport",
    "FrozenSplit",
    "InexactError",
    "InflateError",
    "TraceError",
    "Unfreezer",
    "Spike",
    "SpikeMonitor",
    "check_optimizer",
    "finetune",
    "find_input_layers",
    "inflate_first_conv",
    "inflate_normalization",
    "layers",
    "load_checkpoint",
    "param_groups",
    "pin_batchnorm",
    "save_checkpoint",
    "split_frozen",
]
__version__ = "0.1.0"
