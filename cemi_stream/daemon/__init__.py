"""The daemon: one supervised service that starts, watches, restarts and stops runs.

* :mod:`~cemi_stream.daemon.options` - :class:`RunOptions`, the validated
  options of a run (those of ``replay``);
* :mod:`~cemi_stream.daemon.stages` - the command lines of the stage processes;
* :mod:`~cemi_stream.daemon.lifecycle` - the parent-death guard (no process
  outlives its parent) and the spawning of guarded children;
* :mod:`~cemi_stream.daemon.supervisor` - :class:`Run` (one run's processes,
  watched and restarted) and :class:`Supervisor` (all runs of a data directory).

Nothing heavy is imported here, so a stage process can arm its guard cheaply.
"""
