"""cnnkit: 2D convolutional networks end to end, from the chapter's operations to trained models."""

__version__ = "0.1.0"
