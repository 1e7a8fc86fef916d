"""Models that take a ``norm`` argument, so one switch changes their normalization."""

from .cnn import CNN
from .dcgan import DCGANDiscriminator, DCGANGenerator
from .dncnn import DnCNN
from .edsr import EDSR
from .mlp import MLP

__all__ = ["CNN", "DCGANDiscriminator", "DCGANGenerator", "DnCNN", "EDSR", "MLP"]
