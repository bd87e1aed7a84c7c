"""moecli: a command-line Mixture-of-Experts toolkit."""

__version__ = "0.1.0"
