"""Strict reads and crash-safe writes, shared by every part of SWARR.

* read_text / read_json: regular files only (a FIFO named config.json would block forever), UTF-8, one
  SwarrError naming the file for anything wrong.
* write_text_atomic / write_folder: a reader finds the old file or folder or the new one, never a half-written one.
* check_out_folder: refuse, before the work starts, an output that could not be written at its end.
* run_cli: a command line's bad input (a SwarrError) as one `error:` line and exit status 2.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tempfile


class SwarrError(Exception):
    """A user-facing error: the command line prints its message as one line and exits with status 2."""


def run_cli(fn, *args):
    """fn(*args) for a command line: bad input (a SwarrError) becomes one `error: ...` line and exit status 2."""
    try:
        return fn(*args)
    except SwarrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
        os.rmdir(tempfile.mkdtemp(prefix=".swarr-probe-", dir=probe_in))
    except OSError as e:
        raise SwarrError(f"{flag} {out}: cannot write in {probe_in} ({e.strerror})") from None


def write_text_atomic(path: str, text: str):
    """Write a file through a temporary sibling and os.replace: an interrupted write leaves the old file whole."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


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
    os.mkdir(tmp)  # (not mkdtemp: its folders stay private, 0700; this one gets the umask's usual mode)
    try:
        write(tmp)
        for fname in os.listdir(tmp):
            fsync(os.path.join(tmp, fname))
        fsync(tmp)
        os.rename(tmp, version)  # complete from here on: error handling never deletes it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(parent)
    if plain:  # `path` is missing until link() below (if cut there, recover() links the newest version)
        os.rename(path, os.path.join(parent, f".{name}.v0"))
    link(path, version)
    recover(path)  # the previous version goes
