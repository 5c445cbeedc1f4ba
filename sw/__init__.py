"""SFx software: bit-exact model, WASQ quantization, CLI."""
__version__ = "0.1.0"
