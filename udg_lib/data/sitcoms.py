"""Sitcom transcripts from PyPI: Seinfeld (`seinfeld-laugh-corpus`) and The Big Bang Theory
(`pyannote.db.thebigbangtheory`), with the hand-written profile table in `resources/`.

A dialogue is a scene: a pause longer than `scene_gap_s` between two lines starts a new one.
Consecutive lines (Seinfeld) or words (TBBT forced alignment) of one speaker form one turn.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from udg_lib.data.schema import RECORD, Corpus, CorpusError, normalize_users, read_utf8_lines, validate_corpus
from udg_lib.paths import PACKAGE_DIR

PROFILE_TABLE = PACKAGE_DIR / "data" / "resources" / "sitcom_profiles.csv"
_NO_SPACE_BEFORE = re.compile(r"\s+([,.!?;:%)\]}]|\.\.\.|n't\b|'s\b|'re\b|'ll\b|'ve\b|'m\b|'d\b)")


@dataclass
class _Line:
    episode: str
    speaker: str
    text: str
    start: float
    end: float
    record: str


def sitcom_profiles(corpus: str) -> pd.DataFrame:
    """The profile rows of one sitcom (`seinfeld` or `tbbt`), with aliases as a list."""
    table = pd.read_csv(PROFILE_TABLE, dtype=str, keep_default_na=False)
    table = table[table["corpus"] == corpus].copy()
    table["aliases"] = table["aliases"].map(lambda s: [a for a in s.split("|") if a])
    return table.reset_index(drop=True)


def _speaker_id(name: str, episode: str, canonical: dict[str, str]) -> str:
    # Minor and generic roles (WOMAN, DOCTOR) are different people in different episodes.
    return canonical.get(name, f"{name}@{episode}")


def _lines_to_corpus(lines: list[_Line], corpus: str, source: str, scene_gap_s: float,
                     min_scene_turns: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    profiles = sitcom_profiles(corpus)
    canonical = {name: row.user_id for row in profiles.itertuples() for name in [row.user_id, *row.aliases]}
    rows: list[dict] = []
    scene: list[dict] = []
    scene_number = 0

    def close_scene() -> None:
        nonlocal scene_number
        if len(scene) >= min_scene_turns:
            for index, turn in enumerate(scene):
                rows.append({**turn, "turn_index": index})
        scene.clear()
        scene_number += 1

    previous: _Line | None = None
    for line in lines:
        new_scene = previous is None or line.episode != previous.episode or line.start - previous.end > scene_gap_s
        if new_scene and previous is not None:
            close_scene()
        speaker = _speaker_id(line.speaker, line.episode, canonical)
        if scene and scene[-1]["speaker_id"] == speaker:
            scene[-1]["text"] = f"{scene[-1]['text']} {line.text}"
        else:
            scene.append({"dialogue_id": f"{line.episode}/scene{scene_number:03d}", "speaker_id": speaker,
                          "text": line.text, "timestamp": f"{line.episode}@{line.start:.2f}s", RECORD: line.record})
        previous = line
    close_scene()
    turns = pd.DataFrame(rows)
    turns["text"] = turns["text"].map(lambda t: _NO_SPACE_BEFORE.sub(r"\1", re.sub(r"\s+", " ", t)).strip())

    speakers = sorted(set(turns["speaker_id"]))
    users = pd.DataFrame({"user_id": speakers}).merge(
        profiles.drop(columns=["corpus", "aliases", "evidence"]), on="user_id", how="left")
    users = normalize_users(users)
    return validate_corpus(turns, users, source)


def load_seinfeld(*, scene_gap_s: float = 6.0) -> Corpus:
    """Seinfeld seasons 4-9 (96 episodes) as scenes; lines whose text is empty are skipped."""
    import contextlib
    import io as _io

    from seinfeld_laugh_corpus import corpus as seinfeld_corpus

    with contextlib.redirect_stdout(_io.StringIO()):  # the package prints one line per skipped file
        screenplays = sorted(seinfeld_corpus.load(fold_laughs=True), key=lambda s: (s.season, s.episode))
    lines = []
    for screenplay in screenplays:
        episode = f"S{screenplay.season:02d}E{screenplay.episode:02d}"
        for number, line in enumerate(screenplay.lines, start=1):
            if not getattr(line, "txt", "").strip():
                continue
            lines.append(_Line(episode, line.character.strip(), line.txt.strip(), float(line.start), float(line.end),
                               f"{screenplay.filename} line {number}"))
    turns, users = _lines_to_corpus(lines, "seinfeld", "seinfeld-laugh-corpus", scene_gap_s)
    return Corpus(name="seinfeld", turns=turns, users=users, language="en", domain="sitcom (everyday life)",
                  style="scripted speech", user_kind="Character", source="seinfeld-laugh-corpus 1.0.13",
                  extra={"scene_gap_s": scene_gap_s})


def tbbt_alignment_dir() -> Path:
    spec = importlib.util.find_spec("TheBigBangTheory")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("TheBigBangTheory", "package", "pyannote.db.thebigbangtheory is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "forced_alignment"


def read_tbbt_alignment(path: str | Path) -> list[_Line]:
    """One forced-alignment file: `start duration speaker word confidence` per line."""
    path = Path(path)
    match = re.search(r"Season(\d+)\.Episode(\d+)", path.name)
    if not match:
        raise CorpusError(path, "file name", "expected TheBigBangTheory.SeasonNN.EpisodeNN.out")
    episode = f"S{int(match[1]):02d}E{int(match[2]):02d}"
    words = []
    for number, raw in enumerate(read_utf8_lines(path), start=1):
        if not raw.strip():
            continue
        fields = raw.split()
        if len(fields) != 5:
            raise CorpusError(path, f"line {number}", f"expected 5 fields (start duration speaker word confidence), got {len(fields)}")
        try:
            start, duration = float(fields[0]), float(fields[1])
        except ValueError:
            raise CorpusError(path, f"line {number}", "start and duration must be numbers") from None
        words.append(_Line(episode, fields[2], fields[3], start, start + duration, f"{path.name} line {number}"))
    return words


def load_tbbt(*, scene_gap_s: float = 6.0, alignment_dir: str | Path | None = None) -> Corpus:
    """The Big Bang Theory seasons 1-2 from word-level forced alignment, as scenes."""
    directory = Path(alignment_dir) if alignment_dir else tbbt_alignment_dir()
    files = sorted(directory.glob("*.out"))
    if not files:
        raise CorpusError(directory, "folder", "no *.out forced-alignment files")
    words = [word for path in files for word in read_tbbt_alignment(path)]
    turns, users = _lines_to_corpus(words, "tbbt", str(directory), scene_gap_s)
    return Corpus(name="tbbt", turns=turns, users=users, language="en", domain="sitcom (everyday life)",
                  style="scripted speech", user_kind="Character", source="pyannote.db.thebigbangtheory 0.1.1",
                  extra={"scene_gap_s": scene_gap_s})
