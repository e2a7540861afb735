"""Sub-commands of the ``mcsd`` command line (see mcsd.cli)."""
