"""potluck.dashboard: a local web app over the run store (``potluck dashboard``)."""
