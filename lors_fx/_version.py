"""The package version (a leaf: serialization writes it into adapter files)."""
__version__ = "0.1.0"
