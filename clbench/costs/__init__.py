"""Costs: the named-section profiler every run uses (:mod:`clbench.costs.profiler`: wall time and peak memory per
task, ``profile.csv``), and measurements without datasets or weights: random tasks shaped like a backbone's inputs
(:mod:`clbench.costs.fake`) and ``clbench profile``, which runs only the methods' cost centres on them
(:mod:`clbench.costs.profile`, command in :mod:`clbench.costs.cli`)."""
