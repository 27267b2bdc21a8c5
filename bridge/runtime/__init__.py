"""The runtime: a configuration becomes running parts, and stops within one deadline.

``app`` is the composition root (an async context manager that enters the data folder, the
private servers, memory, the cache, the handlers and the server in order and closes them in
reverse); ``embedded`` runs the private valkey-server and FalkorDB a bridge owns when none
is configured; ``workers`` is ``serve --workers N``; ``lifecycle`` is what those two share
(started once, stopped in reverse within one deadline, with the private servers they own);
``datadir`` is the data folder and the lock that gives it to one bridge at a time.
"""
