"""A user's lab: the parts a researcher writes, one small file each, named by import path.

``docs/extending.md`` walks through them; ``tests/contract/test_user_parts.py`` runs them on
every engine, across resume and over gRPC. Put ``examples/`` on ``PYTHONPATH`` (or install
your own package) to name them from TOML: ``[aggregator] name = "my_lab.agg:Median"``.
"""
