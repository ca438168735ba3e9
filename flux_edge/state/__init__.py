"""Durable state shared by every store: what a storage fault means and each store's health
(``faults``), schema versions and migrations (``versions``), and the ``flux-edge state`` command
(``cli``). Imports nothing from flux_edge but ``errors``."""
