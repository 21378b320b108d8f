"""Writing results without losing or corrupting anything (README, "Outputs and custody").

Every file manifpt writes goes through :func:`atomic_outputs`:

- Before any work, :func:`check_outputs` refuses an output that is an input (or lies inside an
  input folder), an existing file unless ``overwrite`` is set, an existing folder, or a folder
  path whose parent does not exist (only the last folder is ever created).
- While it is written, the output is locked (``flock`` on ``.NAME.lock`` beside it): a second run
  writing the same output is refused, whatever its PID or container. Data goes to a partial file
  with a unique name (``.NAME.partial-<uuid>``); partial files of dead runs are removed.
- Files written together (a report and its provenance, a model and its backbone) are committed
  all or nothing: old versions are kept as hard-linked backups until every new file is in place,
  and an interruption between two renames is rolled back (at once, or by the next run that takes
  the lock, from the journal ``.NAME.commit``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ManifptError, UsageError

PathLike = str | os.PathLike


class OutputRefusedError(UsageError):
    """An output path would overwrite an input or an existing result, or cannot be created."""


class OutputBusyError(UsageError):
    """Another run is writing the same output right now."""


class NoSpaceError(ManifptError):
    """The disk (or quota) ran out while writing; nothing was left under the final name."""


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing (or a dangling link): not the same existing file
        return False


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_outputs(
    outputs: Sequence[PathLike], *, inputs: Sequence[PathLike] = (), overwrite: bool = False, folders: bool = False
) -> None:
    """Refuse, before any work, outputs that would lose or change something.

    Args:
        outputs: the files (or, with ``folders``, the folders) the run will write.
        inputs: files and folders the run reads; no output may be one of them or lie inside one.
        overwrite: allow replacing existing output files (never inputs).
        folders: the outputs are folders that receive several files (evaluation results).

    Raises:
        OutputRefusedError: with the reason and what to do instead.
    """
    resolved_inputs = [(os.fspath(p), os.path.realpath(p)) for p in inputs if os.path.lexists(p)]
    for output in outputs:
        text = os.fspath(output)
        real = os.path.realpath(output)
        for given, real_input in resolved_inputs:
            if real == real_input or _same_file(output, given):
                raise OutputRefusedError(f"refusing to write {text}: it is the input {given}; choose another output")
            if os.path.isdir(real_input) and _inside(real, real_input):
                raise OutputRefusedError(
                    f"refusing to write {text}: it is inside the input folder {given}, which must stay as it was; "
                    "write results elsewhere"
                )
        if os.path.isdir(output) and not folders:
            raise OutputRefusedError(f"refusing to write {text}: it is an existing folder; name a file to write")
        if os.path.lexists(output) and not os.path.isdir(output) and folders:
            raise OutputRefusedError(f"refusing to write into {text}: it is a file, not a folder")
        if os.path.lexists(output) and not overwrite and not folders:
            raise OutputRefusedError(f"{text} already exists; pass --overwrite (overwrite=True) to replace it")
        _check_folder(text, os.path.dirname(os.path.abspath(output)))


def _check_folder(text: str, parent: str) -> None:
    """Refuse an output whose folder cannot be had: more than its last folder missing, a file
    where a folder should be, or a folder this process cannot write in (checked now, not after
    the work: as root, only a read-only mount refuses)."""
    existing = parent if os.path.lexists(parent) else os.path.dirname(parent)
    if not os.path.lexists(existing):
        raise OutputRefusedError(
            f"cannot write {text}: the folder {existing} does not exist "
            "(manifpt creates at most the last folder of an output path; check for a typo)"
        )
    if not os.path.isdir(existing):
        raise OutputRefusedError(f"cannot write {text}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputRefusedError(f"cannot write {text}: no permission to write in the folder {existing}")


def results_folder(
    folder: PathLike, names: Sequence[str], *, inputs: Sequence[PathLike] = (), overwrite: bool = False
) -> Path:
    """A folder for several result files, checked up front: created if missing (its last component
    only), and refused if any of ``names`` is already in it, unless ``overwrite``."""
    check_outputs([folder], inputs=inputs, folders=True)
    out = make_folder(folder)
    check_outputs([out / name for name in names], inputs=inputs, overwrite=overwrite)
    return out


def make_folder(path: PathLike) -> Path:
    """Create an output folder, but only its last component (a typo never becomes a folder tree)."""
    folder = Path(path)
    if not folder.parent.is_dir():
        raise OutputRefusedError(f"cannot create {folder}: the folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    return folder


class OutputWriteError(ManifptError):
    """The operating system failed to write or rename an output (an I/O error, a read-only disk)."""


WRITE_ERRNOS = (errno.EIO, errno.EROFS, errno.EFBIG)


@contextlib.contextmanager
def _write_errors_are_clear(path: Path) -> Iterator[None]:
    """A full disk, an I/O error or a read-only disk becomes one clear error; nothing is kept."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(
                f"no space left on the device holding {path.parent}: {path.name} was not written"
            ) from None
        if exc.errno in WRITE_ERRNOS:
            raise OutputWriteError(
                f"{exc.strerror}: {path} was not written (the previous file, if any, is unchanged)"
            ) from None
        raise


