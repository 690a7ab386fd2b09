"""A whole fleet simulated on one machine: a broker, the server in a thread and one process per
device (one engine thread each). ``harness.py`` runs it, ``report.py`` prints and plots it."""
