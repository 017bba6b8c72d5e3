"""The dml-* commands: one thin module per command; the engine never imports from here."""