class _Lock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside an output."""

    def __init__(self, final: Path) -> None:
        self.path = final.with_name(f".{final.name}.lock")
        self.final = final
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise OutputRefusedError(f"cannot write in {self.path.parent}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(
                    f"another manifpt run is writing {self.final} right now; wait for it, or write elsewhere"
                ) from None
            except OSError as exc:  # no locking on this filesystem (some NFS set-ups)
                os.close(fd)
                raise OutputRefusedError(f"cannot lock {self.path} ({exc.strerror}); write elsewhere") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its last holder removed while we waited to lock it
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _journal_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.commit")


def _check_entries(journal: Path, entries: object) -> list[dict]:
    """The journal's entries, if they are what manifpt writes: names of files beside the journal."""
    if not isinstance(entries, list) or not entries:
        raise ValueError("not a list of entries")
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"final", "backup", "partial"}:
            raise ValueError("an entry is not final/backup/partial")
        final = entry["final"]
        if not isinstance(final, str) or not final or "/" in final or final.startswith("."):
            raise ValueError(f"unexpected final name {final!r}")
        for kind in ("backup", "partial"):
            name = entry[kind]
            if name is None and kind == "backup":
                continue
            if not isinstance(name, str) or not re.fullmatch(rf"\.{re.escape(final)}\.{kind}-[0-9a-f]{{32}}", name):
                raise ValueError(f"unexpected {kind} name {name!r}")
    return entries


def _roll_back(folder: Path, entries: list[dict]) -> None:
    """Put every final name back as it was before the commit, then drop backups and partials.

    A partial that no longer exists was renamed onto its final name: that final is restored from
    its backup (or removed if there was none). A final that is missing while its backup exists
    was moved aside: it is restored too.
    """
    for entry in entries:
        final = folder / entry["final"]
        backup = folder / entry["backup"] if entry["backup"] else None
        renamed = not os.path.lexists(folder / entry["partial"])
        if renamed or (backup and not os.path.lexists(final)):
            if backup and os.path.lexists(backup):
                os.replace(backup, final)
            elif renamed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
    _drop_leftovers(folder, entries)


def _drop_leftovers(folder: Path, entries: list[dict]) -> None:
    for entry in entries:
        for name in (entry["backup"], entry["partial"]):
            if name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / name)


