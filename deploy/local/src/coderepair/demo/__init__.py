"""The `coderepair` umbrella: the whole network on one machine (`coderepair demo`)."""

__version__ = "0.1.0"
