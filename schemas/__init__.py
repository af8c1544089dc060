"""JSON Schemas of the configuration files, installed as the ``trollmoves.schemas`` package."""
