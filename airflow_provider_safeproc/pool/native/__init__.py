"""The native engine: a guardian helper process, a dispatcher thread, lean workers (Linux).

- ``engine``: the dispatcher thread's loop, as named steps.
- ``workers``: the pool's record of each worker, and the ``Supervisor`` that starts and
  replaces them through the guardian.
- ``timeouts``, ``output``: item timeouts; output written to fds 1 and 2.
- ``launcher`` (pool side) and ``guardian`` (the helper process), and their ``control``
  messages; ``entry``: the command line of a fresh interpreter of ours.
- ``worker``: how a worker process starts (then it runs ``pool.worker_loop``).
"""
