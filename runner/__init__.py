"""autotrans: streaming, bit-exact transformation of LLM checkpoints between layouts and formats."""

__version__ = "0.1.0"
