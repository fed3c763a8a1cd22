"""A stop asked for by a signal: SIGTERM or SIGINT (scancel, a time limit, Ctrl-C, torchrun's killpg) once training
has started is noted here, and train.Run.train stops at its next step boundary that the ranks agree on, after a
checkpoint there (exit 143 / 130, resumable). A signal before that kills at once: start-up writes each file whole."""
import signal
import threading


class StopRequest:
    """The signal noted (signum, 0 for none). After the first, a SIGINT raises KeyboardInterrupt at once (the user
    insists) and a SIGTERM is ignored (SLURM signals every process of the job, torchrun its workers, each once)."""

    def __init__(self):
        self.signum, self.previous = 0, {}
        self.until_exit = False  # train.py run as a script: the process ends with the run (restore keeps a stop's)

    def install(self):
        self.signum = 0
        if threading.current_thread() is threading.main_thread():  # (signal.signal works there only)
            self.previous = {s: signal.signal(s, self.note) for s in (signal.SIGTERM, signal.SIGINT)}

    def note(self, signum, frame):
        if not self.signum:
            self.signum = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # not a handler: the interpreter's exit resets those

    def restore(self):
        """The handlers as before, the request forgotten: train.main in a process that goes on (a test, a benchmark)
        gets its own handling of SIGTERM back, after a stop too. Not where train.py stopped as a script (until_exit):
        there repeats stay ignored to the exit (torchrun sends the ranks still ending a SIGTERM once one has exited)."""
        if self.signum and self.until_exit:
            return
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self.signum, self.previous = 0, {}


STOP = StopRequest()
