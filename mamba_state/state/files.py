"""Temporary files for atomic writes, created with the permissions an ordinary ``open(path, "w")`` would give.

``tempfile.mkstemp`` creates its file with mode ``0o600`` whatever the umask, so a file written through it and
renamed over the destination ends up ``-rw-------`` even where the user's umask (typically ``0o022``) would make
it ``-rw-r--r--``. :func:`open_temp_beside` creates the temporary file itself with ``os.open(..., 0o666)``: the
kernel applies the process's umask (and a directory's default ACL, where there is one) exactly as for any new file,
so there is no umask to read. Reading it would be worse: ``os.umask`` can only be read by setting it, which changes
it for every thread of the process for a moment, and ``/proc/self/status`` exists on Linux only.

When the destination already exists, :func:`replace_keeping_mode` gives the new file the destination's permission
bits before the rename (as editors and ``cp`` onto an existing file do): a state file someone made private with
``chmod 600`` stays private when it is saved again, and a shared one stays shared. Owner and group are those of
the writing process, as for any new file.

Two more things a save needs from its temporary files:

* :func:`lock_temp`: a save holds an exclusive ``flock`` on its temporary file while it writes, syncs and renames
  it. The kernel drops the lock when the process dies, however it dies, so a temporary file nobody holds a lock on
  is one whose save is over.
* :func:`sweep_stale_temps`: before a save creates its own temporary file it removes the ones a killed save to the
  same path left behind (named ``.<name>.<12 hex digits>.tmp``, owned by this user, unlocked and not modified for
  :data:`STALE_AFTER_S` seconds). A concurrent save's file is locked, and one just created (not locked yet) is
  younger than that. Without ``flock`` (Windows) only files older than :data:`STALE_AFTER_NO_LOCKS_S` go.

:func:`resolve_link` gives the file a symlink points to, so that a save through a link replaces the link's target
and keeps the link.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["open_temp_beside", "replace_keeping_mode", "lock_temp", "sweep_stale_temps", "resolve_link",
           "STALE_AFTER_S", "STALE_AFTER_NO_LOCKS_S"]

STALE_AFTER_S = 10.0  # an unlocked temporary file this old belongs to no live save
STALE_AFTER_NO_LOCKS_S = 24 * 3600.0  # where files cannot be locked, only the age tells

_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_CLOEXEC", 0))


def open_temp_beside(path: str | os.PathLike, prefix: str | None = None) -> tuple[int, str]:
    """A new, uniquely named file in ``path``'s directory, open for writing: ``(fd, temp_path)``.

    Its mode is what any new file gets (``0o666 & ~umask``). The caller writes it, moves it over ``path`` with
    :func:`replace_keeping_mode` and removes it on failure. ``prefix`` defaults to ``"." + basename + "."``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if prefix is None:
        prefix = "." + os.path.basename(path) + "."
    for _ in range(100):
        tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: expected a free temporary file name, found 100 taken (prefix {prefix!r})")


def replace_keeping_mode(tmp: str | os.PathLike, path: str | os.PathLike, new_mode: int | None = None) -> None:
    """``os.replace(tmp, path)``; when ``path`` exists, ``tmp`` first takes its permission bits (``rwx`` for user,
    group and others; setuid, setgid and sticky bits are not copied).

    ``new_mode``: the mode for a new ``path``, when ``tmp`` may no longer have the one it was created with (a
    writer such as safetensors' ``save_file`` that writes a temporary file of its own, mode ``0o600``, and renames
    it over ``tmp``); read it with ``os.fstat`` on the descriptor :func:`open_temp_beside` returned. The mode is
    applied here, after writing, so that a read-only destination (``0o444``) can still be replaced by a file written
    by name.
    """
    try:
        keep: int | None = stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except OSError:  # no destination yet (or a dangling link): the umask has decided
        keep = new_mode
    if keep is not None and stat.S_IMODE(os.stat(tmp).st_mode) != keep:
        os.chmod(tmp, keep)
    os.replace(tmp, path)


def resolve_link(path: str) -> str | None:
    """The file ``path`` names, following a symlink in its last component (and the links that one leads to);
    ``path`` itself when it is not a symlink; ``None`` for a loop."""
    if not os.path.islink(path):
        return path
    target = os.path.realpath(path)
    return None if os.path.islink(target) else target  # realpath stops at a loop and returns a link


def lock_temp(fd: int) -> None:
    """Take an exclusive lock on a temporary file being written (a no-op where ``flock`` is missing or refused)."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: the age rule of sweep_stale_temps still protects it
        pass


def _is_stale(path: str, now: float) -> bool:
    """True when ``path`` is a regular file of ours, unlocked and old enough (see the module's docstring)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            return False
        age = now - st.st_mtime
        if fcntl is None:
            return age > STALE_AFTER_NO_LOCKS_S
        if age <= STALE_AFTER_S:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when fd closes
        except OSError:
            return False  # a live save holds it (or the file system cannot tell: keep it)
        return True
    finally:
        os.close(fd)


def sweep_stale_temps(path: str | os.PathLike, prefix: str | None = None) -> list[str]:
    """Remove the temporary files that killed saves to ``path`` left beside it (names as :func:`open_temp_beside`
    makes them with the same ``prefix``); returns the paths removed. Best effort: errors are ignored."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if prefix is None:
        prefix = "." + os.path.basename(path) + "."
    pattern = re.compile(re.escape(prefix) + r"[0-9a-f]{12}\.tmp")
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and pattern.fullmatch(n)]
    except OSError:
        return removed
    now = time.time()
    for name in names:
        tmp = os.path.join(directory, name)
        if _is_stale(tmp, now):
            try:
                os.unlink(tmp)
                removed.append(tmp)
            except OSError:
                pass
    return removed
