"""creditd: real-time credit authorization and metering for AI voice and SMS agents."""

from importlib import metadata

__version__ = metadata.version("creditd")  # written once, in pyproject.toml
