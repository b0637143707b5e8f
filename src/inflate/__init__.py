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

from .discovery import find_input_layers
from .errors import InflateError
from .inflation import inflate_first_conv

__all__ = ["InflateError", "find_input_layers", "inflate_first_conv"]
__version__ = "0.1.0"
