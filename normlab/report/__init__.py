"""Plots and reports of verdicts."""

from .writer import verdict_table, write_report

__all__ = ["verdict_table", "write_report"]
