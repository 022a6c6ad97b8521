"""Experiments: the config of a whole run, the stage runner and the report."""
