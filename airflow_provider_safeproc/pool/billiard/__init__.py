"""The billiard engine: a real ``billiard`` pool (Celery's), behind the same seam and rules.

Where the native engine cannot run (macOS: no ``memfd_create``, ``SOCK_SEQPACKET``,
``PR_SET_CHILD_SUBREAPER`` or ``/proc``), or when asked for with ``engine="billiard"``::

    task process                      helper (python -c, lean)             billiard workers
    ------------                      -------------------------            ----------------
    BilliardEngine thread --frames--> helper loop                          SafeWorker: billiard's
      (engine.py)                      PerWorkerPool(billiard.pool.Pool,      worker loop (ACK, READY,
      WorkQueue, settle rules          threads=False): a private pipe pair    maxtasksperchild), our
      stamps read from files           per worker, no shared queue lock  ---> run_task (worker_loop)
                            <--frames- ACK -> Accepted, READY -> Done,   <--- our messages on its
                                       our messages, deaths, fd output         own pipe, stamps

- ``engine``: the engine in the task process: hands dispatches to the helper, settles what
  comes back through the same rules as the native engine, times items from their stamps.
- ``helper``: the helper interpreter's loop; ``workerpool``: the billiard pool subclass it
  drives; ``task``: what runs inside a billiard worker; ``messages``: what they say.

Why a subclass rather than ``billiard.Pool`` as it is: every worker of a stock pool reads one
shared pipe under one semaphore, and a worker killed while it holds it (an idle worker
always does) wedges the pool for good; lost workers are noticed after ``lost_worker_timeout``
(10 s by default); a pickling error while a task is sent is swallowed. Celery's ``AsynPool``
gives each worker its own pipes for the same reasons; so does ``PerWorkerPool``.
"""
