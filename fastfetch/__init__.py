"""fastfetch: image–caption datasets → resized MosaicML Streaming shards, fast and resumable."""

__version__ = "0.1.0"
