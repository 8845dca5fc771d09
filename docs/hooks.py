"""MkDocs hooks (mkdocs.yml: ``hooks``) that keep the site in step with the repository.

- ``cli.md`` is generated from the Typer app when the site is built (docs/gen_cli.py).
- The benchmark reports (``benchmarks/RESULTS.md``, ``benchmarks/QUALITY.md``) become pages of
  the site as they are, so a figure in the docs links to the report it comes from.
- The pages are written to be read on the forge too, so they link to repository files with
  relative paths (``../examples/vlmkit-plugin-example``). A link that leaves docs/ is checked
  against the repository (a missing file fails the build, naming the page and the link) and, in
  the site, which does not carry those files, shown as the path it names.
"""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).parent))
import gen_cli  # noqa: E402  (docs/ is not a package)

#: repository files that are pages of the site too, at the same path under the site's root
INCLUDED = ("benchmarks/RESULTS.md", "benchmarks/QUALITY.md")
LINK = re.compile(
    r"(?P<bang>!?)\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]\((?P<target>[^()\s]+)(?P<title>\s+\"[^\"]*\")?\)"
)
FENCE = re.compile(r"^([ \t]*(?:```|~~~))", re.MULTILINE)


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _docs_prefix(config) -> str:
    return Path(config.docs_dir).resolve().relative_to(_root(config)).as_posix()


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "cli.md", content=gen_cli.render()))
    for path in INCLUDED:
        files.append(File.generated(config, path, abs_src_path=str(_root(config) / path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    src = page.file.src_uri
    repo_path = src if src in INCLUDED else f"{_docs_prefix(config)}/{src}"
    # fenced code blocks are left alone: a "[x](y)" there is code, not a link
    out, in_code = [], False
    for i, chunk in enumerate(FENCE.split(markdown)):  # text, fence, text, fence, ...
        if i % 2:
            in_code = not in_code
        elif not in_code:
            chunk = LINK.sub(lambda m: _link(m, src, repo_path, config), chunk)
        out.append(chunk)
    return "".join(out)


def _link(match: re.Match, src: str, repo_path: str, config) -> str:
    target = match["target"]
    if target.startswith(("#", "/", "mailto:")) or re.match(r"^[a-z][a-z0-9+.-]*://", target):
        return match[0]
    path, hash_, fragment = target.partition("#")
    in_repo = posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), path))
    docs = _docs_prefix(config) + "/"
    if in_repo.startswith(docs) or in_repo in INCLUDED:
        in_site = in_repo[len(docs) :] if in_repo.startswith(docs) else in_repo
        rel = posixpath.relpath(in_site, posixpath.dirname(src) or ".")
        return f"{match['bang']}[{match['text']}]({rel}{hash_}{fragment}{match['title'] or ''})"
    if in_repo.startswith("../") or not (_root(config) / in_repo).exists():
        raise PluginError(
            f"{repo_path}: the link {target!r} points at {in_repo}, which is not in the repository"
        )
    text = match["text"]
    return text if in_repo.rstrip("/") in text else f"{text} (`{in_repo}`)"
