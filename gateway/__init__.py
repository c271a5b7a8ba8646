"""mailgw: a crash-safe mail gateway for IoT and logistics devices."""

__version__ = "0.1.0"
