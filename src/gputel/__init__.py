"""gputel: per-second GPU and host telemetry for GPU worker nodes, on only while GPUs are busy."""

__version__ = "0.1.0"