def _recover(final: Path) -> None:
    """Undo a group commit that a dead run left half done (or finish its clean-up), and drop the
    partial files of dead runs. The caller holds the output's lock."""
    journal = _journal_path(final)
    if journal.exists():
        try:
            entries = _check_entries(journal, json.loads(journal.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise OutputWriteError(
                f"the commit journal {journal} of an interrupted run is damaged ({exc}); check {final} and the "
                "files beside it named like it, then remove the journal"
            ) from None
        if all(not os.path.lexists(final.parent / entry["partial"]) for entry in entries):
            _drop_leftovers(final.parent, entries)  # every file was committed: only backups remain
        else:
            _roll_back(final.parent, entries)
        journal.unlink()
    # Backups outlive their journal only when a finished commit died while deleting them.
    for pattern in (".{}.partial-*", ".{}.backup-*"):
        for stale in final.parent.glob(pattern.format(glob_escape(final.name))):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _write_journal(journal: Path, entries: list[dict]) -> None:
    temporary = journal.with_name(f"{journal.name}-{uuid.uuid4().hex}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(entries, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, journal)


def _set_aside(final: Path, backup: Path) -> None:
    """Keep the old ``final`` as ``backup``: a hard link, or a move where links are not supported."""
    try:
        os.link(final, backup, follow_symlinks=False)
    except OSError:  # exFAT/vfat evidence drives, some network filesystems
        os.replace(final, backup)


def _commit(pairs: list[tuple[Path, Path]], overwrite: bool) -> None:
    """Rename every partial onto its final name, all or nothing.

    For a group, the journal is written first, then the old files are set aside as backups, then
    the partials are renamed; any failure, Ctrl-C included, is rolled back from what is on disk,
    and a dead run's half commit is rolled back by the next run (:func:`_recover`).
    """
    for _, final in pairs:
        if final.exists() and not overwrite:
            raise OutputRefusedError(f"{final} appeared while this run wrote it; nothing was replaced")
    if len(pairs) == 1:
        os.replace(*pairs[0])
        return
    folder = pairs[0][1].parent
    if any(final.parent != folder for _, final in pairs):
        raise ValueError("files committed together must be in one folder")
    entries = [
        {
            "final": final.name,
            "backup": f".{final.name}.backup-{uuid.uuid4().hex}" if os.path.lexists(final) else None,
            "partial": partial.name,
        }
        for partial, final in pairs
    ]
    journal = _journal_path(pairs[0][1])
    _write_journal(journal, entries)
    try:
        for entry in entries:
            if entry["backup"]:
                _set_aside(folder / entry["final"], folder / entry["backup"])
        for entry in entries:
            os.replace(folder / entry["partial"], folder / entry["final"])
    except BaseException:
        _roll_back(folder, entries)  # if this fails too, the journal stays for the next run
        journal.unlink()
        raise
    _drop_leftovers(folder, entries)
    journal.unlink()


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[PathLike], *, overwrite: bool = False) -> Iterator[list[Path]]:
    """Yield partial paths for ``paths``; they become the final files together, only if the block succeeds.

    An interrupted or failed run (Ctrl-C, a full disk, an I/O error) leaves every final name as it
    was. The outputs are locked against concurrent runs while they are written.
    """
    finals = [Path(os.path.abspath(p)) for p in paths]
    for final in finals:
        if not final.parent.is_dir():
            make_folder(final.parent)
    locks = [_Lock(final) for final in sorted(finals)]
    try:
        for lock in locks:
            lock.acquire()
        for final in finals:
            _recover(final)
            if final.exists() and not overwrite:
                raise OutputRefusedError(f"{final} already exists; pass --overwrite (overwrite=True) to replace it")
        partials = [final.with_name(f".{final.name}.partial-{uuid.uuid4().hex}") for final in finals]
        try:
            with _write_errors_are_clear(finals[0]):
                yield partials
                try:
                    _commit(list(zip(partials, finals)), overwrite)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT, *WRITE_ERRNOS):
                        raise
                    raise OutputWriteError(
                        f"cannot put {finals[0]} in place ({exc.strerror}); the previous files, if any, are unchanged"
                    ) from None
        finally:
            if not _journal_path(finals[0]).exists():  # else a failed roll-back left them for recovery
                for partial in partials:
                    with contextlib.suppress(FileNotFoundError):
                        partial.unlink()
    finally:
        for lock in locks:
            lock.release()


@contextlib.contextmanager
def atomic_output(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """:func:`atomic_outputs` for one file."""
    with atomic_outputs([path], overwrite=overwrite) as (partial,):
        yield partial
