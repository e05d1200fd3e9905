"""Packaged experiments (`memlayers experiment NAME`): utilisation (sub-key collapse and its remedies)."""
