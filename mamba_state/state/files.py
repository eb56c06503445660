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
"""

from __future__ import annotations

import os
import secrets
import stat

__all__ = ["open_temp_beside", "replace_keeping_mode"]

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
