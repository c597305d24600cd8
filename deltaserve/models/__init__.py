"""Models shipped inside the package."""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default"  # the embedded default model (see its MODEL_CARD.md)
