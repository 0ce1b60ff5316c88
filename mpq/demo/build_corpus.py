"""Build the demo corpus that mpq ships: Python's own documentation (English) and standard library (code).

Both come from the running CPython installation and are under the PSF licence, which permits
redistribution (see mpq/demo/data/LICENSE-PSF.txt). The output is deterministic for a given
Python version. Run: ``python -m mpq.demo.build_corpus`` (rewrites mpq/demo/data/).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"

# Standard-library modules used as the code half of the corpus: plain, idiomatic, well-commented
# Python of a few hundred KB, so the shipped corpus stays small.
CODE_MODULES = [
    "argparse", "ast", "base64", "bisect", "calendar", "codecs", "collections/__init__", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "enum",
    "fnmatch", "fractions", "functools", "glob", "gzip", "heapq", "inspect", "ipaddress",
    "json/decoder", "json/encoder", "json/__init__", "linecache", "locale", "logging/__init__",
    "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pprint", "queue", "random",
    "reprlib", "sched", "secrets", "shlex", "shutil", "statistics", "string", "tempfile",
    "textwrap", "threading", "tokenize", "traceback", "typing", "uuid", "warnings", "weakref",
    "zipfile",
]


def build() -> None:
    from pydoc_data import topics  # the text of the language reference, shipped with CPython

    stdlib = Path(os.__file__).parent
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    text_docs = [{"name": name, "text": body} for name, body in sorted(topics.topics.items())]
    code_docs = []
    for module in CODE_MODULES:
        path = stdlib / f"{module}.py"
        code_docs.append({"name": module, "text": path.read_text(encoding="utf-8")})
    for kind, docs in (("text", text_docs), ("code", code_docs)):
        with gzip.GzipFile(DATA_DIR / f"corpus_{kind}.jsonl.gz", "wb", mtime=0) as raw:
            for doc in docs:
                raw.write((json.dumps(doc) + "\n").encode("utf-8"))
    shutil.copyfile(stdlib / "LICENSE.txt", DATA_DIR / "LICENSE-PSF.txt")


if __name__ == "__main__":
    build()
