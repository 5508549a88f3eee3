"""Strict reads and crash-safe writes, shared by every part of SWARR.

* read_text / read_json: regular files only (a FIFO named config.json would block forever), UTF-8, one
  SwarrError naming the file for anything wrong.
* write_text_atomic / write_folder: a reader finds the old file or folder or the new one, never a half-written one.
* check_out_folder / check_out_file: refuse, before the work starts, an output that could not be written at its end.
* A write the system refuses (a full disk, a file-size limit, a read-only file system) is one WriteError naming
  the file; nothing half-written stays: the temporaries of write_text_atomic / write_folder go on any exception
  (Ctrl-C included), and append_text cuts a file back to where its append began.
* run_cli: a command line's bad input (a SwarrError) as one `error:` line and exit status 2; Ctrl-C as one
  `error: interrupted` line and exit status 130. Neither prints a traceback.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import signal
import sys
import tempfile
import threading


class SwarrError(Exception):
    """A user-facing error: the command line prints its message as one line and exits with status 2."""


class WriteError(SwarrError):
    """The system refused a write (a full disk, a file-size limit, no permission, ...): the message names the file."""


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it


def run_cli(fn, *args):
    """fn(*args) for a command line: bad input (a SwarrError) becomes one `error: ...` line and exit status 2.
    Ctrl-C (KeyboardInterrupt) becomes one `error: interrupted` line, followed by the interrupt's own words if it
    carries any (a training run's name its last good checkpoint), and exit status 130. A write the system refuses
    anywhere else (a full disk, a file-size limit) is one line and exit status 2 too: SIGXFSZ is ignored, so a
    file-size limit (ulimit -f) makes the write fail with EFBIG instead of killing the process mid-save."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return fn(*args)
    except SwarrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"error: interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except Exception as e:
        if interrupted(e):
            print("error: interrupted", file=sys.stderr)
            sys.exit(INTERRUPTED)
        if not isinstance(e, OSError) or e.errno not in _REFUSED_WRITES:
            raise
        print(f"error: {e.filename or 'a write'}: {e.strerror}", file=sys.stderr)
        sys.exit(2)


_REFUSED_WRITES = {getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT", "EROFS") if hasattr(errno, n)}


def short(v, n: int = 80) -> str:
    """repr(v), cut to fit one error line (a hostile value can be an array of a million entries)."""
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


def chain(e: BaseException | None):
    """`e`, then the exception it was raised from or while handling, and so on (each once)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def interrupted(e: BaseException) -> bool:
    """True if `e` is, or was raised while handling, a Ctrl-C: a library that was writing when it came (torch.save's
    zip writer) can replace the KeyboardInterrupt with an error of its own as it closes the file."""
    return any(isinstance(x, KeyboardInterrupt) for x in chain(e))


def io_failure(e: BaseException) -> str | None:
    """The system's words, if `e` is (or was raised while handling) a refused read or write: an OSError, or the I/O
    error of a library that writes on its own (torch.save's zip writer, safetensors). None for anything else."""
    for x in chain(e):
        if isinstance(x, WriteError):
            return str(x)
        if isinstance(x, OSError):
            return x.strerror or str(x)
        m = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(x).strip())  # safetensors' Rust errors
        if m:
            return m[1]
    return None


def read_text(path: str) -> str:
    """The UTF-8 text of the regular file `path`, or one SwarrError naming the file. The file is opened
    non-blocking and checked to be a regular file before reading: a FIFO would otherwise block forever."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SwarrError(f"{path}: not found") from None
    except OSError as e:  # a symlink loop, no permission, ...
        raise SwarrError(f"{path}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, FIFO or device
        os.close(fd)
        raise SwarrError(f"{path}: not a regular file")
    with open(fd, "rb") as f:
        try:
            return f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise SwarrError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise SwarrError(f"{path}: cannot read ({e.strerror})") from None


def read_json(path: str, text: str | None = None) -> dict:
    """The JSON object in the file `path` (or in its `text`, already read), or one SwarrError naming the file."""
    try:
        data = json.loads(read_text(path) if text is None else text)
    except json.JSONDecodeError as e:
        raise SwarrError(f"{path}: malformed JSON ({e})") from None
    except RecursionError:
        raise SwarrError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise SwarrError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_out_folder(out: str, flag: str = "--out"):
    """Refuse now, before the work, an output folder that could not be written at the end: a path that is a
    file, or a place where nothing can be created (no permission, read-only file system). Writes nothing."""
    probe_in = out
    while not os.path.lexists(probe_in):  # the nearest existing ancestor is where the folder will be made
        probe_in = os.path.dirname(os.path.abspath(probe_in))
    if not os.path.isdir(probe_in):
        raise SwarrError(f"{flag} {out}: {probe_in} exists and is not a folder")
    try:  # os.access says yes to root even on a read-only file system: really create something
        probe = tempfile.mkdtemp(prefix=".swarr-probe-", dir=probe_in)
    except OSError as e:
        raise SwarrError(f"{flag} {out}: cannot write in {probe_in} ({e.strerror})") from None
    os.rmdir(probe)


def check_out_file(out: str, flag: str = "--out"):
    """Refuse now, before the work, an output file that could not be written at the end: a folder, or a file in
    a folder where nothing can be created. Writes nothing."""
    if os.path.isdir(out):
        raise SwarrError(f"{flag} {out}: is a folder, not a file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise SwarrError(f"{flag} {out}: {parent} is not a folder")
    check_out_folder(parent, flag)


def write_text_atomic(path: str, text: str):
    """Write a file through a temporary sibling and os.replace: an interrupted write leaves the old file whole."""
    write_texts_atomic({path: text})


def write_texts_atomic(files: dict[str, str]):
    """Write files {path: text} that belong together (a summary and its samples): every one is written completely
    to a temporary sibling first, and only then are they switched in, one os.replace each. A write the system
    refuses (full disk, file-size limit) is one WriteError naming the file, and an interruption (Ctrl-C) removes
    the temporaries: each file is the old one or the new one, and none is switched in unless all were written."""
    tmps = {path: f"{path}.tmp-{os.getpid()}" for path in files}
    try:
        try:
            for path, text in files.items():
                with open(tmps[path], "w", encoding="utf-8") as f:
                    f.write(text)
        except OSError as e:
            raise WriteError(f"{path}: cannot write ({e.strerror or e}); the file is left as it was") from None
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            if os.path.lexists(tmp):
                os.remove(tmp)
        raise


def append_text(path: str, text: str):
    """Append `text` to the file `path` whole or not at all: a write the system refuses (one WriteError naming the
    file) or an interruption cuts the file back to where the append began, so no half line is left."""
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException as e:
            os.ftruncate(fd, size)
            if isinstance(e, OSError):
                raise WriteError(f"{path}: cannot write ({e.strerror}); the file is left as it was") from None
            raise
    finally:
        os.close(fd)


# ---- the atomic folder switch (checkpoints) ----------------------------------------------------------
# write_folder never changes a folder in place. It writes the complete new folder into a hidden folder
# `.NAME.vN` beside `path` and fsyncs it; then `path`, a symlink, is switched to it by one os.replace.
# Whoever opens `path` (swarr.load, transformers, vLLM) finds the old checkpoint or the new one, at every
# instant. Leftovers of an interrupted save (`.NAME.tmp-PID-*`: half-written; `.NAME.vN` not linked: old or
# never switched to; `.NAME.link-PID-*`) are cleaned by recover(), which write_folder calls first.
def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process / not a pid at all
        return pid < 2 ** 31
    return True


def fsync(path: str):
    """Flush a file's or a folder's entry list to disk (after a rename, the folder holds the new name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def leftovers(path: str) -> dict[str, tuple[str, int]]:
    """Sibling entries save() makes for `path`: file name -> (kind 'v' | 'tmp' | 'link', version or pid)."""
    parent, name = os.path.split(path)
    try:
        entries = os.listdir(parent)
    except OSError:
        return {}
    pat = re.compile(rf"\.{re.escape(name)}\.(?:v(\d+)|(tmp|link)-(\d+)-[0-9a-f]+)")
    found = {}
    for f in entries:
        m = pat.fullmatch(f)
        if m:
            found[f] = ("v", int(m[1])) if m[1] is not None else (m[2], int(m[3]))
    return found


def link(path: str, target: str):
    """Point the symlink `path` at the sibling folder `target`, atomically (also over an existing symlink)."""
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.link-{os.getpid()}-{os.urandom(4).hex()}")
    os.symlink(os.path.basename(target), tmp)  # relative: the run folder can be moved as a whole
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    fsync(parent)


def recover(path: str, clean: bool = True):
    """Finish or clean up what an interrupted save() left beside `path`: if `path` is missing (interrupted while
    a plain folder was being replaced by the symlink), link it to the newest complete version; then (`clean`)
    delete half-written folders of dead processes and versions `path` no longer points to. Never touches
    `path`'s own checkpoint. Readers pass clean=False: a writer's new version, complete but not yet linked,
    must not vanish under it (one writer per path: the training scripts lock their --out)."""
    path = os.path.abspath(path.rstrip("/") or "/")
    found = leftovers(path)
    versions = {n: f for f, (kind, n) in found.items() if kind == "v"}
    if versions and not os.path.isdir(path) and (os.path.islink(path) or not os.path.lexists(path)):
        link(path, os.path.join(os.path.dirname(path), versions[max(versions)]))
    if not clean or not os.path.isdir(path):  # no checkpoint here (or not ours): delete nothing
        return
    current = os.path.realpath(path)
    for f, (kind, n) in found.items():
        full = os.path.join(os.path.dirname(path), f)
        if kind == "v" and os.path.realpath(full) != current or \
                kind != "v" and (n == os.getpid() or not pid_alive(n)):
            shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)


def is_empty_folder(path: str) -> bool:
    """Whether `path` is a folder that holds nothing (an empty folder has nothing to lose)."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def write_folder(path: str, write, marker: str = "config.json"):
    """Replace the folder `path` by what `write(tmp_folder)` puts into a fresh folder, atomically at every instant.

    The new folder is written completely and fsynced as `.NAME.vN` beside `path`; then `path`, a symlink, is
    switched to it by one os.replace (link). A plain folder at `path` that holds `marker` (a checkpoint another
    tool wrote) or nothing at all (as transformers' save_pretrained, which writes into an empty folder) becomes
    version 0 first; any other existing file or folder is refused, never replaced."""
    if not path or not os.path.basename(os.path.abspath(path)):
        raise SwarrError(f"save: {path!r} is not a folder name")
    path = os.path.abspath(path.rstrip("/"))
    parent, name = os.path.split(path)
    plain = os.path.isdir(path) and not os.path.islink(path)
    if os.path.lexists(path) and not os.path.isdir(path) or \
            plain and not os.path.isfile(os.path.join(path, marker)) and not is_empty_folder(path):
        raise SwarrError(f"{path}: exists and is not a checkpoint folder (no {marker}); not replacing it")
    os.makedirs(parent, exist_ok=True)
    recover(path)
    version = os.path.join(parent, f".{name}.v{max([n for k, n in leftovers(path).values() if k == 'v'] + [0]) + 1}")
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.mkdir(tmp)  # (not mkdtemp: its folders stay private, 0700; this one gets the umask's usual mode)
        try:
            write(tmp)
            for fname in os.listdir(tmp):
                fsync(os.path.join(tmp, fname))
            fsync(tmp)
            os.rename(tmp, version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _switch(path, version, plain)
    except Exception as e:  # (Ctrl-C passes through as it is, after the same clean-up)
        why = io_failure(e)
        if why is None or isinstance(e, WriteError):
            raise
        raise WriteError(f"{path}: cannot write ({why}); the previous checkpoint there is left as it was") from None
    recover(path)  # the previous version goes


def _switch(path: str, version: str, plain: bool):
    """Point `path` at the complete folder `version` (write_folder's last step). Interrupted by an exception, it
    undoes itself: a plain folder moved aside comes back, and `version`, if `path` does not point to it, goes.
    (Cut by a kill, recover() finishes it: it links the newest version when `path` is missing.)"""
    parent, name = os.path.split(path)
    moved = False
    try:
        fsync(parent)
        if plain:  # `path` is missing until link() below
            os.rename(path, os.path.join(parent, f".{name}.v0"))
            moved = True
        link(path, version)
    except BaseException:
        if moved and not os.path.lexists(path):
            os.rename(os.path.join(parent, f".{name}.v0"), path)
        if os.path.realpath(path) != os.path.realpath(version):
            shutil.rmtree(version, ignore_errors=True)
        raise
