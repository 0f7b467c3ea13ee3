"""Named offline corpora: texts any machine can build without a network, for calibration and evaluation.

    python -m compress.corpora list                 # names, parts, sizes, sha256 (and whether they match)
    python -m compress.corpora export DIR           # write DIR/<name>-<part>.txt + DIR/MANIFEST.json
    LOWRANK_CORPORA=DIR python -m compress eval --data offline:code ...   # read the exported files

A corpus is named ``offline:NAME`` wherever a data spec is accepted (``--data``, `compress.data.load_text`);
``offline:NAME:calib`` or ``offline:NAME:eval`` picks a part explicitly, otherwise the caller's role does
(calibration reads the calibration part, evaluation the evaluation part). Each corpus is built from a fixed
list of files (or, for `docs`, of documentation topics), split by file into two disjoint parts:

- ``docs``: the English prose of CPython's documentation (`pydoc_data.topics`), topics in sorted order,
  the first 80% for calibration and the rest for evaluation (the toolkit's former single-text default);
- ``code``: Python source of the standard library, two disjoint fixed lists of modules;
- ``legal``: legal English, the licence texts Debian ships in ``/usr/share/common-licenses`` (package
  base-files) plus CPython's own ``LICENSE.txt``, two disjoint fixed lists of licences.

The sources differ between Python versions (and `legal` needs a Debian-like system), so the texts built on
another machine need not be the ones our measurements used. `REFERENCE` records the sha256 and character
count of every part as built on the reference machine (Python 3.11.7, Debian 12); a build that differs
prints a note once. To measure comparably elsewhere, export the parts on the reference machine, carry the
folder, and point ``LOWRANK_CORPORA`` at it: files found there are read instead of being built (strict
UTF-8), and their hashes are checked the same way. Files are joined with a blank line, each preceded by a
one-line header naming it (``# file: argparse.py`` / ``== GPL-3 ==``), so a text is reproducible from its
list alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError

__all__ = ["CORPORA", "PARTS", "REFERENCE", "Corpus", "corpus_text", "describe", "export", "is_corpus_spec",
           "parse_corpus_spec"]

PREFIX = "offline:"
PARTS = ("calib", "eval")
ENV_DIR = "LOWRANK_CORPORA"

# Standard-library modules (plain .py files in CPython 3.8 … 3.13), split into two disjoint lists.
CODE_FILES = {
    "calib": ("argparse.py", "configparser.py", "dataclasses.py", "difflib.py", "enum.py", "functools.py",
              "inspect.py", "ipaddress.py", "logging/__init__.py", "mailbox.py", "optparse.py", "pickle.py",
              "shutil.py", "subprocess.py", "tarfile.py", "typing.py", "http/client.py", "urllib/parse.py",
              "email/message.py", "collections/__init__.py", "asyncio/base_events.py", "xml/dom/minidom.py",
              "locale.py", "contextlib.py"),
    "eval": ("calendar.py", "csv.py", "fractions.py", "gzip.py", "heapq.py", "imaplib.py", "json/decoder.py",
             "json/encoder.py", "pprint.py", "random.py", "selectors.py", "shlex.py", "smtplib.py",
             "statistics.py", "textwrap.py", "threading.py", "traceback.py", "uuid.py", "wave.py", "weakref.py",
             "http/server.py", "tempfile.py", "posixpath.py"),
}
LICENSE_DIR = Path("/usr/share/common-licenses")
# Licence texts (no symlinks), split into two disjoint lists; "PYTHON" is CPython's LICENSE.txt.
LEGAL_FILES = {
    "calib": ("Apache-2.0", "GPL-2", "LGPL-2.1", "MPL-1.1", "GFDL-1.2", "Artistic", "BSD", "GPL-1", "PYTHON"),
    "eval": ("GPL-3", "LGPL-3", "MPL-2.0", "GFDL-1.3", "CC0-1.0", "LGPL-2"),
}
DOCS_CALIB_FRACTION = 0.8

# sha256 and character count of every part as built on the reference machine (Python 3.11.7, Debian 12).
REFERENCE: dict[str, dict[str, tuple[str, int]]] = {
    "docs": {"calib": ("ee9f0799986df71479a3e41af9bd5ea318ae6354437c946827a46ebd520dd312", 330518),
             "eval": ("ba8e2cc2824a766413f10c3f2402c2e1f4c778588f09cf65c05eac56e6bc0a18", 134527)},
    "code": {"calib": ("fe8663c6c4d86dd73e71e422e773d941b73de997618d559c64bf624e3bf8b26f", 1719506),
             "eval": ("ac6afd76781d96f3fdfc3417494e1661250ef84cb0c9aa13de531b240ca59a4b", 667911)},
    "legal": {"calib": ("7bb65b72f472b857f7a5a4682f9d4866e4fa3c1cca3cdc62274495523c9b7d88", 136332),
              "eval": ("659aea8d97b0febc1a09ebb5a34d7a6fd0ac42c8d58f6db254c0284a3e15af52", 114922)},
}


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    build: Callable[[str], str]  # part -> text
    sources: Callable[[str], list[str]]  # part -> the files / topics it is built from


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"corpus source missing: {path} (build the corpora on a machine that has it and point "
                        f"{ENV_DIR} at the exported folder: python -m compress.corpora export DIR)") from None


def _docs_sources(part: str) -> list[str]:
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    cut = int(len(keys) * DOCS_CALIB_FRACTION)
    return keys[:cut] if part == "calib" else keys[cut:]


def _docs(part: str) -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k].strip() for k in _docs_sources(part))


def _code(part: str) -> str:
    root = _stdlib()
    return "\n\n".join(f"# file: {name}\n{_read(root / name).rstrip()}" for name in CODE_FILES[part])


def _legal_path(name: str) -> Path:
    return _stdlib() / "LICENSE.txt" if name == "PYTHON" else LICENSE_DIR / name


def _legal(part: str) -> str:
    return "\n\n".join(f"== {name} ==\n{_read(_legal_path(name)).strip()}" for name in LEGAL_FILES[part])


CORPORA: dict[str, Corpus] = {
    "docs": Corpus("docs", "CPython documentation prose (pydoc_data.topics), 80/20 by sorted topic",
                   _docs, _docs_sources),
    "code": Corpus("code", "Python standard-library source, two disjoint lists of modules", _code,
                   lambda part: list(CODE_FILES[part])),
    "legal": Corpus("legal", "licence texts (/usr/share/common-licenses + CPython LICENSE.txt), disjoint lists",
                    _legal, lambda part: list(LEGAL_FILES[part])),
}


def is_corpus_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_corpus_spec(spec: str, role: str = "calib") -> tuple[str, str]:
    """``offline:NAME[:PART]`` -> (NAME, PART); without a part, `role` ("calib" or "eval") decides."""
    fields = spec[len(PREFIX):].split(":")
    name = fields[0]
    if name not in CORPORA:
        raise UserError(f"unknown offline corpus {name!r} in {spec!r}; available: "
                        f"{', '.join(PREFIX + n for n in CORPORA)}")
    if len(fields) > 2 or (len(fields) == 2 and fields[1] not in PARTS):
        raise UserError(f"offline corpus spec must be offline:NAME[:calib|:eval], got {spec!r}")
    return name, fields[1] if len(fields) == 2 else role


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_NOTED: set[tuple[str, str]] = set()
_CACHE: dict[tuple[str, str, str], str] = {}


def _exported(name: str, part: str) -> Path | None:
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return None
    path = Path(folder).expanduser() / f"{name}-{part}.txt"
    if not path.is_file():
        raise UserError(f"{ENV_DIR}={folder} has no {path.name} (write it with python -m compress.corpora export)")
    return path


def corpus_text(spec: str, role: str = "calib") -> str:
    """The text of ``offline:NAME[:PART]``: read from $LOWRANK_CORPORA when set, else built from its sources."""
    name, part = parse_corpus_spec(spec, role)
    path = _exported(name, part)
    key = (name, part, str(path))
    if key not in _CACHE:
        if path is not None:
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        else:
            text = CORPORA[name].build(part)
        _CACHE[key] = text
        _note_mismatch(name, part, text, path)
    return _CACHE[key]


def _note_mismatch(name: str, part: str, text: str, path: Path | None) -> None:
    ref = REFERENCE.get(name, {}).get(part)
    if ref is None or (name, part) in _NOTED:
        return
    if sha256(text) != ref[0]:
        _NOTED.add((name, part))
        where = f"read from {path}" if path is not None else f"built here (Python {sys.version.split()[0]})"
        print(f"note: offline:{name}:{part} {where} differs from the reference build (sha256 {ref[0][:12]}…, "
              f"{ref[1]} characters): perplexities are not comparable with published ones; see "
              "python -m compress.corpora", file=sys.stderr)


def describe(name: str, part: str) -> dict[str, object]:
    """{spec, sha256, chars, matches_reference, source} of one part, as `corpus_text` would read it."""
    text = corpus_text(f"{PREFIX}{name}:{part}")
    ref = REFERENCE.get(name, {}).get(part)
    path = _exported(name, part)
    return {"spec": f"{PREFIX}{name}:{part}", "sha256": sha256(text), "chars": len(text),
            "matches_reference": None if ref is None else sha256(text) == ref[0],
            "source": str(path) if path is not None else "built"}


def export(directory: str | os.PathLike) -> Path:
    """Build every part and write DIR/<name>-<part>.txt (UTF-8) and DIR/MANIFEST.json; returns the manifest path."""
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {"python": sys.version.split()[0], "platform": sys.platform, "corpora": {}}
    for name, corpus in CORPORA.items():
        entry = {"description": corpus.description}
        for part in PARTS:
            text = corpus.build(part)
            (out / f"{name}-{part}.txt").write_bytes(text.encode("utf-8"))
            entry[part] = {"sha256": sha256(text), "chars": len(text), "sources": corpus.sources(part)}
        manifest["corpora"][name] = entry
    path = out / "MANIFEST.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.corpora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every part: sha256, characters, whether it matches the reference build")
    ex = sub.add_parser("export", help="write every part as DIR/<name>-<part>.txt plus DIR/MANIFEST.json")
    ex.add_argument("directory")
    args = p.parse_args(argv)
    try:
        if args.command == "export":
            print(f"wrote {export(args.directory)}")
            return 0
        for name in CORPORA:
            for part in PARTS:
                info = describe(name, part)
                match = {True: "= reference", False: "DIFFERS from reference", None: "(no reference)"}
                print(f"{info['spec']:<22} {info['chars']:>9,} chars  sha256 {info['sha256'][:16]}…  "
                      f"{match[info['matches_reference']]}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
