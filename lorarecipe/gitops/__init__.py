"""Builds as a project runs them in git and CI: many recipes and matrix builds into output folders
(``batch``), lock files that pin every input (``lock``), and incremental rebuilds (``incremental``).
Library code only: it raises and returns results; the CLI prints them."""
