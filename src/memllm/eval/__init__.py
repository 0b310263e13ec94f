"""Evaluations: retention and lookup (`retention`), memory integrity under many updates."""
