"""`vgpt launch`: cluster descriptions, per-stage parallel layouts, and the rendered launch files."""
