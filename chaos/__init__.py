"""Fault-injection harness for djasync (issue 6): a Django app, its jobs, and ``run.py``.

``python chaos/run.py --seed N`` starts a throwaway PostgreSQL, three worker daemons and a
producer, injects seeded faults (kill -9, terminated and cancelled connections, SIGSTOP,
PostgreSQL restarts), then checks with SQL that nothing was lost and nothing ran twice.
"""
