"""Results report: tables (Markdown, LaTeX), figures, paired method comparisons and accuracy baselines.

Modules: :mod:`~harness.report.stats` (statistics), :mod:`~harness.report.format` (number formatting, table
rendering), :mod:`~harness.report.tables`, :mod:`~harness.report.mixed` (mixed-task serving),
:mod:`~harness.report.plots`, :mod:`~harness.report.document`, :mod:`~harness.report.check` and :mod:`~harness.report.commands` (click). ``COMMANDS`` lists the commands for the
main CLI group.
"""

from harness.report import commands as _commands

# The ``check`` command is not bound as ``harness.report.check``: that name is the module check.py.
COMMANDS = [_commands.report, _commands.compare, _commands.baseline, _commands.check]

__all__ = ["COMMANDS"]
