"""creditd: real-time credit authorization and metering for AI voice and SMS agents."""

__version__ = "0.1.0"
