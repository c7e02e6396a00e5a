"""The command line: a lazy click group (main.py) and one thin module per command.

Only click is imported at start-up; each command module is imported when its
command runs, so `attntrace --help` never loads numpy, rich or yaml.
"""
