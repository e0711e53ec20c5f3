"""Reporting: the board built from records, and the tables, page, plots and contrasts written from it."""
