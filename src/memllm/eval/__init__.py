"""Evaluations: retention and lookup (`retention`), memory integrity under many updates (`integrity`),
and what both share (`common`)."""
