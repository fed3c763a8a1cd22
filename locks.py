"""One writer at a time: an exclusive, non-blocking flock that the kernel drops when its process dies (a killed
holder never leaves it behind). Used by a run directory's lock (rundir) and a plan's claims (plan); imports no
torch, so the sweep's planner stays light."""
import fcntl


def lock_or_holder(f):
    """Take an exclusive flock on the open file f (opened 'a+'): None once held, or, where another process holds
    it, what that holder wrote in the file ("unknown" if nothing), f then closed. A file system without lock
    support raises its OSError (ENOSYS, ENOLCK, EOPNOTSUPP) for the caller to name."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return holder
    return None
