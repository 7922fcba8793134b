"""Reports: LaTeX / Markdown / CSV tables and figures from results folders (``clbench report``).

- :mod:`~clbench.reports.loading` finds complete runs and external matrices and checks them;
- :mod:`~clbench.reports.tables` builds the MTIL comparison table (one long frame, three renderings);
- :mod:`~clbench.reports.literature` holds the published rows (``clbench/data/literature.csv``);
- :mod:`~clbench.reports.costs` the time / memory table and the stored-state growth;
- :mod:`~clbench.reports.figures` the matplotlib figures;
- :mod:`~clbench.reports.report` puts them together: :func:`~clbench.reports.report.build_report` renders in memory,
  :func:`~clbench.reports.report.write_report` writes atomically.

Nothing is imported here, so registering the command keeps ``clbench --help`` fast.
"""
