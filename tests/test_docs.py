"""The docs cannot go stale: docs/configuration.md names exactly config.py's keys, the README
stays a manual, and no tracked text file carries a development machine's path."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import typing
from pathlib import Path

from diet_ray.config import Config

REPO = Path(__file__).resolve().parents[1]


def config_keys(cls=Config, prefix: str = "") -> set:
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys |= config_keys(t, f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def test_configuration_doc_names_every_key_and_only_real_ones():
    text = (REPO / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([\w.]+)` \|", text, flags=re.M))
    keys = config_keys()
    assert not keys - documented, f"keys missing from docs/configuration.md: {sorted(keys - documented)}"
    assert not documented - keys, f"docs/configuration.md names keys config.py lacks: {sorted(documented - keys)}"
    empty = re.findall(r"^\| `([\w.]+)` \|.*\|\s*\|$", text, flags=re.M)
    assert not empty, f"keys without a meaning in docs/configuration.md: {empty}"


def test_readme_is_a_manual_and_keeps_the_ci_command():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme


MACHINE_PATH = re.compile(r"(/work/|/tmp/w/|/home/(?!ray/)\w|/root/)")  # /home/ray is the Ray image's home


def test_no_development_machine_paths_in_tracked_text():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        if not name.endswith((".md", ".py", ".yaml", ".yml", ".toml", ".sh", ".ipynb", ".txt")) or name == "tests/test_docs.py":
            continue
        for n, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{name}:{n}: {line.strip()[:100]}")
    assert not hits, "development-machine paths:\n" + "\n".join(hits)
